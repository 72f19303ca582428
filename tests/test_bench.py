"""``mptls bench --quick``: the harness works and its figures are sane.

Speed is not judged here (timed tests on shared machines prove
nothing); what is checked is that each scenario runs, gives positive
figures for every variant, computes its ratios from them and writes
JSON of the documented schema. The namespace and kernel scenarios need
root and kernel MPTCP and say why they skip otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import socket
import struct
import sys
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from netns import mptcp_unavailable_reason
from rich.console import Console

import mptls.bench as bench
from mptls.bench import connect, harness, kernel, paths, relay, stacks
from mptls.bench.common import namespaces_reason
from mptls.bench.harness import (
    ScenarioResult,
    Variant,
    VariantResult,
    interleave,
    paired_ratio,
)
from mptls.bench.peer import ChildServer
from mptls.bench.report import render
from mptls.cli.main import main

pytestmark = pytest.mark.timeout(120)


async def test_interleave_runs_a_b_a_b_and_pairs_rounds() -> None:
    order: list[str] = []
    figures = {"a": iter([4.0, 6.0, 8.0]), "b": iter([2.0, 2.0, 4.0])}

    def measure(name: str) -> float:
        order.append(name)
        return next(figures[name])

    variants = [
        Variant("a", lambda: measure("a")),
        Variant("b", lambda: measure("b")),
    ]
    results = await interleave(variants, 3, warmup=False)
    assert order == ["a", "b", "a", "b", "a", "b"]
    ratio = paired_ratio(results[0], results[1])
    assert ratio.values == (2.0, 3.0, 2.0)
    assert ratio.spread.median == 2.0
    assert (ratio.spread.low, ratio.spread.high) == (2.0, 3.0)


async def test_a_figure_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="broken"):
        await interleave([Variant("broken", lambda: 0.0)], 1, warmup=False)


def test_goals_are_judged_only_when_asked() -> None:
    assert harness.at_least("x", 1.2, 1.0).met is True
    assert harness.at_most("x", 1.6, 1.5).met is False
    assert harness.at_least("x", 0.2, 1.0, judge=False).met is None


def _check_schema(document: dict[str, Any]) -> None:
    assert document["schema"] == harness.SCHEMA
    assert document["quick"] is True
    assert document["machine"]["python"]
    names = {variant["name"] for variant in document["variants"]}
    assert len(names) >= 2
    for variant in document["variants"]:
        assert len(variant["samples"]) == document["rounds"]
        assert all(value > 0 for value in variant["samples"])
        assert variant["min"] <= variant["median"] <= variant["max"]
    assert document["ratios"], "every scenario compares something"
    for ratio in document["ratios"]:
        assert {ratio["variant"], ratio["baseline"]} <= names
        assert ratio["values"]
        assert all(v > 0 and math.isfinite(v) for v in ratio["values"])
    for goal in document["goals"]:
        assert set(goal) == {"name", "value", "target", "met", "note"}


def _run_quick(scenario: str, output: Path) -> dict[str, Any]:
    status = main(
        ["bench", scenario, "--quick", "--output", str(output), "--plot"]
    )
    assert status == 0
    document: dict[str, Any] = json.loads(
        (output / f"{scenario}.json").read_text(encoding="utf-8")
    )
    assert (output / f"{scenario}.png").stat().st_size > 0
    return document


@pytest.mark.parametrize("scenario", ["bulk", "memory"])
def test_quick_loopback_scenarios(scenario: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _check_schema(_run_quick(scenario, tmp_path))


def test_quick_connect_times_joins_on_loopback_and_relayed(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    document = _run_quick("connect", tmp_path)
    _check_schema(document)
    details = document["details"]
    for side in ("client", "server"):
        for path in ("relayed", "loopback"):
            join = details[f"join ({side}, {path})"]
            assert join["second_subflow_data_ms"]["min"] > 0
            assert len(join["trials"]) == 2 * document["rounds"]
        # the relayed round trip is at least the relay's two delays
        relayed = details[f"join ({side}, relayed)"]["echo_rtt_ms"]
        assert relayed["min"] >= 2 * details["relay_one_way_delay_ms"]


async def test_the_join_probe_times_the_write_a_join_carried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the second write is the one a join carries: the probe must stop
    # right after it, not after the drain and the pause that follow
    class Writer:
        def __init__(self) -> None:
            self.writes = 0
            self.drains = 0

        def write(self, data: bytes) -> None:
            self.writes += 1

        async def drain(self) -> None:
            self.drains += 1

        def get_extra_info(self, name: str) -> SimpleNamespace:
            assert name == "mptcp"
            sent = 1024 if self.writes >= 2 else 0
            subflows = [SimpleNamespace(bytes_sent=1024)] * 2
            subflows[1] = SimpleNamespace(bytes_sent=sent)
            return SimpleNamespace(subflows=subflows)

    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(connect.asyncio, "sleep", pause)
    writer = Writer()
    started = connect.time.perf_counter()
    taken = await connect._trickle_until_joined(
        writer,  # type: ignore[arg-type]
        started,
        3.0,
    )
    assert writer.writes == 2
    assert writer.drains == 1
    assert pauses == [3.0]
    assert 0 <= taken < connect.JOIN_LIMIT


def test_quick_tokens_find_no_search_for_server_ids(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    document = _run_quick("tokens", tmp_path)
    _check_schema(document)
    goals = {goal["name"]: goal for goal in document["goals"]}
    assert goals["mptls draws to carry a server id"]["met"] is True
    # an 8-bit id costs RFC 8684 about 256 draws; allow for chance
    draws = document["details"]["rfc8684_draws_per_server_id_token"]
    assert 64 < draws < 1024


def test_quick_keys_scenario(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    document = _run_quick("keys", tmp_path)
    _check_schema(document)
    names = {variant["name"] for variant in document["variants"]}
    assert "rotation" in names
    # each operation is a small share of a whole handshake
    for ratio in document["ratios"]:
        assert ratio["median"] < 1.0


@pytest.mark.kernel
def test_quick_kernel_scenario(tmp_path: Path) -> None:
    reason = mptcp_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("matplotlib")
    document = _run_quick("kernel", tmp_path)
    _check_schema(document)
    ratios = {(r["variant"], r["baseline"]) for r in document["ratios"]}
    assert ("mptls-kernel@loopback", "ssl@loopback") in ratios
    # the loopback line says why it is not judged
    assert kernel.LOOPBACK_NOTE in document["notes"]
    if namespaces_reason() is None:
        # the judged line: the same three stacks on one veth path
        assert ("mptls-kernel@veth", "ssl@veth") in ratios
        assert "veth_skipped" not in document["details"]
    else:
        assert document["details"]["veth_skipped"]


@pytest.mark.root
def test_quick_paths_scenario(tmp_path: Path) -> None:
    reason = namespaces_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("matplotlib")
    document = _run_quick("paths", tmp_path)
    _check_schema(document)
    shares = document["details"]["share_of_sum@100+100"]
    assert set(shares) == {
        "mptls@100+100",
        "kernel-mptcp@100+100",
        "one-path@100+100",
    }
    assert all(share > 0 for share in shares.values())
    # so small a transfer ends inside the shapers' bursts (a share of
    # 1.1 has been seen): quick mode shows and judges no share at all
    goals = {goal["name"]: goal for goal in document["goals"]}
    for tag in ("100+100", "100+50"):
        goal = goals[f"mptls share of {tag} Mbit/s"]
        assert goal["value"] is None and goal["met"] is None


def test_quick_figures_are_labelled_as_smoke_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a quick paths run once printed an mptls share of 0.505 as if it
    # were a result; every quick run now says what its figures are
    status = main(["bench", "tokens", "--quick", "--output", str(tmp_path)])
    assert status == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("quick run: smoke figures, not results.")
    assert out.endswith("Run without --quick for figures.")


def test_unknown_scenario_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "nonsense", "--quick"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


async def test_relay_retrieves_a_reset_peers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a client that resets its connection left the relay's stream close
    # future holding ConnectionResetError, which asyncio then printed as
    # "Future exception was never retrieved": wait_closed() retrieves it
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    awaited: list[asyncio.StreamWriter] = []
    wait_closed = asyncio.StreamWriter.wait_closed

    async def spy(writer: asyncio.StreamWriter) -> None:
        awaited.append(writer)
        await wait_closed(writer)

    monkeypatch.setattr(asyncio.StreamWriter, "wait_closed", spy)

    async def upstream_echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                writer.write(data)
        writer.close()

    upstream = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
    address = upstream.sockets[0].getsockname()[:2]
    done = asyncio.Event()

    async def relay_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await relay._relay(reader, writer, address, 0.001)
        done.set()

    front = await asyncio.start_server(relay_once, "127.0.0.1", 0)
    port = front.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x" * 4096)
    await writer.drain()
    sock = writer.get_extra_info("socket")
    # linger 0: close() sends a reset, not a FIN
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    writer.transport.abort()
    await asyncio.wait_for(done.wait(), 10)
    relayed = len(awaited)
    for server in (front, upstream):
        server.close()
        await server.wait_closed()
    gc.collect()
    await asyncio.sleep(0)
    assert not reported, reported
    # both of the relay's writers: the client's and the upstream's
    assert relayed == 2


def test_quick_paths_shows_no_share() -> None:
    result = ScenarioResult("paths", "t", "Mbit/s", True, 2, True)
    result.variants += [
        VariantResult(f"{name}@100+100", (107.0, 105.0))
        for name in ("mptls", "kernel-mptcp", "one-path")
    ]
    paths._judge(result, result.variants, "100+100", 200, quick=True)
    paths._judge(result, result.variants, "100+100", 200, quick=True)
    share = result.goals[0]
    assert share.name.startswith("mptls share")
    assert share.value is None and share.met is None
    assert result.notes == [paths.QUICK_SHARES_NOTE]


@pytest.mark.parametrize(
    ("quick", "value", "why"),
    [
        (True, 1.2, "quick run"),
        (False, None, "no figure"),
        (False, 1.2, "shown for comparison"),
    ],
)
def test_a_goal_not_judged_says_why(
    quick: bool, value: float | None, why: str
) -> None:
    result = ScenarioResult("x", "Title", "u", True, 1, quick)
    result.variants.append(VariantResult("a", (1.0,)))
    result.goals.append(harness.at_least("a goal", value, 1.0, judge=False))
    console = Console(record=True, width=200)
    render(console, result)
    text = console.export_text()
    assert "goal: a goal: " in text
    assert f"not judged ({why})" in text


def test_a_single_round_is_singular(tmp_path: Path) -> None:
    result = ScenarioResult("x", "Title", "u", True, 1, True)
    result.variants.append(VariantResult("a", (1.0,)))
    console = Console(record=True, width=200)
    render(console, result)
    assert "1 interleaved round)" in console.export_text()


def _fake_scenarios(
    monkeypatch: pytest.MonkeyPatch, interrupt_at: str | None = None
) -> list[str]:
    """Scenarios that measure nothing; the one named ``interrupt_at``
    raises KeyboardInterrupt as Ctrl-C would."""
    ran: list[str] = []

    def module(name: str) -> ModuleType:
        async def run(options: Any, pki: Any) -> ScenarioResult:
            ran.append(name)
            if name == interrupt_at:
                raise KeyboardInterrupt
            result = ScenarioResult(name, name, "u", True, 1, options.quick)
            result.variants.append(VariantResult("a", (1.0,)))
            return result

        return SimpleNamespace(NAME=name, run=run)  # type: ignore[return-value]

    monkeypatch.setattr(bench, "scenario", module)
    monkeypatch.setattr(bench, "write_pki", lambda directory: None)
    monkeypatch.setattr(bench, "machine", lambda: {"python": "3"})
    return ran


def test_each_scenario_runs_once_in_the_order_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = _fake_scenarios(monkeypatch)
    argv = ["bench", "keys", "bulk", "keys", "--output", str(tmp_path)]
    assert main(argv) == 0
    assert ran == ["keys", "bulk"]


def test_an_unwritable_result_is_named_and_exits_1(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fake_scenarios(monkeypatch)
    (tmp_path / "keys.json").mkdir()
    argv = ["bench", "bulk", "keys", "memory", "--output", str(tmp_path)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert f"wrote {tmp_path / 'bulk.json'}, {tmp_path / 'memory.json'}" in out
    err = " ".join(captured.err.split())
    assert f"keys: could not write {tmp_path / 'keys.json'}: Is a dir" in err
    # the samples of the failed file are kept elsewhere, and said where
    spare = Path(err.rsplit("its samples are in ", 1)[1].strip())
    try:
        assert json.loads(spare.read_text())["scenario"] == "keys"
    finally:
        spare.unlink()


def test_an_output_with_an_escape_in_its_name_cannot_steer_the_terminal(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # "wrote ..." printed the --output name as it was: its escape
    # sequence reached the terminal (demo, certs and the error line
    # show such a name escaped already)
    _fake_scenarios(monkeypatch)
    # the samples of the file that could not be written are kept in a
    # temporary file: here, not in the system's temporary directory
    spares = tmp_path / "spares"
    spares.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spares))
    output = tmp_path / "out\x1b[2J"
    (output / "keys.json").mkdir(parents=True)
    argv = ["bench", "bulk", "keys", "--output", str(output)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    shown = str(tmp_path / "out\\x1b[2J")
    assert f"wrote {shown}/bulk.json" in " ".join(captured.out.split())
    assert f"could not write {shown}/keys.json" in captured.err
    (spare,) = spares.iterdir()
    assert spare.name.startswith("mptls-bench-keys-")


@pytest.mark.parametrize(
    ("interrupt_at", "said"),
    [
        ("bulk", "no result files were written"),
        ("keys", "wrote {bulk} before the interrupt"),
    ],
)
def test_an_interrupted_run_says_what_it_wrote_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    interrupt_at: str,
    said: str,
) -> None:
    _fake_scenarios(monkeypatch, interrupt_at)
    argv = ["bench", "bulk", "keys", "--output", str(tmp_path)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "interrupted" in err
    assert said.format(bulk=tmp_path / "bulk.json") in err


def test_servers_do_not_see_the_terminals_ctrl_c() -> None:
    # Ctrl-C signals the terminal's whole process group: a server in it
    # printed its own CancelledError traceback
    child = ChildServer(
        [sys.executable, "-c", "import os; print('{\"x\": 1}', flush=True)"]
    )
    with child:
        assert os.getpgid(child.process.pid) != os.getpgid(0)


def test_quick_with_rounds_says_how_many(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fake_scenarios(monkeypatch)
    argv = ["bench", "keys", "--quick", "--rounds", "9"]
    assert main([*argv, "--output", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Tiny transfers and 9 rounds check" in out
    assert "two rounds" not in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "two rounds unless --rounds is given" in usage
    assert "paths needs root; kernel needs Linux with MPTCP enabled" in usage


def test_an_output_that_cannot_be_created_says_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "keys", "--output", "/proc/mptls-bench"]) == 2
    err = capsys.readouterr().err
    assert "could not create the directory /proc/mptls-bench" in err
    assert "does not allow new directories" in err


async def test_a_server_shutting_down_mid_transfer_prints_nothing() -> None:
    # the server process cancels its handlers when the bench leaves; a
    # handler that ended cancelled was printed as "Exception in callback"
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    before = asyncio.all_tasks()
    server = await asyncio.start_server(stacks._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"S" + struct.pack("!Q", 1 << 20) + b"x" * 1024)
    await writer.drain()
    handlers: set[asyncio.Task[Any]] = set()
    for _ in range(100):
        handlers = asyncio.all_tasks() - before - {asyncio.current_task()}
        if handlers:
            break
        await asyncio.sleep(0)
    assert handlers
    for handler in handlers:
        handler.cancel()
    await asyncio.wait(handlers)
    await asyncio.sleep(0)
    writer.close()
    server.close()
    await server.wait_closed()
    assert not reported, reported
