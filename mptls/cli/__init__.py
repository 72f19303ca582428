"""The ``mptls`` command line: demo, certs, serve, connect, info, bench.

Each command lives in its own module; :mod:`mptls.cli.main` parses and
runs them. Nothing here is public API: library users import ``mptls``.
"""
