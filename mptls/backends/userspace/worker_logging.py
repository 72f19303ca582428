"""How a worker process logs as the process that started it does.

A spawned process inherits no logging configuration: :class:`LogSetup`
takes the parent's (the root handler's level and format, and the loggers
under ``mptls`` given a level or a handler of their own, as ``mptls
serve -v`` gives ``mptls.refusals``) and applies it in the worker, on
the stderr both share. It must stay picklable: it crosses the process
boundary with the worker's settings. :class:`LabelledLines` begins each
line a worker writes to that stderr with the worker's id, so that lines
of several workers say which one printed them.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LabelledLines", "LogBranch", "LogSetup", "worker_label"]


def worker_label(worker_id: int) -> str:
    """What each line of worker ``worker_id`` on stderr begins with."""
    return f"worker {worker_id}: "


class LabelledLines:
    """A text stream that begins every line written to it with ``label``.

    Written in pieces or several lines at once, each line gets the label
    once, at its start. Everything but ``write`` is the stream's own, so
    handlers and consoles built on it (``fileno()``, ``flush()``) work
    as on the stream itself.
    """

    def __init__(self, stream: Any, label: str) -> None:
        self._stream = stream
        self._label = label
        self._at_line_start = True
        # log handlers and consoles each hold their own lock, not this one
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            pieces = []
            for line in text.splitlines(keepends=True):
                if self._at_line_start:
                    pieces.append(self._label)
                pieces.append(line)
                self._at_line_start = line.endswith("\n")
            self._stream.write("".join(pieces))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@dataclass(frozen=True)
class LogBranch:
    """A logger under ``mptls`` set apart from the root: its level,
    whether it propagates, and the format of its own handler (None: it
    has none)."""

    name: str
    level: int
    propagate: bool
    handler_format: str | None


@dataclass(frozen=True)
class LogSetup:
    """A process's logging as far as a worker repeats it."""

    level: int = logging.WARNING
    # None: the parent has no root handler, and the worker adds none
    root_format: str | None = None
    branches: tuple[LogBranch, ...] = ()

    @classmethod
    def of_this_process(cls) -> LogSetup:
        return cls(
            level=logging.getLogger().getEffectiveLevel(),
            root_format=_handler_format(logging.getLogger().handlers),
            branches=_branches(),
        )

    def apply(self) -> None:
        """Configure this (worker) process's logging to match."""
        if self.root_format is not None:
            logging.basicConfig(
                level=self.level, format=self.root_format, stream=sys.stderr
            )
        for branch in self.branches:
            chosen = logging.getLogger(branch.name)
            chosen.setLevel(branch.level)
            chosen.propagate = branch.propagate
            if branch.handler_format is not None:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter(branch.handler_format))
                chosen.addHandler(handler)


def _branches() -> tuple[LogBranch, ...]:
    """This process's loggers under ``mptls`` with a level or a handler
    of their own."""
    branches = []
    for name, node in logging.root.manager.loggerDict.items():
        if not (name == "mptls" or name.startswith("mptls.")):
            continue
        if not isinstance(node, logging.Logger):
            continue  # a placeholder for loggers below it
        if node.level == logging.NOTSET and not node.handlers:
            continue
        branches.append(
            LogBranch(
                name,
                node.level,
                node.propagate,
                _handler_format(node.handlers),
            )
        )
    return tuple(branches)


def _handler_format(handlers: Sequence[logging.Handler]) -> str | None:
    """The format of the first handler, if there is one."""
    for handler in handlers:
        formatter = handler.formatter
        fmt = getattr(formatter, "_fmt", None) if formatter else None
        return fmt if isinstance(fmt, str) else logging.BASIC_FORMAT
    return None
