"""agent/inject/netns.py: which namespaces get a listener, and entering one safely."""

from __future__ import annotations

import os
import socket

import pytest

from agent.inject.listeners import ListenSpec, bind_listeners
from agent.inject.netns import NetnsListeners, in_netns, netns_inode
from tests.unit.test_redirect_cgroup_match import MANAGED_CASES


def listeners(managed: list[str], own: str = "/system.slice/credless.service"):
    from prometheus_client import CollectorRegistry

    async def serve(_socks):
        return []

    return NetnsListeners([], serve, managed, own, 5.0, registry=CollectorRegistry())


@pytest.mark.parametrize("managed,cgroup,expected", MANAGED_CASES)
def test_a_namespace_is_served_for_processes_of_managed_cgroups(managed, cgroup, expected):
    assert listeners(managed).is_managed(cgroup) is expected


def test_bind_listeners_names_the_address_it_could_not_take():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_listeners([ListenSpec(socket.AF_INET, "127.0.0.1", port, False)], True)


def test_bind_listeners_closes_what_it_bound_when_a_later_one_fails():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        free = socket.create_server(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        specs = [
            ListenSpec(socket.AF_INET, "127.0.0.1", port, False),
            ListenSpec(socket.AF_INET, "127.0.0.1", taken.getsockname()[1], False),
        ]
        with pytest.raises(OSError):
            bind_listeners(specs, True)
        with socket.create_server(("127.0.0.1", port)):  # released: bindable again
            pass


@pytest.mark.kernel
def test_in_netns_runs_in_the_namespace_and_leaves_the_caller_where_it_was():
    from tests.kernel import network_namespace

    before = netns_inode("thread-self")
    with network_namespace() as ns:
        inside = in_netns(f"/run/netns/{ns}", lambda: netns_inode("thread-self"))
        assert inside == os.stat(f"/run/netns/{ns}").st_ino != before
        assert netns_inode("thread-self") == before
        with pytest.raises(ZeroDivisionError):  # fn's own error reaches the caller
            in_netns(f"/run/netns/{ns}", lambda: 1 / 0)
    with pytest.raises(OSError, match="setns"):
        in_netns("/dev/null", lambda: None)


def test_in_netns_refuses_a_path_that_now_names_another_namespace():
    # a pid reused between the scan and the setns: its ns/net is not the one scanned
    wrong = netns_inode("self") + 1
    with pytest.raises(OSError, match="no longer network namespace"):
        in_netns("/proc/self/ns/net", lambda: None, inode=wrong)
