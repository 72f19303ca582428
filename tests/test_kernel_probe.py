"""The kernel probe: sysctl reading, report shape, and the live kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from netns import mptcp_unavailable_reason

import mptls.backends.kernel.probe as probe_module
from mptls.backends.kernel.pathmanager import (
    Endpoint,
    EndpointFlag,
    Limits,
    effective_capabilities,
    flag_names,
)
from mptls.backends.kernel.probe import KernelReport, SockoptReport, probe


def test_read_sysctls_sorted_and_named(tmp_path: Path) -> None:
    (tmp_path / "path_manager").write_text("kernel\n")
    (tmp_path / "enabled").write_text("1\n")
    assert probe_module.read_sysctls(str(tmp_path)) == (
        ("net.mptcp.enabled", "1"),
        ("net.mptcp.path_manager", "kernel"),
    )


def test_read_sysctls_missing_directory(tmp_path: Path) -> None:
    assert probe_module.read_sysctls(str(tmp_path / "absent")) == ()


@pytest.mark.parametrize(
    ("sysctls", "expected"),
    [
        ({"net.mptcp.path_manager": "userspace"}, "userspace"),
        ({"net.mptcp.pm_type": "0"}, "kernel"),
        ({"net.mptcp.pm_type": "1"}, "userspace"),
        ({}, None),
    ],
)
def test_path_manager_from_old_and_new_sysctls(
    sysctls: dict[str, str], expected: str | None
) -> None:
    assert probe_module.path_manager_name(sysctls) == expected


def test_effective_capabilities_parsed_from_status() -> None:
    status = "Name:\tx\nCapInh:\t0\nCapEff:\t0000000000001000\n"
    assert effective_capabilities(status) == 1 << 12
    assert effective_capabilities("Name:\tx\n") == 0


def test_flag_names_keep_unknown_bits() -> None:
    flags = EndpointFlag.SIGNAL | EndpointFlag.BACKUP | 0x100
    assert flag_names(flags) == ("signal", "backup", "0x100")


def test_report_as_dict_is_plain_json() -> None:
    report = KernelReport(
        kernel_release="6.18.0",
        mptcp_socket=True,
        mptcp_socket_detail="ok",
        enabled=True,
        path_manager="kernel",
        scheduler="default",
        sysctls=(("net.mptcp.enabled", "1"),),
        endpoints=(Endpoint(3, "192.0.2.1", EndpointFlag.SIGNAL),),
        limits=Limits(subflows=2, add_addr_accepted=1),
        netlink_detail="ok",
        getsockopts=(SockoptReport("MPTCP_INFO", True),),
        can_manage_paths=False,
        manage_paths_detail="needs CAP_NET_ADMIN",
        external_keys=False,
        external_keys_detail="no interface",
    )
    data = json.loads(json.dumps(report.as_dict()))
    assert data["endpoints"] == [
        {
            "address_id": 3,
            "address": "192.0.2.1",
            "flags": ["signal"],
            "port": None,
            "interface": None,
        }
    ]
    assert data["limits"] == {"subflows": 2, "add_addr_accepted": 1}
    assert data["sysctls"] == {"net.mptcp.enabled": "1"}
    assert data["getsockopts"][0] == {
        "name": "MPTCP_INFO",
        "works": True,
        "detail": "",
    }


@pytest.mark.kernel
def test_probe_on_this_kernel() -> None:
    reason = mptcp_unavailable_reason()
    if reason:
        pytest.skip(reason)
    report = probe()
    assert report.mptcp_socket
    assert report.enabled is True
    assert report.path_manager in {"kernel", "userspace"}
    works = {item.name: item.works for item in report.getsockopts}
    # MPTCP_INFO exists since 5.9, TCP_IS_MPTCP since 5.16
    assert works["MPTCP_INFO"] and works["TCP_IS_MPTCP"]
    # no released kernel takes external keys; the report must say why
    assert report.external_keys is False
    assert "no interface" in report.external_keys_detail
    json.dumps(report.as_dict())
