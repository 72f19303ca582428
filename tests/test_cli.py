"""The ``mptls`` command line: parsing, certificates, the demo payload,
and the commands end to end in subprocesses on loopback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from support import (
    COMMAND_TIMEOUT,
    readline_within,
    reap,
    run_mptls,
    served_by,
    serving,
    worker_pids,
)

import mptls
from mptls.backends.base import MptcpInfo, SubflowInfo
from mptls.bench import RunRecord
from mptls.bench.harness import ScenarioResult
from mptls.cli import commands, netcat
from mptls.cli import main as cli_main
from mptls.cli.archive import Payload, build_archive, existing_payload
from mptls.cli.certs import (
    DEVELOPMENT_IDENTITIES,
    issue_development_pems,
    write_development_certs,
)
from mptls.cli.common import (
    ExitStatus,
    UsageError,
    check_path_count,
    client_options,
    describe_error,
    existing_file,
    exit_status_for,
    human_bytes,
    parse_announce,
    parse_paths,
    parse_port,
    server_options,
    sigterm_as_interrupt,
    until_terminated,
)
from mptls.cli.demo import idle_paths_reason
from mptls.cli.demo_report import subflow_table
from mptls.cli.transfer import ClientSide, DemoReport, DemoSettings, ServerSide
from mptls.errors import (
    BackendError,
    CertificateError,
    ConnectError,
    MptlsTimeoutError,
    NotMptlsPeerError,
    PathsLostError,
    PeerResetError,
    ProtocolError,
    TLSError,
)

# the signals that stop a command, and the exit status each one gives
STOPPING_SIGNALS = pytest.mark.parametrize(
    ("signum", "status"),
    [
        (signal.SIGINT, ExitStatus.INTERRUPTED),
        (signal.SIGTERM, ExitStatus.TERMINATED),
    ],
    ids=["SIGINT", "SIGTERM"],
)


def connect_args(port: str, certs: Path) -> list[str]:
    """``mptls connect`` to a local ``serve`` on ``port``, trusting the
    development CA in ``certs``."""
    return ["connect", "127.0.0.1", port, "--cafile", str(certs / "ca.pem")]


# argument parsing


def test_paths_are_parsed_in_order_and_canonical() -> None:
    assert parse_paths("127.0.0.1, 127.0.0.2,[::1]") == (
        "127.0.0.1",
        "127.0.0.2",
        "::1",
    )


@pytest.mark.parametrize(
    "text",
    ["", ",", "127.0.0.1,127.0.0.1", "1.2.3", "127.0.0.1,224.0.0.1"],
)
def test_bad_paths_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_paths(text)


@pytest.mark.parametrize(
    "text", ["127.0.0.1,,127.0.0.2", "127.0.0.1,", " ,127.0.0.1"]
)
def test_an_empty_paths_entry_is_a_usage_error(text: str) -> None:
    # it was skipped: "127.0.0.1,,127.0.0.2" ran without a word
    with pytest.raises(UsageError, match="empty entry"):
        parse_paths(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.2", ("127.0.0.2", 4433)),
        ("127.0.0.2:5000", ("127.0.0.2", 5000)),
        ("::1", ("::1", 4433)),
        ("[::1]", ("::1", 4433)),
        ("[2001:db8::1]:7000", ("2001:db8::1", 7000)),
    ],
)
def test_announce_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_announce(text, 4433) == expected


@pytest.mark.parametrize(
    "text",
    [
        "localhost",
        "127.0.0.2:x",
        "127.0.0.2:70000",
        "[::1]x",
        "[::1",
        "[",
        # the server listened on 224.0.0.1 too, and told clients to join
        "224.0.0.1",
        "[ff02::1]:4433",
        "0.0.0.0:4433",
        "255.255.255.255",
    ],
)
def test_bad_announce_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_announce(text, 4433)


@pytest.mark.parametrize("text", ["-1", "65536", "http"])
def test_bad_port_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_port(text)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_port, "9" * 5000),
        (parse_announce, "[" + "1" * 5000),
        (parse_announce, "x" * 5000),
    ],
    ids=["port", "announce-bracket", "announce"],
)
def test_a_long_bad_argument_is_named_short(
    parse: Callable[..., object], text: str
) -> None:
    # the message repeated the argument whole: 5000 characters on one
    # line for a mistyped port
    with pytest.raises(UsageError) as raised:
        parse(*([text] if parse is parse_port else [text, 4433]))
    assert len(str(raised.value)) < 100, str(raised.value)
    assert "..." in str(raised.value)


def test_parser_defaults_aim_at_loopback() -> None:
    parser = commands.build_parser()
    demo = parser.parse_args(["demo"])
    assert demo.paths == "127.0.0.1,127.0.0.2"
    assert (demo.backend, demo.mode) == ("userspace", None)
    serve = parser.parse_args(["serve"])
    assert (serve.host, serve.port) == ("127.0.0.1", "4433")


def test_parser_rejects_unknown_mode() -> None:
    with pytest.raises(SystemExit) as raised:
        commands.build_parser().parse_args(["demo", "--mode", "H"])
    assert raised.value.code == 2


@pytest.mark.parametrize(
    ("given", "mode"),
    [("e", "E"), ("E", "E"), ("g", "G"), ("RFC8684", "rfc8684")],
)
@pytest.mark.parametrize(
    "command", [["demo"], ["serve"], ["connect", "127.0.0.1", "4433"]]
)
def test_the_mode_is_taken_in_any_case(
    command: list[str], given: str, mode: str
) -> None:
    parser = commands.build_parser()
    args = parser.parse_args([*command, "--mode", given])
    assert args.mode == mode
    assert args.rotate_every is None


def test_rotate_every_sets_the_rotation_interval() -> None:
    assert client_options("userspace", "E", rotate_every=30.0) == {
        "backend": "userspace",
        "mode": "E",
        "key_rotation_interval": 30.0,
    }
    assert server_options("userspace", "E", rotate_every=0.5) == {
        "backend": "userspace",
        "modes": ("E",),
        "announce_addrs": [],
        "key_rotation_interval": 0.5,
    }


def _userspace(mode: str | None, rotate_every: float) -> Callable[[], object]:
    return lambda: client_options("userspace", mode, rotate_every=rotate_every)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (_userspace(None, 5), "--mode E"),
        (_userspace("G", 5), "--mode E"),
        (lambda: server_options("userspace", "rfc8684", rotate_every=5), "E"),
        (lambda: client_options("kernel", None, rotate_every=5), "kernel"),
        (lambda: server_options("kernel", None, rotate_every=5), "kernel"),
        (_userspace("E", 0), "in [(]0"),
        (_userspace("E", float("nan")), "in [(]0"),
        (_userspace("E", 1e9), "in [(]0"),
    ],
)
def test_rotate_every_goes_with_mode_e_only(
    call: Callable[[], object], match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        call()


def test_each_backend_gets_its_own_keywords() -> None:
    assert client_options("userspace", None) == {
        "backend": "userspace",
        "mode": "G",
    }
    assert client_options("kernel", None, manage_paths=True) == {
        "backend": "kernel",
        "manage_paths": True,
    }
    announce = [("127.0.0.3", 4433)]
    assert server_options("userspace", "rfc8684", announce) == {
        "backend": "userspace",
        "modes": ("rfc8684",),
        "announce_addrs": announce,
    }
    assert server_options("kernel", None, announce) == {
        "backend": "kernel",
        "announce": ["127.0.0.3"],
    }


@pytest.mark.parametrize(
    "call",
    [
        lambda: client_options("kernel", "G"),
        lambda: client_options("userspace", None, manage_paths=True),
        lambda: server_options("kernel", "rfc8684"),
    ],
)
def test_options_a_backend_cannot_honour_are_refused(
    call: Callable[[], object],
) -> None:
    with pytest.raises(UsageError):
        call()


def test_exit_status_separates_bad_input_from_failure() -> None:
    refused = BackendError("connect failed")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert exit_status_for(UsageError("x")) is ExitStatus.USAGE
    assert exit_status_for(FileNotFoundError(2, "x")) is ExitStatus.USAGE
    assert exit_status_for(refused) is ExitStatus.USAGE
    assert exit_status_for(ProtocolError("x")) is ExitStatus.FAILURE
    assert exit_status_for(NotMptlsPeerError("x")) is ExitStatus.USAGE
    assert exit_status_for(MptlsTimeoutError("x")) is ExitStatus.FAILURE
    refusal = ConnectError.of(111, "connection refused", port=1)
    assert exit_status_for(refusal) is ExitStatus.USAGE
    # OSErrors too (as stdlib's TLS and reset errors are), yet failures
    # of the connection rather than of the user's input
    for failure in (
        TLSError,
        CertificateError,
        PeerResetError,
        PathsLostError,
    ):
        assert exit_status_for(failure("x")) is ExitStatus.FAILURE


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        ConnectionAbortedError(103, "Software caused connection abort"),
        BrokenPipeError(32, "Broken pipe"),
    ],
)
def test_a_connection_that_ended_is_a_failure_not_bad_input(
    error: OSError,
) -> None:
    assert exit_status_for(error) is ExitStatus.FAILURE


def test_main_without_command_is_one_error_line_naming_the_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # it printed the whole help on stderr, with no error line, where
    # every other failure is one ``mptls: error:`` line
    with pytest.raises(SystemExit) as raised:
        cli_main.main([])
    assert raised.value.code == ExitStatus.USAGE
    assert capsys.readouterr().err.splitlines() == [
        "mptls: error: a command is required: demo, certs, serve, "
        "connect, info or bench (see: mptls --help)"
    ]


@pytest.mark.parametrize(
    ("argv", "names", "extra"),
    [
        (["bench", "--nosuch"], "mptls bench", "--nosuch"),
        (["info", "--json", "surplus"], "mptls info", "surplus"),
        (["connect", "127.0.0.1", "4433", "5555"], "mptls connect", "5555"),
        (["--nosuch", "info"], "mptls", "--nosuch"),
        # one of the two before the command: the top level's to name
        (["--nosuch", "info", "--nosuch"], "mptls", "--nosuch --nosuch"),
    ],
)
def test_an_unknown_argument_points_to_the_help_that_lists_the_options(
    argv: list[str],
    names: str,
    extra: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # ``mptls bench --nosuch`` sent the user to ``mptls --help``, which
    # lists the commands, not bench's options
    with pytest.raises(SystemExit) as raised:
        cli_main.main(argv)
    assert raised.value.code == ExitStatus.USAGE
    assert capsys.readouterr().err.splitlines() == [
        f"mptls: error: unrecognized arguments: {extra} (see: {names} --help)"
    ]


def test_human_bytes_uses_decimal_units() -> None:
    assert human_bytes(999) == "999 B"
    assert human_bytes(52_428_800) == "52.4 MB"
    assert human_bytes(2.5e9) == "2.5 GB"


# certificates


def test_development_pems_cover_the_loopback_names() -> None:
    pems = issue_development_pems()
    chain = x509.load_pem_x509_certificates(pems.chain)
    ca = x509.load_pem_x509_certificate(pems.ca)
    assert chain[-1] == ca
    names = (
        chain[0]
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    dns = names.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert sorted([*dns, *ips]) == sorted(DEVELOPMENT_IDENTITIES)
    assert "PRIVATE KEY" not in repr(pems)


def test_certs_are_written_and_never_overwritten(tmp_path: Path) -> None:
    ca, chain, key = write_development_certs(tmp_path / "certs")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    before = ca.read_bytes()

    with pytest.raises(UsageError, match="--force"):
        write_development_certs(tmp_path / "certs")
    assert ca.read_bytes() == before

    write_development_certs(tmp_path / "certs", force=True)
    assert ca.read_bytes() != before
    assert chain.read_bytes().count(b"BEGIN CERTIFICATE") == 2


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_certs_force_replaces_no_special_file(
    tmp_path: Path, kind: str
) -> None:
    # a FIFO named server.pem held the write open for good; a directory
    # named server.key failed after ca.pem and server.pem were replaced
    directory = tmp_path / "certs"
    ca, chain, key = write_development_certs(directory)
    before = ca.read_bytes()
    special = chain if kind == "fifo" else key
    special.unlink()
    if kind == "fifo":
        os.mkfifo(special)
    else:
        special.mkdir()

    with pytest.raises(UsageError) as refused:
        write_development_certs(directory, force=True)
    assert str(refused.value) == (
        f"{special} is not a regular file: not overwritten (remove it, "
        "or name another --dir)"
    )
    assert ca.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "line"),
    [
        # connected on the system's trust store, as with no --cafile
        (
            ["connect", "127.0.0.1", "9", "--cafile", ""],
            "--cafile needs a file name",
        ),
        # sent the standard library's archive, as with no --file
        (["demo", "--file", ""], "--file needs a file name"),
        # "certificate file is a directory: " (Path("") is ".")
        (["serve", "--port", "0", "--cert", ""], "--cert needs a file name"),
        # (any readable file passes as --cert until it is loaded)
        (
            ["serve", "--port", "0", "--cert", __file__, "--key", ""],
            "--key needs a file name",
        ),
        # wrote the key into the current directory
        (
            ["certs", "--dir", ""],
            "--dir needs a directory name (. for this one)",
        ),
    ],
    ids=["cafile", "file", "cert", "key", "dir"],
)
def test_an_empty_file_option_names_no_file(
    tmp_path: Path, args: list[str], line: str
) -> None:
    result = run_mptls(*args, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.decode() == f"mptls: error: {line}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["demo", "--file", __file__], ["connect", "127.0.0.1", "9"]],
    ids=["demo", "connect"],
)
def test_more_paths_than_subflows_are_refused_up_front(
    command: list[str],
) -> None:
    # each path past max_subflows was refused with a warning, and the
    # demo failed after its transfer: "its subflow did not open or join"
    paths = ",".join(f"127.0.0.{host}" for host in range(1, 10))
    result = run_mptls(*command, "--paths", paths)

    assert result.returncode == 2
    assert result.stderr.decode() == (
        "mptls: error: --paths names 9 addresses: a connection opens at "
        "most 8 subflows (max_subflows)\n"
    )


@pytest.mark.parametrize(
    ("count", "backend"), [(8, "userspace"), (9, "kernel")]
)
def test_as_many_paths_as_subflows_pass(count: int, backend: str) -> None:
    # the limit is max_subflows itself, the first path's subflow among
    # them; the kernel's own limit is not mptls's to guess
    paths = [f"127.0.0.{host}" for host in range(1, count + 1)]
    check_path_count(paths, backend)


@pytest.mark.parametrize(
    "command",
    [["demo", "--file", __file__], ["connect", "127.0.0.1", "9"]],
    ids=["demo", "connect"],
)
@pytest.mark.parametrize(
    ("paths", "shown"),
    [
        ("0.0.0.0", "0.0.0.0"),
        ("127.0.0.1,0.0.0.0", "0.0.0.0"),
        ("::", "::"),
        # shown as ipaddress writes it: ::ffff:0:0 up to 3.12
        ("::ffff:0.0.0.0", str(ipaddress.ip_address("::ffff:0.0.0.0"))),
    ],
)
def test_an_unspecified_path_is_refused_up_front(
    command: list[str], paths: str, shown: str
) -> None:
    # the system picked 127.0.0.1 as its source, so the demo sent all
    # and then failed: "path 0.0.0.0 never carried data"
    result = run_mptls(*command, "--paths", paths)

    assert result.returncode == 2
    assert result.stderr.decode() == (
        f"mptls: error: --paths takes the source address of each path: "
        f"{shown} is the unspecified address, which leaves the source to "
        "the system; name the local address itself (127.0.0.1, say)\n"
    )


def test_certs_command_refuses_overwrite(tmp_path: Path) -> None:
    assert cli_main.main(["certs", "--dir", str(tmp_path)]) == 0
    assert cli_main.main(["certs", "--dir", str(tmp_path)]) == 2


@pytest.mark.parametrize("name", ["c[/]d", "[red]e"])
def test_certs_names_a_directory_with_brackets_as_it_is(
    tmp_path: Path, name: str
) -> None:
    # the directory was read as rich markup: "c[/]d" failed with "closing
    # tag '[/]' ... has nothing to close" after writing the files, and
    # "[red]e" printed commands naming e/ca.pem, which does not exist
    result = run_mptls("certs", "--dir", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / name / "ca.pem").is_file()
    assert f"--cafile {name}/ca.pem" in result.stdout.decode()


# the demo payload


def _tree(root: Path, sizes: dict[str, int], seed: int) -> None:
    generator = random.Random(seed)
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(generator.randbytes(size))


def _members(archive: Path) -> list[str]:
    with tarfile.open(archive) as opened:
        return opened.getnames()


def test_archive_holds_the_primary_tree_without_caches(
    tmp_path: Path,
) -> None:
    stdlib = tmp_path / "lib"
    _tree(
        stdlib,
        {
            "os.py": 3000,
            "json/__init__.py": 2000,
            "json/__pycache__/x.pyc": 500,
            "site-packages/other.py": 700,
        },
        seed=1,
    )
    payload = build_archive(tmp_path / "out.tar", stdlib, minimum=0)

    assert sorted(_members(payload.path)) == [
        "stdlib/json/__init__.py",
        "stdlib/os.py",
    ]
    assert payload.size == payload.path.stat().st_size
    assert "2 files" in payload.description
    with tarfile.open(payload.path) as opened:
        member = opened.extractfile("stdlib/os.py")
        assert member is not None
        assert member.read() == (stdlib / "os.py").read_bytes()


def test_archive_appends_extras_only_up_to_the_minimum(
    tmp_path: Path,
) -> None:
    stdlib, extra = tmp_path / "lib", tmp_path / "site-packages"
    _tree(stdlib, {"a.py": 10_000}, seed=2)
    _tree(extra, {f"pkg/m{i:02}.py": 10_000 for i in range(20)}, seed=3)

    payload = build_archive(
        tmp_path / "out.tar", stdlib, [extra], minimum=50_000
    )

    members = _members(payload.path)
    extras = [name for name in members if not name.startswith("stdlib/")]
    assert payload.size >= 50_000
    # each 10 kB file takes 10.5 kB of tar: enough files, not all of them
    assert 3 <= len(extras) < 20
    assert f"{len(extras)} files from site-packages" in payload.description


def test_archive_is_the_same_for_the_same_tree(tmp_path: Path) -> None:
    stdlib = tmp_path / "lib"
    _tree(stdlib, {"b.py": 100, "a.py": 100, "c/d.py": 100}, seed=4)
    first = build_archive(tmp_path / "1.tar", stdlib, minimum=0)
    second = build_archive(tmp_path / "2.tar", stdlib, minimum=0)
    assert _members(first.path) == [
        "stdlib/a.py",
        "stdlib/b.py",
        "stdlib/c/d.py",
    ]
    assert _members(first.path) == _members(second.path)


def test_existing_payload_describes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(1500))
    payload = existing_payload(path)
    assert payload.size == 1500
    assert "1.5 kB" in payload.description


# end to end, in subprocesses


@pytest.fixture
def two_mib_file(tmp_path: Path) -> tuple[Path, str]:
    data = random.Random(5).randbytes(2 * 1024 * 1024)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_demo_sends_a_file_over_two_subflows(
    two_mib_file: tuple[Path, str],
) -> None:
    path, sha256 = two_mib_file
    result = run_mptls("demo", "--file", str(path), "--json")
    assert result.returncode == 0, result.stderr.decode()

    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["sha256"] == {
        "client": sha256,
        "server": sha256,
        "match": True,
    }
    assert report["transfer"]["bytes_received"] == 2 * 1024 * 1024
    assert report["mode"] == "G"
    assert report["keys"]["match"] is True
    assert len(report["keys"]["client_fingerprint"]) == 8

    subflows = report["client"]["subflows"]
    assert len(subflows) == 2
    assert {subflow["local_address"][0] for subflow in subflows} == {
        "127.0.0.1",
        "127.0.0.2",
    }
    assert all(subflow["bytes_sent"] > 0 for subflow in subflows)


def _documented_demo_json() -> dict[str, list[str]]:
    """The keys of ``demo --json`` as docs/cli.md shows them, in its
    order: each top-level key with the keys of its object, where the
    example writes them out."""
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    start = text.index("`--json` prints one JSON document instead")
    block = text[text.index("```\n{", start) : text.index("\n}\n```", start)]
    keys: dict[str, list[str]] = {}
    top = ""
    for line in block.splitlines()[2:]:
        if found := re.match(r'  "(\w+)": ', line):
            top = found[1]
            keys[top] = []
            line = line[found.end() :]
        keys[top] += re.findall(r'"(\w+)": ', line)
    return keys


def test_demo_json_keys_come_in_the_order_the_docs_show(
    tmp_path: Path,
) -> None:
    # the docs showed "ok" first, where the document has it in the
    # alphabetical order of every other key
    path = tmp_path / "payload.bin"
    path.write_bytes(random.Random(7).randbytes(20000))
    result = run_mptls("demo", "--file", str(path), "--json")
    assert result.returncode == 0, result.stderr.decode()

    report = json.loads(result.stdout)
    documented = _documented_demo_json()
    assert list(report) == list(documented)
    for key, inner in documented.items():
        if inner:
            assert list(report[key]) == inner, key


def test_demo_in_mode_e_rotates_its_keys(
    two_mib_file: tuple[Path, str],
) -> None:
    path, _ = two_mib_file
    result = run_mptls(
        "demo",
        "--file",
        str(path),
        "--json",
        "--mode",
        "e",
        "--rotate-every",
        "0.05",
    )
    assert result.returncode == 0, result.stderr.decode()

    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["mode"] == "E"
    assert report["sha256"]["match"] is True
    keys = report["keys"]
    assert isinstance(keys["client_generation"], int)
    assert isinstance(keys["server_generation"], int)
    # both paths joined under the keys the peer confirmed
    subflows = report["client"]["subflows"]
    assert len(subflows) == 2
    assert all(subflow["bytes_sent"] > 0 for subflow in subflows)
    assert len(report["client"]["local_token"]) == 8


def test_demo_report_for_people(two_mib_file: tuple[Path, str]) -> None:
    path, sha256 = two_mib_file
    result = run_mptls("demo", "--file", str(path))
    assert result.returncode == 0, result.stderr.decode()

    # not a terminal: no progress bar, no colour codes, the report only
    report = result.stdout.decode()
    assert "\x1b[" not in report
    assert "mptls demo: OK" in report
    assert "from the TLS exporter (EXPORTER-MPTCP)" in report
    assert sha256 in report
    assert "127.0.0.2:" in report


def _kernel_mptcp() -> bool:
    from mptls.backends.kernel.probe import probe

    report = probe()
    return report.enabled and report.mptcp_socket


@pytest.mark.kernel
def test_demo_over_the_kernel_backend(
    two_mib_file: tuple[Path, str],
) -> None:
    if not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    path, sha256 = two_mib_file
    result = run_mptls("demo", "--file", str(path), "--backend", "kernel")
    assert result.returncode == 0, result.stderr.decode()
    report = result.stdout.decode()
    assert "mode kernel" in report
    assert sha256 in report
    # no released kernel takes the keys: the report must not say it did
    assert (
        "exported (EXPORTER-MPTCP), not installed:" in report
        or "from the TLS exporter" in report
    )
    assert not (
        "from the TLS exporter" in report and "not installed" in report
    )


def _report_over(backend: str, mode: str, path: Path) -> DemoReport:
    """A demo report of one subflow over ``backend``, as the demo fills
    it in, for the parts of the report that depend on the backend."""
    subflow = SubflowInfo(
        1, ("127.0.0.1", 40000), ("127.0.0.1", 4433), "ESTABLISHED", 10, 10
    )
    served = SubflowInfo(
        1, ("127.0.0.1", 4433), ("127.0.0.1", 40000), "ESTABLISHED", 10, 10
    )

    def info(seen: SubflowInfo) -> MptcpInfo:
        return MptcpInfo(backend, mode, None, None, False, subflows=(seen,))

    return DemoReport(
        Payload(path, 10, "ten bytes"),
        DemoSettings(backend, None, ("127.0.0.1",), 10.0),
        ClientSide("0" * 64, 10, 0.1, "0" * 64, info(subflow), None, None),
        ServerSide("0" * 64, 10, info(served)),
    )


@pytest.mark.parametrize(
    ("backend", "mode", "scheduler"),
    [
        ("userspace", "G", "the lowest round-trip time"),
        ("kernel", "kernel", "the kernel's MPTCP scheduler"),
    ],
)
def test_the_subflow_table_names_the_scheduler_that_split_the_bytes(
    backend: str, mode: str, scheduler: str, tmp_path: Path
) -> None:
    # the kernel backend's packets are spread by the kernel, not by the
    # userspace scheduler that the caption describes
    table = subflow_table(_report_over(backend, mode, tmp_path / "f"))
    assert scheduler in str(table.caption)


def test_demo_fails_when_a_path_never_carries_data(
    two_mib_file: tuple[Path, str],
) -> None:
    # the server listens on 127.0.0.1: a subflow from ::1 cannot reach it,
    # and nothing leaves loopback
    path, _ = two_mib_file
    result = run_mptls(
        "demo", "--file", str(path), "--paths", "127.0.0.1,::1", "--json"
    )
    error = result.stderr.decode()
    assert result.returncode == 1, error
    assert "path ::1 never carried data" in error
    assert "Traceback" not in error
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["idle_paths"] == ["::1"]
    assert report["sha256"]["match"] is True


def _report_with_an_idle_path(tmp_path: Path, joined: bool) -> DemoReport:
    """A demo report whose second path, 127.0.0.2, carried nothing; with
    ``joined``, the server held an established subflow from it."""
    server = ("127.0.0.1", 4433)
    sent = SubflowInfo(0, ("127.0.0.1", 40000), server, "CLOSED", 10)
    idle = SubflowInfo(1, ("127.0.0.2", 40001), server, "CLOSED", 0)
    served = [SubflowInfo(0, server, ("127.0.0.1", 40000), "ESTABLISHED")]
    if joined:
        served.append(
            SubflowInfo(1, server, ("127.0.0.2", 40001), "ESTABLISHED")
        )

    def info(*subflows: SubflowInfo) -> MptcpInfo:
        return MptcpInfo("userspace", "G", None, None, True, subflows=subflows)

    return DemoReport(
        Payload(tmp_path / "f", 10, "ten bytes"),
        DemoSettings("userspace", None, ("127.0.0.1", "127.0.0.2"), 10.0),
        ClientSide("0" * 64, 10, 0.1, "0" * 64, info(sent, idle), None, None),
        ServerSide("0" * 64, 10, info(*served)),
    )


def test_a_path_that_joined_but_carried_nothing_is_said_to_have_joined(
    tmp_path: Path,
) -> None:
    # a 10 kB file over five paths: the last two joined, the others took
    # the file, and the demo said their subflows "did not open or join"
    report = _report_with_an_idle_path(tmp_path, joined=True)

    assert report.joined_idle_paths == ("127.0.0.2",)
    assert not report.ok
    assert idle_paths_reason(report, file_given=True) == (
        "path 127.0.0.2 joined but carried no data: the other paths took "
        "the whole 10 B file (send a larger --file, or leave it out for "
        "the 50 MB archive)"
    )


def test_a_path_whose_subflow_never_joined_is_said_not_to_have(
    tmp_path: Path,
) -> None:
    report = _report_with_an_idle_path(tmp_path, joined=False)

    assert report.joined_idle_paths == ()
    assert idle_paths_reason(report, file_given=True) == (
        "path 127.0.0.2 never carried data: its subflow did not open or "
        "join (run with --debug to see why)"
    )


def test_demo_of_a_file_too_small_for_its_paths_says_they_joined(
    tmp_path: Path,
) -> None:
    # the demo waits for every path to join before it sends, and one
    # byte cannot spread over eight paths
    path = tmp_path / "one.bin"
    path.write_bytes(b"x")
    paths = ",".join(f"127.0.0.{host}" for host in range(1, 9))
    result = run_mptls("demo", "--file", str(path), "--paths", paths, "--json")

    error = result.stderr.decode()
    assert result.returncode == 1, error
    report = json.loads(result.stdout)
    assert report["sha256"]["match"] is True
    assert report["idle_paths"]
    assert report["joined_idle_paths"] == report["idle_paths"]
    assert "joined but carried no data" in error
    assert "did not open or join" not in error


def test_demo_with_a_directory_says_so(tmp_path: Path) -> None:
    result = run_mptls("demo", "--file", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.decode().strip() == (
        f"mptls: error: file is a directory: {tmp_path}"
    )


@pytest.mark.parametrize("command", ["demo", "connect"])
def test_empty_paths_are_refused(command: str) -> None:
    args = ["127.0.0.1", "4433"] if command == "connect" else []
    result = run_mptls(command, *args, "--paths", "")
    assert result.returncode == 2
    assert "--paths needs at least one local address" in (
        result.stderr.decode()
    )


def test_info_never_splits_a_name_at_80_columns() -> None:
    import io

    from rich.console import Console

    from mptls.cli.info import report_table

    names = [
        "net.mptcp.allow_join_initial_addr_port",
        "net.mptcp.syn_retrans_before_tcp_fallback",
        "net.mptcp.available_path_managers",
    ]
    report = {
        "kernel release": "6.1.0",
        "mptcp socket detail": "socket(IPPROTO_MPTCP) works",
        "sysctls": {name: "kernel userspace" for name in names},
    }
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(
        report_table(report, "kernel MPTCP")
    )
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in names:
        assert name in text


def test_kernel_backend_refuses_a_mode(tmp_path: Path) -> None:
    result = run_mptls("demo", "--backend", "kernel", "--mode", "G")
    assert result.returncode == 2
    assert "--mode applies to the userspace backend" in (
        result.stderr.decode()
    )


@pytest.mark.parametrize("verbose", [True, False])
def test_kernel_paths_left_to_the_kernel_are_named(verbose: bool) -> None:
    # with --backend kernel and no --manage-paths, the extra --paths go
    # to the kernel's endpoints, which may hold none of them: -v showed
    # one subflow and nothing of why
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    argv = ["connect", "--backend", "kernel", "127.0.0.1", str(port)]
    argv += ["--paths", "127.0.0.1,127.0.0.2,127.0.0.3", "--insecure"]
    result = run_mptls(*argv, *(["-v"] if verbose else []))
    lines = result.stderr.decode().splitlines()
    assert result.returncode != 0
    hint = (
        "paths 127.0.0.2, 127.0.0.3 left to the kernel's endpoints "
        "(--manage-paths adds them)"
    )
    assert (hint in lines) is verbose


@pytest.mark.parametrize("name", ["x[/]y.bin", "[red]r.bin"])
def test_demo_names_a_file_with_brackets_as_it_is(
    tmp_path: Path, name: str
) -> None:
    # a file's path was read as rich markup: "x[/]y.bin" (the file
    # "]y.bin" in the directory "x[") failed the demo with "closing tag
    # '[/]' ... has nothing to close", "[red]r.bin" showed "r.bin"
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"z" * 1000)
    result = run_mptls("demo", "--file", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    report = result.stdout.decode()
    assert report.startswith(f"sending {name} (1.0 kB)\n")
    assert f"file         {name} (1.0 kB)" in report


def test_a_file_name_cannot_steer_the_terminal(tmp_path: Path) -> None:
    # control characters of a name (an escape sequence, a newline) went
    # to the terminal as they were, in the report and in errors
    name = "e\x1b[31mred\nline.bin"
    (tmp_path / name).write_bytes(b"z" * 1000)
    result = run_mptls("demo", "--file", name, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert "\x1b" not in result.stdout.decode()
    assert "e\\x1b[31mred\\nline.bin" in result.stdout.decode()
    missing = run_mptls("demo", "--file", f"{name}.absent", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.decode() == (
        "mptls: error: file not found: e\\x1b[31mred\\nline.bin.absent\n"
    )


def test_a_capture_name_cannot_steer_the_terminal(tmp_path: Path) -> None:
    # the line that ends a --pcap run showed the capture's name raw
    (tmp_path / "small.bin").write_bytes(b"z" * 1000)
    name = "p\x1b[31mred.pcap"
    result = run_mptls(
        "demo", "--file", "small.bin", "--pcap", name, "--quiet", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / name).is_file()
    shown = result.stdout.decode()
    assert "\x1b" not in shown
    assert "in p\\x1b[31mred.pcap\n" in shown


def test_a_name_in_a_system_error_cannot_steer_the_terminal(
    tmp_path: Path,
) -> None:
    # the system's errors name the file as it was: "Not a directory: "
    # followed by the escape sequence of the user's --dir
    name = "f\x1b[31m"
    (tmp_path / name).touch()
    result = run_mptls("certs", "--dir", f"{name}/sub", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "mptls: error: Not a directory: f\\x1b[31m/sub\n"
    )


@STOPPING_SIGNALS
def test_demo_stopped_while_it_builds_its_archive_leaves_nothing(
    tmp_path: Path, signum: signal.Signals, status: ExitStatus
) -> None:
    # SIGTERM (timeout, a CI job's end) killed the demo where it stood:
    # its temporary directory stayed, with tens of MB of a partial tar
    demo = subprocess.Popen(
        [sys.executable, "-m", "mptls", "demo", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not any(
            archive.stat().st_size
            for archive in tmp_path.glob("mptls-demo-*/*")
        ):
            assert demo.poll() is None, "the demo ended before its archive"
            assert time.monotonic() < deadline, "no archive was started"
            time.sleep(0.01)
        demo.send_signal(signum)
        assert demo.wait(timeout=COMMAND_TIMEOUT) == status
    finally:
        reap(demo)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_handling_gives_back_the_handler_it_found() -> None:
    # the demo's transfer runs under until_terminated within
    # sigterm_as_interrupt: left at asyncio's default once the transfer
    # was over, a SIGTERM while the report was written ended the demo
    # at once, its temporary archive left behind
    async def work() -> str:
        return "done"

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        unwinding = signal.getsignal(signal.SIGTERM)
        assert unwinding is not before
        assert asyncio.run(until_terminated(work())) == "done"
        assert signal.getsignal(signal.SIGTERM) is unwinding
    assert signal.getsignal(signal.SIGTERM) is before


def test_demo_terminated_while_it_sends_ends_in_order(tmp_path: Path) -> None:
    # SIGTERM during the transfer: the exit status says so, without a
    # traceback of asyncio's, and the temporary directory is gone
    path = tmp_path / "payload.bin"
    path.write_bytes(random.Random(5).randbytes(32 << 20))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    demo = subprocess.Popen(
        [sys.executable, "-m", "mptls", "demo", "--file", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    try:
        assert demo.stdout is not None
        sending = readline_within(demo.stdout, COMMAND_TIMEOUT)
        assert sending.startswith(b"sending "), sending
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=COMMAND_TIMEOUT) == ExitStatus.TERMINATED
        assert demo.stderr is not None
        assert demo.stderr.read() == b""
    finally:
        reap(demo)
    assert list(scratch.iterdir()) == []


def test_demo_with_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_mptls("demo", "--file", str(tmp_path / "absent.bin"))
    assert result.returncode == 2
    error = result.stderr.decode()
    assert (
        error.strip() == f"mptls: error: file not found: {tmp_path}/absent.bin"
    )
    assert "Traceback" not in error


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
def test_connect_to_a_closed_port_exits_2(backend: str) -> None:
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    # a listening socket that is closed at once leaves a port nobody holds
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_mptls(
        "connect", "127.0.0.1", str(port), "--insecure", "--backend", backend
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr.decode()
    assert result.stderr.decode().count("\n") <= 2
    assert result.stderr.decode().splitlines()[-1] == (
        f"mptls: error: cannot connect to 127.0.0.1:{port}: connection refused"
    )


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
def test_connect_gives_up_at_its_connect_timeout(backend: str) -> None:
    """--connect-timeout ends a connect nothing answers (SYNs to a
    listener whose accept queue is full are dropped), and the message
    says the limit."""
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    import socket

    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        # the one connection a backlog of 0 admits fills the queue
        with socket.create_connection(("127.0.0.1", port)):
            result = run_mptls(
                "connect", "127.0.0.1", str(port), "--insecure",
                "--backend", backend, "--connect-timeout", "0.3",
            )  # fmt: skip
    error = result.stderr.decode()
    assert result.returncode == 1, error
    assert error.splitlines()[-1] == (
        f"mptls: error: TCP connect to 127.0.0.1:{port} timed out after "
        "0.3 s (connect_timeout)"
    )


@pytest.mark.parametrize("value", ["-1", "nan", "86401"])
def test_a_bad_happy_eyeballs_delay_is_a_usage_error(value: str) -> None:
    result = run_mptls(
        "connect", "127.0.0.1", "9", "--happy-eyeballs-delay", value
    )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        f"mptls: error: --happy-eyeballs-delay must be in [0, 86400] "
        f"seconds, got {float(value):g}"
    )


@pytest.mark.parametrize("value", ["0", "-1", "nan", "86401"])
def test_a_bad_connect_timeout_is_a_usage_error(value: str) -> None:
    result = run_mptls("connect", "127.0.0.1", "9", "--connect-timeout", value)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        f"mptls: error: --connect-timeout must be in (0, 86400] seconds, "
        f"got {float(value):g}"
    )


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "86401"])
def test_a_bad_demo_timeout_is_a_usage_error(value: str) -> None:
    # nan passed the "must be positive" test and failed the demo a second
    # later as "did not finish within nan s", exit 1; inf was no limit
    result = run_mptls("demo", "--timeout", value)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        f"mptls: error: --timeout must be in (0, 86400] seconds, "
        f"got {float(value):g}"
    )


def test_connect_to_a_server_that_is_not_mptls_exits_2() -> None:
    # a plain TCP server that reads the first bytes and closes, as a
    # plain TLS server does with the mptls preamble
    import socket
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(COMMAND_TIMEOUT)
        port = listener.getsockname()[1]

        def answer_once() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(COMMAND_TIMEOUT)
                    conn.recv(64)
                    # a FIN with nothing said; closing on unread bytes
                    # would be a reset, which says nothing of the server
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(4096):
                        pass

        thread = threading.Thread(target=answer_once)
        thread.start()
        result = run_mptls("connect", "127.0.0.1", str(port), "--insecure")
        thread.join(COMMAND_TIMEOUT)
    error = result.stderr.decode()
    assert result.returncode == 2, error
    assert "not an mptls userspace server" in error
    assert "Traceback" not in error


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    assert run_mptls("certs", "--dir", str(directory)).returncode == 0
    return directory


def test_serve_and_connect_in_mode_e(certs: Path) -> None:
    with serving(
        certs, "--echo", "--once", "--mode", "e", "--rotate-every", "0.05"
    ) as (server, port):
        line = b"hello under rotating keys\n"
        client = run_mptls(
            *connect_args(port, certs),
            "--paths",
            "127.0.0.1,127.0.0.2",
            "--mode",
            "E",
            "-v",
            stdin=line,
        )
        status = client.stderr.decode()
        assert client.returncode == 0, status
        assert client.stdout == line
        assert "mode E" in status
        # the status after the close names the generation in use
        assert ", generation " in status.splitlines()[-3], status
        assert server.wait(timeout=COMMAND_TIMEOUT) == 0


def test_status_line_of_mode_e_keys_not_in_use_yet() -> None:
    # an E connection whose peer has not confirmed the first keys: they
    # came from TLS (fingerprint) but protect nothing yet
    waiting = "waiting for the peer to confirm the keys (NEW_KEY)"
    info = mptls.MptcpInfo(
        backend="userspace",
        mode="E",
        local_token="0a0b0c0d",
        remote_token="01020304",
        keys_installed=False,
        keys_reason=waiting,
        key_fingerprint="1a2b3c4d",
    )
    keys = netcat.describe_connection(info)[2]
    assert (
        keys
        == f"keys from TLS, fingerprint 1a2b3c4d, not in use yet: {waiting}"
    )
    confirmed = dataclasses.replace(
        info, keys_installed=True, keys_reason="", key_generation=2
    )
    keys = netcat.describe_connection(confirmed)[2]
    assert keys == "keys from TLS, fingerprint 1a2b3c4d, generation 2"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--workers", "2"], "several workers"),
        (["--server-id", "3"], "server_id"),
    ],
)
def test_serve_refuses_mode_e_where_tokens_route_joins(
    certs: Path, options: list[str], match: str
) -> None:
    result = run_mptls(*served_by(certs), "--mode", "e", *options)
    error = result.stderr.decode()
    assert result.returncode == 2, error
    [line] = error.splitlines()
    assert line.startswith("mptls: error: ") and match in line


def test_serve_and_connect_echo_a_line(certs: Path) -> None:
    with serving(certs, "--echo", "--once") as (server, port):
        line = b"hello over two paths\n"
        client = run_mptls(
            *connect_args(port, certs),
            "--paths",
            "127.0.0.1,127.0.0.2",
            "--happy-eyeballs-delay",
            "0.25",
            stdin=line,
        )
        assert client.returncode == 0, client.stderr.decode()
        assert client.stdout == line
        assert server.wait(timeout=COMMAND_TIMEOUT) == 0


async def test_an_idle_client_holds_up_no_echo_client(certs: Path) -> None:
    with serving(certs, "--echo") as (_, port):
        # a client that connects and says nothing, for the whole test
        _, idle = await mptls.open_connection(
            "127.0.0.1",
            int(port),
            ssl=mptls.TLSConfig(cafile=certs / "ca.pem"),
            server_hostname="localhost",
        )
        try:
            line = b"not kept waiting\n"
            client = await asyncio.to_thread(
                run_mptls, *connect_args(port, certs), stdin=line
            )
            assert client.returncode == 0, client.stderr.decode()
            assert client.stdout == line
        finally:
            idle.close()


def test_stopped_server_fails_a_client_with_input_left(certs: Path) -> None:
    with serving(certs) as (server, port):
        client = subprocess.Popen(
            [sys.executable, "-m", "mptls", *connect_args(port, certs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert client.stdin is not None and server.stdout is not None
            client.stdin.write(b"first line\n")
            client.stdin.flush()
            # the server prints it: the connection is up
            assert (
                readline_within(server.stdout, COMMAND_TIMEOUT)
                == b"first line\n"
            )

            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=COMMAND_TIMEOUT) == 0
            # stdin is still open, yet the client sees the end and exits;
            # input it could not send is lost, and that is no success
            _, error = client.communicate(timeout=COMMAND_TIMEOUT)
            assert client.returncode == 1, error.decode()
            assert error.decode().splitlines() == [
                "mptls: error: the server closed before the end of the input "
                "reached it"
            ]
        finally:
            reap(client)


async def test_a_killed_server_ends_a_client_in_one_line(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mptls")
    with serving(certs) as (server, port):
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            int(port),
            ssl=mptls.TLSConfig(cafile=str(certs / "ca.pem")),
            path_loss_timeout=1.0,
        )
        try:
            writer.write(b"first line\n")
            await writer.drain()
            assert server.stdout is not None
            assert (
                readline_within(server.stdout, COMMAND_TIMEOUT)
                == b"first line\n"
            )
            server.kill()
            server.wait(timeout=COMMAND_TIMEOUT)
            # every rejoin is refused until path_loss_timeout ends it
            with pytest.raises(MptlsTimeoutError, match="every path"):
                await asyncio.wait_for(reader.read(), COMMAND_TIMEOUT)
        finally:
            writer.close()
    attempts = [
        record
        for record in caplog.records
        if "cannot open a subflow" in record.getMessage()
    ]
    assert attempts, "no rejoin was tried"
    # shown with -v or --debug only, and with no "None" for the address
    assert {record.levelno for record in attempts} == {logging.INFO}
    assert all(
        "from any local address to 127.0.0.1:" in record.getMessage()
        for record in attempts
    )


@pytest.mark.parametrize(
    ("served", "argv", "hint"),
    [
        ([], [], "(pass the server's CA with --cafile)"),
        (
            [],
            ["--cafile", "ca.pem", "--mode", "rfc8684"],
            "(the server may not accept --mode rfc8684)",
        ),
        (
            [],
            ["--cafile", "ca.pem", "--mode", "e"],
            "(the server may not accept --mode E)",
        ),
        (
            ["--mode", "E"],
            ["--cafile", "ca.pem"],
            "(the server may not accept --mode G)",
        ),
    ],
    ids=["no-cafile", "rfc8684-to-G", "E-to-G", "G-to-E"],
)
def test_failed_handshakes_say_what_to_try(
    certs: Path, served: list[str], argv: list[str], hint: str
) -> None:
    with serving(certs, *served) as (_, port):
        client = run_mptls(
            "connect", "127.0.0.1", port, *argv, cwd=certs, stdin=b"x\n"
        )
    error = client.stderr.decode()
    assert client.returncode == 1, error
    [line] = error.splitlines()
    assert line.startswith("mptls: error: ")
    assert line.endswith(hint)


def test_a_cafile_of_another_ca_is_named_in_the_hint(
    certs: Path, tmp_path: Path
) -> None:
    # a CA was given, but not the server's: "pass the server's CA" would
    # tell the user to do what they did; the hint names the file instead
    other = tmp_path / "other"
    other.mkdir()
    write_development_certs(other)
    with serving(certs) as (_, port):
        client = run_mptls(
            "connect",
            "127.0.0.1",
            port,
            "--cafile",
            str(other / "ca.pem"),
            stdin=b"x\n",
        )
    error = client.stderr.decode()
    assert client.returncode == 1, error
    [line] = error.splitlines()
    assert line.startswith("mptls: error: server certificate verify failed")
    assert line.endswith(
        f"(its chain does not lead to the CA in --cafile {other / 'ca.pem'})"
    )


# refused clients, as `serve -v` shows them


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_serve_v_says_which_client_it_refused_and_why(
    certs: Path, workers: list[str]
) -> None:
    # a worker's lines say which worker printed them
    label = r"worker [01]: " if workers else ""
    refused = re.compile(label + r"refused 127\.0\.0\.1:\d+: ")
    with serving(certs, "-v", *workers) as (server, port):
        assert server.stderr is not None
        wrong_mode = run_mptls(
            *connect_args(port, certs), "--mode", "E", stdin=b"x\n"
        )
        assert wrong_mode.returncode == 1, wrong_mode.stderr.decode()
        line = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        assert refused.match(line), line
        assert line.endswith(
            ": the client asked for mode E, this server allows G\n"
        )

        # a client without the server's CA ends the TLS handshake
        untrusting = run_mptls("connect", "127.0.0.1", port, stdin=b"x\n")
        assert untrusting.returncode == 1, untrusting.stderr.decode()
        line = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        assert refused.match(line), line
        assert "TLS handshake failed: peer sent TLS alert unknown_ca" in line


def _refused_by(port: str) -> None:
    """A plain HTTP client: the server ends it as not mptls. Returns
    once the server has closed it, so the refusal has been counted."""
    with socket.create_connection(
        ("127.0.0.1", int(port)), timeout=COMMAND_TIMEOUT
    ) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            while client.recv(4096):
                pass


def test_serve_v_says_how_many_refusals_it_held_back_when_it_stops(
    certs: Path,
) -> None:
    # past the first 20 in 10 s, refusals are counted, and the count is
    # said when the 10 s end; a server stopped sooner says it on its
    # way out
    with serving(certs, "-v") as (server, port):
        assert server.stderr is not None
        for _ in range(20):
            _refused_by(port)
            line = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
            assert line.startswith("refused 127.0.0.1:"), line
        for _ in range(3):
            _refused_by(port)
        server.send_signal(signal.SIGTERM)
        _, error = server.communicate(timeout=COMMAND_TIMEOUT)
    assert server.returncode == 0, error.decode()
    assert error.decode().startswith(
        "refused 3 more peers within 10 s, not shown one by one"
    ), error.decode()


def test_serve_workers_say_how_many_refusals_they_held_back_when_they_stop(
    certs: Path,
) -> None:
    # each worker keeps its own count; a worker stopped before its 10 s
    # end says it on its way out, as one process does. 60 refusals over
    # 2 workers: one of them had at least 30, more than its 20 shown
    flood = 60
    with serving(certs, "-v", "--workers", "2") as (server, port):
        for _ in range(flood):
            _refused_by(port)
        server.send_signal(signal.SIGTERM)
        _, error = server.communicate(timeout=COMMAND_TIMEOUT)
    assert server.returncode == 0, error.decode()
    # each worker's lines begin with its id
    lines = [
        line.removeprefix("worker 0: ").removeprefix("worker 1: ")
        for line in error.decode().splitlines()
        if re.match(r"worker [01]: ", line)
    ]
    shown = [line for line in lines if line.startswith("refused 127.0.0.1:")]
    counted = [
        int(line.split()[1])
        for line in lines
        if line.startswith("refused ") and " more peer" in line
    ]
    assert counted, error.decode()
    # every refusal is told, one by one or in a count
    assert len(shown) + sum(counted) == flood, error.decode()


def test_serve_without_v_prints_no_refusal(certs: Path) -> None:
    with serving(certs) as (server, port):
        wrong_mode = run_mptls(
            *connect_args(port, certs), "--mode", "E", stdin=b"x\n"
        )
        assert wrong_mode.returncode == 1, wrong_mode.stderr.decode()
        # the server logs a refusal before it sends the reset; a client
        # served after it shows the server went on
        served = run_mptls(*connect_args(port, certs), stdin=b"hello\n")
        assert served.returncode == 0, served.stderr.decode()
        server.send_signal(signal.SIGTERM)
        output, error = server.communicate(timeout=COMMAND_TIMEOUT)
    assert server.returncode == 0, error.decode()
    assert output == b"hello\n"
    # nothing after "listening on ...", which serving() read
    assert error == b""


async def test_serve_listens_on_a_name_or_an_address() -> None:
    assert await netcat._listen_address("[::1]") == "::1"
    # a name of the machine's own, resolved without any query sent out
    assert await netcat._listen_address("localhost") in {"127.0.0.1", "::1"}


def test_serve_help_shows_its_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli_main.main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "IP address or name to listen on" in shown
    assert "(default: 127.0.0.1)" in shown
    assert "(default: 4433)" in shown


def test_connect_help_says_what_host_port_and_paths_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # host and port had no help text, and --paths no default
    with pytest.raises(SystemExit):
        cli_main.main(["connect", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "host the server's IP address or name" in shown
    assert "port the server's TCP port" in shown
    assert "(default: one subflow, from the address the system picks" in (
        shown
    )


def test_info_json_is_the_kernel_report() -> None:
    result = run_mptls("info", "--json")
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    # the probe's own fields, about this machine's kernel
    assert report["kernel_release"] == platform.release()
    assert {"enabled", "getsockopts", "external_keys"} <= set(report)


def test_python_m_runs_the_command() -> None:
    result = run_mptls("--version")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("mptls ")


def test_serve_once_with_its_output_closed_fails(certs: Path) -> None:
    with serving(certs, "--once") as (server, port):
        assert server.stdout is not None
        # whoever read the server's output went away (``| head``)
        server.stdout.close()
        client = run_mptls(
            *connect_args(port, certs),
            stdin=b"nobody reads this\n",
        )
        assert server.wait(timeout=COMMAND_TIMEOUT) == 1
        assert server.stderr is not None
        assert server.stderr.read().decode().splitlines() == [
            "mptls: error: output closed"
        ]
        # the server never read it all: the client says so in one line
        assert client.returncode == 1
        lines = client.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mptls: error: ")


def test_connect_with_its_output_closed_fails(certs: Path) -> None:
    with serving(certs, "--echo", "--once") as (server, port):
        client = _run_into_a_closed_pipe(
            *connect_args(port, certs), stdin=b"echoed to nobody\n" * 1000
        )
        server.wait(timeout=COMMAND_TIMEOUT)
    # one line, no thread traceback, no warning about an unawaited put
    assert client.returncode == 1
    assert client.stderr.decode().splitlines() == [
        "mptls: error: output closed"
    ]


def test_connect_says_the_server_aborted_when_its_output_closed(
    certs: Path, tmp_path: Path
) -> None:
    # ``serve | head -c 10`` and a client still sending: the server
    # aborts (MP_FASTCLOSE). About one run in two the client said only
    # asyncio's "Connection lost", the reset hidden behind drain()
    upload = tmp_path / "upload"
    upload.write_bytes(random.Random(17).randbytes(8 << 20))
    for _ in range(4):
        with (
            serving(certs) as (server, port),
            upload.open("rb") as stdin,
        ):
            client = subprocess.Popen(
                [sys.executable, "-m", "mptls", *connect_args(port, certs)],
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            assert server.stdout is not None
            assert len(server.stdout.read(10)) == 10
            server.stdout.close()
            try:
                _, error = client.communicate(timeout=COMMAND_TIMEOUT)
            finally:
                reap(client)
            assert server.wait(timeout=COMMAND_TIMEOUT) == 1
        assert client.returncode == ExitStatus.FAILURE
        lines = error.decode().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(
            "mptls: error: the server aborted the connection (MP_FASTCLOSE)"
        ), lines


@contextlib.contextmanager
def client_in_mid_send(
    server: subprocess.Popen[bytes],
    port: str,
    certs: Path,
    stderr: int = subprocess.DEVNULL,
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``connect`` to ``server`` that has sent 64 KiB and not ended its
    input, once the server printed some of it: the connection is up.
    Killed on the way out if it is still running."""
    client = subprocess.Popen(
        [sys.executable, "-m", "mptls", *connect_args(port, certs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        assert client.stdin is not None
        client.stdin.write(b"x" * 65536)
        client.stdin.flush()
        assert server.stdout is not None
        assert len(server.stdout.read(1000)) == 1000
        yield client
    finally:
        reap(client)


@STOPPING_SIGNALS
def test_connect_interrupted_before_the_end_of_input_aborts(
    certs: Path, signum: signal.Signals, status: ExitStatus
) -> None:
    # Ctrl-C while stdin still had input: an orderly close (close_notify,
    # DATA_FIN) told the server that the input had ended, so ``serve
    # --once`` exited 0 with a truncated copy of it. SIGTERM (timeout,
    # a service manager) killed the client outright: the server heard
    # nothing and waited path_loss_timeout for the paths to come back
    with serving(certs, "--once") as (server, port):
        with client_in_mid_send(
            server, port, certs, stderr=subprocess.PIPE
        ) as client:
            client.send_signal(signum)
            assert client.wait(timeout=COMMAND_TIMEOUT) == status
        assert server.wait(timeout=COMMAND_TIMEOUT) == ExitStatus.FAILURE
        assert server.stderr is not None
        lines = server.stderr.read().decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mptls: error: connection from 127.0.0.1:")


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"]
)
def test_serve_once_stopped_during_its_connection_fails(
    certs: Path, signum: signal.Signals
) -> None:
    # ``serve --once > FILE`` stopped (Ctrl-C, SIGTERM) while its client
    # was still sending exited 0, without a word: FILE held a truncated
    # copy that its exit status called complete
    with serving(certs, "--once") as (server, port):
        with client_in_mid_send(server, port, certs):
            server.send_signal(signum)
            assert server.wait(timeout=COMMAND_TIMEOUT) == ExitStatus.FAILURE
        assert server.stderr is not None
        lines = server.stderr.read().decode().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"mptls: error: stopped before the connection from "
        r"127\.0\.0\.1:\d+ ended: what it sent may be incomplete",
        lines[0],
    ), lines


@pytest.mark.parametrize(
    ("options", "prefix"),
    [((), ""), (("--workers", "2"), r"worker \d: ")],
    ids=["one-process", "workers"],
)
def test_serve_stopped_during_a_connection_says_so(
    certs: Path, options: tuple[str, ...], prefix: str
) -> None:
    # a server that prints clients' input is stopped as it should be,
    # and exits 0, but said nothing of the client it cut short (with
    # --workers, the worker aborted it after its grace, silently)
    with serving(certs, *options) as (server, port):
        with client_in_mid_send(server, port, certs):
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=COMMAND_TIMEOUT) == ExitStatus.OK
        assert server.stderr is not None
        lines = server.stderr.read().decode().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        prefix + r"mptls: stopped before the connection from "
        r"127\.0\.0\.1:\d+ ended: what it sent may be incomplete",
        lines[0],
    ), lines


