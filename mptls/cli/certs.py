"""Development certificates: a throwaway CA and a loopback server cert.

``mptls certs`` writes them to a directory for ``mptls serve`` and
``mptls connect``; ``mptls demo`` makes the same kind in memory. They are
for trying mptls on one machine and must never be mistaken for real
credentials: the CA says so in its name, the private key file is readable
by its owner only, and no private key is ever printed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from rich.table import Table

from mptls.cli.common import (
    ExitStatus,
    UsageError,
    as_markup,
    printable,
    stdout_console,
)

# every name the loopback demos and examples use for the server
DEVELOPMENT_IDENTITIES = (
    "localhost",
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.4",
    "::1",
)

CA_FILE = "ca.pem"
CHAIN_FILE = "server.pem"
KEY_FILE = "server.key"


@dataclass(frozen=True, slots=True)
class DevelopmentPems:
    """A CA certificate, a server chain (leaf first) and its key, as PEM."""

    ca: bytes
    chain: bytes
    key: bytes = field(repr=False)


def issue_development_pems(
    identities: Sequence[str] = DEVELOPMENT_IDENTITIES,
) -> DevelopmentPems:
    """A fresh CA and a server certificate for ``identities``."""
    authority = trustme.CA(organization_name="mptls development CA")
    leaf = authority.issue_cert(*identities)
    ca = authority.cert_pem.bytes()
    chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems) + ca
    return DevelopmentPems(ca, chain, leaf.private_key_pem.bytes())


def _write(path: Path, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as target:
        target.write(data)
    # O_CREAT's mode only applies to new files; an overwritten key file
    # must lose any wider permissions it had
    path.chmod(mode)


def _refuse_special_files(paths: Sequence[Path]) -> None:
    """Refuse, before any is written, a name taken by what is no file.

    A FIFO held the write open until something read it, for good; a
    directory failed the write after the files before it were replaced,
    leaving a new CA and chain beside no key of theirs.
    """
    for path in paths:
        if path.exists() and not path.is_file():
            raise UsageError(
                f"{printable(str(path))} is not a regular file: "
                "not overwritten (remove it, or name another --dir)"
            )


def write_development_certs(
    directory: Path, *, force: bool = False
) -> tuple[Path, Path, Path]:
    """Write ca.pem, server.pem and server.key into ``directory``.

    Refuses (UsageError) to replace any existing file unless ``force``.
    """
    paths = (
        directory / CA_FILE,
        directory / CHAIN_FILE,
        directory / KEY_FILE,
    )
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise UsageError(
            f"refusing to overwrite {', '.join(existing)} (use --force)"
        )
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"not a directory: {directory}")
    _refuse_special_files(paths)
    directory.mkdir(parents=True, exist_ok=True)

    pems = issue_development_pems()
    ca_path, chain_path, key_path = paths
    _write(ca_path, pems.ca, 0o644)
    _write(chain_path, pems.chain, 0o644)
    _write(key_path, pems.key, 0o600)
    return paths


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="write a development CA and a loopback server certificate",
        description=(
            "Write a development CA (ca.pem), a server certificate chain "
            "(server.pem) and its key (server.key) for localhost, "
            "127.0.0.1-127.0.0.4 and ::1. For local testing only."
        ),
    )
    parser.add_argument(
        "--dir",
        default="certs",
        help="directory to write into (default: certs)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing files"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> ExitStatus:
    if not args.dir:
        # Path("") is the current directory: --dir "$DIR" with DIR unset
        # wrote the key there
        raise UsageError("--dir needs a directory name (. for this one)")
    ca_path, chain_path, key_path = write_development_certs(
        Path(args.dir), force=args.force
    )
    console = stdout_console()
    written = Table.grid(padding=(0, 2))
    # the paths are the user's --dir: a "[" in them is no markup
    written.add_row(
        "wrote", as_markup(str(ca_path)), "development CA certificate"
    )
    written.add_row(
        "wrote",
        as_markup(str(chain_path)),
        "server certificate chain for " + ", ".join(DEVELOPMENT_IDENTITIES),
    )
    written.add_row(
        "wrote", as_markup(str(key_path)), "server private key (mode 600)"
    )
    console.print(written)
    console.print()
    console.print("use them with:")
    chain, key, ca = (
        printable(str(p)) for p in (chain_path, key_path, ca_path)
    )
    console.print(
        f"  mptls serve --cert {chain} --key {key} --echo",
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"  mptls connect 127.0.0.1 4433 --cafile {ca}",
        markup=False,
        soft_wrap=True,
    )
    return ExitStatus.OK
