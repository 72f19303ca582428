"""The ``mptls`` command line: demo, certs, serve, connect, info, bench.

Each command lives in its own module; :mod:`mptls.cli.commands` parses
and runs them, called by the entry point, :mod:`mptls.cli.main`. Nothing
here is public API: library users import ``mptls``.
"""