# Ctrl-C at a known moment of the command's start: a finder first on the
# import path raises KeyboardInterrupt, as the SIGINT handler does, when
# the named module is about to be imported
_INTERRUPTED_AT_IMPORT = """
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["mptls", "info"]
"""

# each way in as it calls the entry point: the console script pip writes
# imports the entry point's function and exits with what it returns
_ENTRY_POINTS = {
    "console script": (
        "from importlib.metadata import entry_points\n"
        "(script,) = entry_points(group='console_scripts', name='mptls')\n"
        "sys.exit(script.load()())\n"
    ),
    "python -m": (
        "import runpy\n"
        "runpy.run_module('mptls', run_name='__main__', alter_sys=True)\n"
    ),
}


@pytest.mark.parametrize("entry", list(_ENTRY_POINTS))
@pytest.mark.parametrize(
    "module", ["mptls.cli.common", "OpenSSL.SSL", "rich.console"]
)
def test_ctrl_c_while_the_command_imports_is_no_traceback(
    entry: str, module: str
) -> None:
    # the console script imported every command's modules before the
    # command's guard: a Ctrl-C in that third of a second printed
    # KeyboardInterrupt's traceback
    script = _INTERRUPTED_AT_IMPORT.format(module=module)
    done = subprocess.run(
        [sys.executable, "-c", script + _ENTRY_POINTS[entry]],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert (done.returncode, done.stderr) == (ExitStatus.INTERRUPTED, "")
    assert done.stdout == ""


def _closed_pipe() -> int:
    """The write end of a pipe whose reader has gone (``| head``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def _full_file() -> int:
    """A descriptor that takes nothing (ENOSPC), or a skip without one."""
    if not _FULL.exists():
        pytest.skip("no /dev/full on this system")
    return os.open(_FULL, os.O_WRONLY)


@pytest.mark.parametrize(
    ("output", "said"),
    [
        (_closed_pipe, "output closed"),
        (_full_file, "output failed: No space left on device"),
    ],
    ids=["closed", "full"],
)
def test_serve_workers_stop_when_their_output_takes_nothing(
    certs: Path, output: Callable[[], int], said: str
) -> None:
    # each worker reset its client and went on: the server served on,
    # printing nothing, until a signal ended it with status 0
    stdout = output()
    server = subprocess.Popen(
        [sys.executable, "-m", "mptls", *served_by(certs), "--workers", "2"],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    os.close(stdout)
    try:
        assert server.stderr is not None
        listening = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        port = listening.rsplit(":", 1)[1].split()[0]
        workers = worker_pids(server.pid)
        assert len(workers) == 2
        client = run_mptls(*connect_args(port, certs), stdin=b"lost\n")
        # the client hears its data went nowhere
        assert client.returncode == 1
        # and the server stops by itself, as one process does
        _, error = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        reap(server)
    assert error.decode().splitlines() == [f"mptls: error: {said}"]
    assert server.returncode == ExitStatus.FAILURE
    # the parent stopped its workers before it exited
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _run_into_a_closed_pipe(
    *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``mptls`` with a stdout whose reader has gone (``| head``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mptls", *args],
            input=stdin,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    finally:
        os.close(write_end)


# a stderr nobody reads: status lines are dropped, the command goes on

# runs mptls with descriptor 2 closed before the interpreter starts, as
# a shell's ``2>&-`` does
_STDERR_CLOSED = (
    "import os, sys; os.close(2); "
    "os.execv(sys.executable, [sys.executable, '-m', 'mptls', *sys.argv[1:]])"
)


def test_a_closed_stderr_keeps_status_lines_off_stdout(certs: Path) -> None:
    # with no stderr at all, the status lines went to stdout, into the
    # data the command prints
    with serving(certs, "--echo", "--once") as (server, port):
        argv = [*connect_args(port, certs), "-v"]
        client = subprocess.run(
            [sys.executable, "-c", _STDERR_CLOSED, *argv],
            input=b"only this\n",
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert server.wait(timeout=COMMAND_TIMEOUT) == 0
    assert client.returncode == 0
    assert client.stdout == b"only this\n"
    assert client.stderr == b""


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_serve_goes_on_when_nobody_reads_its_stderr(
    certs: Path, workers: list[str]
) -> None:
    # the reader of its status lines went away: the first line after
    # that ended the server (or the worker that wrote it) silently
    with serving(certs, "-v", *workers) as (server, port):
        assert server.stderr is not None and server.stdout is not None
        server.stderr.close()
        _refused_by(port)
        client = run_mptls(*connect_args(port, certs), stdin=b"hello\n")
        assert client.returncode == 0, client.stderr.decode()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=COMMAND_TIMEOUT) == 0
        # the client's data, and nothing of the status lines
        assert server.stdout.read() == b"hello\n"


# no stdout at all (``>&-``): as one whose reader has gone

# runs mptls with descriptor 1 closed before the interpreter starts
_STDOUT_CLOSED = _STDERR_CLOSED.replace("os.close(2)", "os.close(1)")


def _no_stdout(*args: str) -> list[str]:
    return [sys.executable, "-c", _STDOUT_CLOSED, *args]


def test_a_report_with_no_stdout_says_output_closed() -> None:
    # the report went nowhere and the command said nothing, status 0
    result = subprocess.run(
        _no_stdout("info"),
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "mptls: error: output closed"
    ]


def test_serve_once_with_no_stdout_fails(certs: Path) -> None:
    # the client's data went to a stdout of None: a traceback from the
    # handler, and a server that never stopped
    server = subprocess.Popen(
        _no_stdout(*served_by(certs), "--once"),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stderr is not None
        listening = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        port = listening.rsplit(":", 1)[1].split()[0]
        client = run_mptls(
            *connect_args(port, certs), stdin=b"nowhere to print\n"
        )
        assert server.wait(timeout=COMMAND_TIMEOUT) == 1
        assert server.stderr.read().decode().splitlines() == [
            "mptls: error: output closed"
        ]
        assert client.returncode == 1
    finally:
        reap(server)


# a stderr that takes nothing (a full disk, /dev/full): as one nobody
# reads, its lines are dropped and the command goes on

_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(
    not _FULL.exists(), reason="no /dev/full on this system"
)


def _run_with_a_full_stderr(
    *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``mptls`` with every write to stderr failing (ENOSPC)."""
    with _FULL.open("wb") as full:
        return subprocess.run(
            [sys.executable, "-m", "mptls", *args],
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=full,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )


@needs_dev_full
def test_a_full_stderr_drops_the_status_lines_and_the_command_goes_on(
    certs: Path,
) -> None:
    # the first status line failed with ENOSPC, the error line after it
    # too: the command ended with status 1 before it sent a byte
    with serving(certs, "--echo", "--once") as (server, port):
        client = _run_with_a_full_stderr(
            *connect_args(port, certs), "-v", stdin=b"still echoed\n"
        )
        assert server.wait(timeout=COMMAND_TIMEOUT) == 0
    assert client.returncode == 0
    assert client.stdout == b"still echoed\n"


@needs_dev_full
def test_a_full_stderr_leaves_the_exit_status_to_tell_the_error() -> None:
    # a port nobody holds: status 2 as with a working stderr, not the
    # interpreter's 1 for an error line it could not write
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run_with_a_full_stderr(
        "connect", "127.0.0.1", str(port), "--insecure"
    )
    assert result.returncode == 2
    assert result.stdout == b""


@pytest.mark.parametrize(
    "argv",
    [["info"], ["info", "--json"], ["certs", "--dir", "{tmp}"]],
    ids=["table", "json", "certs"],
)
def test_a_report_to_a_closed_output_says_output_closed(
    argv: list[str], tmp_path: Path
) -> None:
    # the report commands print through rich or as JSON, not as serve
    # and connect do; a closed stdout reads the same for all of them
    args = [arg.format(tmp=tmp_path / "certs") for arg in argv]
    result = _run_into_a_closed_pipe(*args)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "mptls: error: output closed"
    ]


