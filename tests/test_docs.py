"""The README and docs/ stay true to the tree: links, anchors, cited tests.

These are the claims a reader follows without running anything: a link
to another document or a section of it, a test named as the evidence
for a behaviour, a file named as where something lives.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(.*?)\s*$", re.MULTILINE)
# a test function, not a test file nor a pattern of file names
CITED_TEST = re.compile(r"\btest_[a-z0-9_]+\b(?!\.py|\*)")
CITED_TEST_FILE = re.compile(r"(?<![/\w])(test_[a-z0-9_]+\.py)\b")
CITED_FILE = re.compile(
    r"\b((?:mptls|tests|examples)/[\w/.-]+\.(?:py|cfg|md))\b"
)
DEFINED_TEST = re.compile(r"^\s*(?:async )?def (test_\w+)", re.MULTILINE)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    # a link in a heading keeps its text; other punctuation goes, and
    # underscores stay, as in a code span's identifier
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(heading) for heading in HEADING.findall(path.read_text())}


def _names(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


@pytest.mark.parametrize("document", DOCUMENTS, ids=_names(DOCUMENTS))
def test_every_link_reaches_a_file_and_its_section(document: Path) -> None:
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an outside address: not checked from here
        path_part, _, anchor = target.partition("#")
        path = (
            (document.parent / path_part).resolve() if path_part else document
        )
        found = path.exists() and (
            not anchor or (path.is_file() and anchor in _anchors(path))
        )
        if not found:
            broken.append(target)
    assert broken == []


def _cited(pattern: re.Pattern[str]) -> set[str]:
    """Every match of ``pattern`` in the README and docs/."""
    return {
        name
        for document in DOCUMENTS
        for name in pattern.findall(document.read_text())
    }


def test_every_cited_test_exists() -> None:
    defined: set[str] = set()
    for source in (ROOT / "tests").glob("*.py"):
        defined.update(DEFINED_TEST.findall(source.read_text()))
    cited = _cited(CITED_TEST)
    assert cited, "the docs cite tests; the pattern found none"
    assert sorted(cited - defined) == []


def test_every_cited_file_exists() -> None:
    cited = _cited(CITED_FILE)
    assert cited, "the docs name files; the pattern found none"
    assert sorted(name for name in cited if not (ROOT / name).exists()) == []


def test_every_test_file_named_alone_exists() -> None:
    cited = _cited(CITED_TEST_FILE)
    assert cited, "the docs name test files; the pattern found none"
    missing = sorted(
        name for name in cited if not (ROOT / "tests" / name).exists()
    )
    assert missing == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_readme_library_example_runs_as_written(tmp_path: Path) -> None:
    # the example a newcomer copies first: after `mptls certs`, it must
    # run and print the upper-cased echo. Its fixed port is swapped for
    # a free one, so that a server the reader left running (the
    # README's `mptls serve` takes 4433 too) does not answer it
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it like asyncio", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example is not None, "the README's library example is gone"
    script = example.group(1)
    assert script.count("4433") == 2, "the example's port moved"
    script = script.replace("4433", str(_free_port()))

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    certs = run("-m", "mptls", "certs")
    assert certs.returncode == 0, certs.stderr
    result = run("-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "b'HELLO OVER TWO PATHS'"
    assert lines[1].startswith("MptcpInfo(backend='userspace', mode='G'")
