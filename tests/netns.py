"""Network namespaces for tests: the benchmarks' helper, under its old name.

The topology code lives in :mod:`mptls.bench.netns`, which the
benchmarks need as a package module; the tests import it from here.
"""

from mptls.bench.netns import (
    CERT_NAMES,
    IPV4_PATHS,
    IPV6_PATHS,
    Namespace,
    PacketCapture,
    Path,
    ServerPki,
    TcpSegment,
    Topology,
    mptcp_unavailable_reason,
    parse_frame,
    remove_stale_namespaces,
    route_source,
    run,
    shape,
    teardown,
    topology,
    unavailable_reason,
    write_pki,
)

__all__ = [
    "CERT_NAMES",
    "IPV4_PATHS",
    "IPV6_PATHS",
    "Namespace",
    "PacketCapture",
    "Path",
    "ServerPki",
    "TcpSegment",
    "Topology",
    "mptcp_unavailable_reason",
    "parse_frame",
    "remove_stale_namespaces",
    "route_source",
    "run",
    "shape",
    "teardown",
    "topology",
    "unavailable_reason",
    "write_pki",
]