# a stdout that takes nothing (a full disk, /dev/full): the result is
# lost, a failure as a closed stdout is, not bad input

_OUTPUT_FULL = "mptls: error: output failed: No space left on device"


def _run_with_a_full_stdout(
    *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``mptls`` with every write to stdout failing (ENOSPC)."""
    with _FULL.open("wb") as full:
        return subprocess.run(
            [sys.executable, "-m", "mptls", *args],
            input=stdin,
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )


@needs_dev_full
@pytest.mark.parametrize(
    "argv",
    [
        ["info"],
        ["info", "--json"],
        ["certs", "--dir", "{tmp}/certs"],
        ["demo", "--file", "{tmp}/small", "--quiet"],
        ["demo", "--file", "{tmp}/small", "--json"],
    ],
    ids=["table", "json", "certs", "demo", "demo-json"],
)
def test_a_report_to_a_full_output_is_a_failure(
    argv: list[str], tmp_path: Path
) -> None:
    # ENOSPC reached the command line's boundary as an OSError, which
    # reads as bad input: status 2, and a line that did not say where
    (tmp_path / "small").write_bytes(b"a small payload\n" * 64)
    args = [arg.format(tmp=tmp_path) for arg in argv]
    result = _run_with_a_full_stdout(*args)
    assert result.stderr.decode().splitlines() == [_OUTPUT_FULL]
    assert result.returncode == ExitStatus.FAILURE


@pytest.mark.parametrize(
    "argv",
    [["--version"], ["--help"], ["connect", "--help"]],
    ids=["version", "help", "command-help"],
)
@pytest.mark.parametrize("output", ["full", "closed"])
def test_version_and_help_to_an_output_that_takes_nothing_fail(
    argv: list[str], output: str
) -> None:
    # argparse drops a failed write of its own: status 0, and nothing
    # printed anywhere
    if output == "full":
        if not _FULL.exists():
            pytest.skip("no /dev/full on this system")
        result = _run_with_a_full_stdout(*argv)
        said = _OUTPUT_FULL
    else:
        result = _run_into_a_closed_pipe(*argv)
        said = "mptls: error: output closed"
    assert result.stderr.decode().splitlines() == [said]
    assert result.returncode == ExitStatus.FAILURE
    assert run_mptls(*argv).returncode == ExitStatus.OK


@needs_dev_full
def test_bad_input_with_a_full_output_is_still_bad_input(
    tmp_path: Path,
) -> None:
    written = run_mptls("certs", "--dir", str(tmp_path))
    assert written.returncode == 0
    refused = _run_with_a_full_stdout("certs", "--dir", str(tmp_path))
    assert refused.returncode == ExitStatus.USAGE
    assert "refusing to overwrite" in refused.stderr.decode()
    missing = _run_with_a_full_stdout("demo", "--file", str(tmp_path / "x"))
    assert missing.returncode == ExitStatus.USAGE
    assert "file not found" in missing.stderr.decode()


@needs_dev_full
def test_connect_with_a_full_output_fails(certs: Path) -> None:
    with serving(certs, "--echo", "--once") as (server, port):
        client = _run_with_a_full_stdout(
            *connect_args(port, certs), stdin=b"echoed into a full disk\n"
        )
        server.wait(timeout=COMMAND_TIMEOUT)
    assert client.stderr.decode().splitlines() == [_OUTPUT_FULL]
    assert client.returncode == ExitStatus.FAILURE


@needs_dev_full
def test_serve_with_a_full_output_stops(certs: Path) -> None:
    # each client failed with a line of its own and the server went on,
    # printing nothing, until a signal ended it with status 0
    with _FULL.open("wb") as full:
        server = subprocess.Popen(
            [sys.executable, "-m", "mptls", *served_by(certs)],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
        )
    try:
        assert server.stderr is not None
        listening = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        port = listening.rsplit(":", 1)[1].split()[0]
        client = run_mptls(*connect_args(port, certs), stdin=b"no room\n")
        assert server.wait(timeout=COMMAND_TIMEOUT) == ExitStatus.FAILURE
        assert server.stderr.read().decode().splitlines() == [_OUTPUT_FULL]
        # its data went nowhere: the client hears of it
        assert client.returncode == ExitStatus.FAILURE
    finally:
        reap(server)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--rounds", "many"],
        ["serve", "--workers", "two"],
        ["demo", "--timeout", "soon"],
        ["connect", "127.0.0.1", "4433", "--mode", "H"],
        ["connect", "127.0.0.1", "4433", "--backend", "carrier-pigeon"],
        ["connect"],
        ["frobnicate"],
    ],
)
def test_argument_errors_are_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        cli_main.main(argv)
    assert raised.value.code == ExitStatus.USAGE
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mptls: error: argument ") or lines[
        0
    ].startswith("mptls: error: the following arguments are required")


@pytest.fixture
def mptls_log_level() -> Iterator[None]:
    """Puts the mptls logger's level back after a test ran ``--debug``."""
    chosen = logging.getLogger("mptls")
    level = chosen.level
    yield
    chosen.setLevel(level)


def test_debug_turns_on_mptls_debug_lines_only(
    mptls_log_level: None,
) -> None:
    script = (
        "import logging, sys\n"
        "from mptls.cli import commands\n"
        "commands._configure_logging(True)\n"
        "logging.getLogger('mptls.userspace').debug('ours')\n"
        "logging.getLogger('pyroute2.netlink').debug('netlink dump')\n"
        "logging.getLogger('asyncio').debug('slow callback')\n"
        "logging.getLogger('pyroute2').warning('theirs, a warning')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stderr.splitlines() == [
        "DEBUG mptls.userspace: ours",
        "WARNING pyroute2: theirs, a warning",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "bench", "no-such-scenario"],
        ["bench", "no-such-scenario", "--debug"],
    ],
)
def test_debug_goes_before_or_after_the_command(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    mptls_log_level: None,
) -> None:
    assert cli_main.main(argv) == ExitStatus.USAGE
    # --debug logs the traceback the one-line error otherwise hides
    failed = [r for r in caplog.records if r.getMessage() == "command failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    error = capsys.readouterr().err
    assert error.splitlines()[-1].startswith("mptls: error: unknown scenario")


def test_without_debug_no_traceback_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert cli_main.main(["bench", "no-such-scenario"]) == ExitStatus.USAGE
    assert not [r for r in caplog.records if r.exc_info is not None]


def test_rounds_help_gives_the_range() -> None:
    parser = commands.build_parser()
    subparsers = next(
        action
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    bench_help = " ".join(subparsers.choices["bench"].format_help().split())
    assert "1 to 100" in bench_help


@pytest.fixture
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``run_scenarios`` replaced: records what it was asked to run and
    writes nothing, but notes each JSON file as written, as the real
    one does once it wrote it."""
    import mptls.bench

    runs: list[list[str]] = []

    def fake(
        names: list[str],
        options: object,
        *,
        output: Path,
        record: RunRecord,
        **_: object,
    ) -> list[ScenarioResult]:
        runs.append(list(names))
        results = []
        for name in names:
            record.written.append(output / f"{name}.json")
            results.append(
                ScenarioResult(
                    name=name,
                    title=name,
                    unit="MB/s",
                    higher_is_better=True,
                    rounds=1,
                    quick=True,
                )
            )
        return results

    monkeypatch.setattr(mptls.bench, "run_scenarios", fake)
    return runs


@pytest.mark.parametrize("kind", ["file", "dangling symlink"])
def test_bench_output_that_is_no_directory_fails_before_measuring(
    kind: str,
    tmp_path: Path,
    no_measuring: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "results"
    if kind == "file":
        output.write_text("not a directory\n", encoding="utf-8")
    else:
        output.symlink_to(tmp_path / "nowhere")
    status = cli_main.main(["bench", "bulk", "--output", str(output)])
    assert status == ExitStatus.USAGE
    assert no_measuring == []
    assert capsys.readouterr().err.splitlines() == [
        f"mptls: error: --output {output} is not a directory"
    ]


def test_bench_output_must_be_named(
    no_measuring: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main.main(["bench", "bulk", "--output", ""]) == 2
    assert no_measuring == []
    assert capsys.readouterr().err.startswith("mptls: error: --output ")


def test_bench_output_is_created_and_files_written_are_named(
    tmp_path: Path,
    no_measuring: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "new" / "results"
    argv = ["bench", "bulk", "paths", "--output", str(output)]
    assert cli_main.main(argv) == ExitStatus.OK
    assert no_measuring == [["bulk", "paths"]]
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"wrote {output / 'bulk.json'}, {output / 'paths.json'}"


@pytest.mark.parametrize(
    ("code", "asyncio_text", "reason"),
    [
        (
            errno.ECONNREFUSED,
            "Connect call failed ('127.0.0.1', 9)",
            "connection refused",
        ),
        (
            errno.EADDRINUSE,
            "error while attempting to bind on address ('127.0.0.1', 9): "
            "address already in use",
            "address already in use",
        ),
    ],
)
def test_os_refusals_are_said_in_short(
    code: int, asyncio_text: str, reason: str
) -> None:
    what = (
        "cannot connect to"
        if code == errno.ECONNREFUSED
        else "cannot listen on"
    )
    error = ConnectError(code, f"{what} 127.0.0.1:9: {asyncio_text}")
    assert describe_error(error) == f"{what} 127.0.0.1:9: {reason}"


def test_announce_errors_name_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["serve", "--announce", "127.0.0.1:70000"]
    assert cli_main.main(argv) == ExitStatus.USAGE
    assert capsys.readouterr().err.splitlines() == [
        "mptls: error: --announce 127.0.0.1:70000: port out of range "
        "0-65535: 70000"
    ]


def test_kernel_announce_with_another_port_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # the kernel announces a signal endpoint on each connection's own
    # port: a port given here went nowhere, clients joined on --port
    missing = str(tmp_path / "missing.pem")
    argv = ["serve", "--backend", "kernel", "--port", "4433"]
    argv += ["--announce", "127.0.0.2:5000", "--cert", missing]
    argv += ["--key", missing]
    assert cli_main.main(argv) == ExitStatus.USAGE
    assert capsys.readouterr().err.splitlines() == [
        "mptls: error: --announce 127.0.0.2:5000: the kernel backend "
        "announces an address on the server's own port; give the address "
        "alone"
    ]


@pytest.mark.parametrize(
    ("host", "announce", "expected"),
    [
        # the announced address on the server's port gets its listener
        ("192.0.2.2", [("198.51.100.2", 4433)], ["192.0.2.2", "198.51.100.2"]),
        # on a port of its own the userspace server does not listen there
        ("192.0.2.2", [("198.51.100.2", 5000)], "192.0.2.2"),
        # a wildcard of the family covers it: a listener of its own there
        # found the port in use
        ("0.0.0.0", [("198.51.100.2", 4433)], "0.0.0.0"),
        ("::", [("2001:db8::2", 4433)], "::"),
        ("::", [("198.51.100.2", 4433)], ["::", "198.51.100.2"]),
    ],
)
def test_listen_hosts_cover_the_announced_addresses(
    host: str, announce: list[tuple[str, int]], expected: object
) -> None:
    assert netcat.listen_hosts(host, 4433, announce) == expected


def test_kernel_announce_with_port_0_needs_a_wildcard_host(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # each listening address would get a port of its own, and joins go
    # to the server's port at the announced address
    missing = str(tmp_path / "missing.pem")
    argv = ["serve", "--backend", "kernel", "--port", "0"]
    argv += ["--announce", "127.0.0.2", "--cert", missing, "--key", missing]
    assert cli_main.main(argv) == ExitStatus.USAGE
    assert capsys.readouterr().err.splitlines() == [
        "mptls: error: with --backend kernel and --port 0, --announce "
        "needs a wildcard --host (0.0.0.0 or ::): joins reach an announced "
        "address on the server's own port"
    ]


def test_paths_of_the_other_ip_version_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # refused before any connection is tried: port 9 is never used
    argv = ["connect", "127.0.0.1", "9", "--paths", "::1", "--insecure"]
    assert cli_main.main(argv) == ExitStatus.USAGE
    assert capsys.readouterr().err.splitlines() == [
        "mptls: error: --paths ::1 is IPv6 and the server 127.0.0.1 is IPv4"
    ]


def test_a_device_is_not_a_regular_file() -> None:
    with pytest.raises(UsageError, match="file is not a regular file"):
        existing_file(os.devnull, "file")


def test_a_file_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    # a loop of links exists but opens nowhere; said before any
    # connection, with the system's reason, not as a missing file
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UsageError) as raised:
        existing_file(str(loop), "certificate file")
    reason = os.strerror(errno.ELOOP)
    assert str(raised.value) == (
        f"cannot read the certificate file {loop}: {reason}"
    )


def test_an_unreadable_file_is_refused_before_the_demo_starts(
    tmp_path: Path,
) -> None:
    # a loop of links: no user can read it, root included (a file of
    # mode 000 would not do for root, and CI runs as root)
    unreadable = tmp_path / "loop.bin"
    unreadable.symlink_to(unreadable)
    result = run_mptls("demo", "--file", str(unreadable))
    assert result.returncode == 2
    reason = os.strerror(errno.ELOOP)
    assert result.stderr.decode().splitlines() == [
        f"mptls: error: cannot read the file {unreadable}: {reason}"
    ]
    assert b"sending" not in result.stdout


def test_demo_without_net_admin_refuses_manage_paths_before_it_starts(
    tmp_path: Path,
) -> None:
    # it printed "sending ..." and failed once the kernel connect asked
    # for endpoints; without the capability nothing changes either way
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop CAP_NET_ADMIN")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x" * 1000)
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-net_admin",
            sys.executable,
            "-m",
            "mptls",
            "demo",
            "--backend",
            "kernel",
            "--manage-paths",
            "--file",
            str(payload),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("mptls: error: --manage-paths: ")
    assert "CAP_NET_ADMIN" in line
    assert b"sending" not in result.stdout


def test_connect_refuses_an_empty_server_name_and_names_in_paths(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["connect", "127.0.0.1", "9", "--server-name", ""]
    assert cli_main.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--server-name must not be empty" in line
    argv = ["connect", "127.0.0.1", "9", "--paths", "127.0.0.1,localhost"]
    assert cli_main.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "mptls: error: --paths takes IP addresses: not an IP address: "
        "'localhost'"
    )
