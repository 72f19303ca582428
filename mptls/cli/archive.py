"""The demo's default payload: a real file, not a stream of zeros.

An uncompressed tar archive of the running Python's standard library is
big, varied and on every machine that can run mptls. When it is smaller
than the demo's minimum, files from site-packages are appended until it
is not. This module only reads the trees it archives and writes the one
archive it is asked for; it never deletes anything.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mptls.cli.common import human_bytes, printable

logger = logging.getLogger("mptls.cli")

# "at least 50 MB" holds whichever way a reader counts megabytes
MINIMUM_SIZE = 50 * 1024 * 1024

# directories that hold no standard library source of their own
_SKIPPED_DIRECTORIES = frozenset({"__pycache__", "site-packages"})


@dataclass(frozen=True, slots=True)
class Payload:
    """A file the demo sends, and what it is."""

    path: Path
    size: int
    description: str


@dataclass(frozen=True, slots=True)
class _Tally:
    primary_files: int
    extra_files: int


def _walk_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Regular files under ``root`` in a stable order, with their
    archive names relative to ``root``."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            name for name in subdirectories if name not in _SKIPPED_DIRECTORIES
        )
        for name in sorted(files):
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path, path.relative_to(root).as_posix()


def _add_file(archive: tarfile.TarFile, path: Path, arcname: str) -> bool:
    """Append one file; a file that vanished or cannot be read is left
    out rather than failing the demo."""
    try:
        with path.open("rb") as source:
            info = archive.gettarinfo(arcname=arcname, fileobj=source)
            archive.addfile(info, source)
    except OSError as exc:
        logger.debug("left %s out of the archive: %s", path, exc)
        return False
    return True


def _fill(
    archive: tarfile.TarFile,
    primary: Path,
    extras: Sequence[Path],
    minimum: int,
) -> _Tally:
    # the whole primary tree, under its own top-level name
    primary_files = 0
    for path, arcname in _walk_files(primary):
        primary_files += _add_file(archive, path, f"stdlib/{arcname}")

    # then extra trees, only as far as the minimum size needs
    extra_files = 0
    for index, root in enumerate(extras):
        for path, arcname in _walk_files(root):
            if archive.offset >= minimum:
                return _Tally(primary_files, extra_files)
            prefix = f"extra{index}/{root.name}"
            extra_files += _add_file(archive, path, f"{prefix}/{arcname}")
    return _Tally(primary_files, extra_files)


def build_archive(
    target: Path,
    primary: Path,
    extras: Sequence[Path] = (),
    *,
    minimum: int = MINIMUM_SIZE,
) -> Payload:
    """Write an uncompressed tar of ``primary`` (without ``__pycache__``
    and ``site-packages``) to ``target``; append files from ``extras``
    until the archive holds at least ``minimum`` bytes.

    The archive may still be smaller than ``minimum`` when all the trees
    together are; the description says how big it came out.
    """
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        tally = _fill(archive, primary, extras, minimum)
    size = target.stat().st_size
    description = (
        f"uncompressed tar of {tally.primary_files} files of the Python "
        f"{sys.version_info.major}.{sys.version_info.minor} standard "
        f"library ({primary})"
    )
    if tally.extra_files:
        description += f" and {tally.extra_files} files from site-packages"
    return Payload(target, size, f"{description}, {human_bytes(size)}")


def site_package_roots(stdlib: Path) -> list[Path]:
    """Where to find more files when the standard library is too small."""
    paths = sysconfig.get_paths()
    candidates = [
        Path(paths["purelib"]),
        Path(paths["platlib"]),
        stdlib / "site-packages",
    ]
    roots: list[Path] = []
    for candidate in candidates:
        if candidate.is_dir() and candidate.resolve() not in {
            root.resolve() for root in roots
        }:
            roots.append(candidate)
    return roots


def stdlib_archive(directory: Path) -> Payload:
    """The default demo payload, written into ``directory``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return build_archive(
        directory / "python-stdlib.tar",
        stdlib,
        site_package_roots(stdlib),
    )


def existing_payload(path: Path) -> Payload:
    """A user's own file, sent as it is."""
    size = path.stat().st_size
    return Payload(path, size, f"{printable(str(path))} ({human_bytes(size)})")
