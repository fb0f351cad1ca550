"""The redirect's target keys as the kernel looks them up (agent/inject/redirect.py): a
v4-mapped address is the IPv4 address it is (bpf/redirect.c keys a connect6 to
::ffff:a.b.c.d as IPv4), and a record of it names the server as its target did."""

from __future__ import annotations

import ctypes as ct
import socket

import pytest
import structlog.testing

from agent.config import InjectSection
from agent.inject import redirect
from agent.inject.redirect import Redirector, Target, _addr_words, _unmapped, spellings


class TargetKey(ct.Structure):  # struct redirect_target (bpf/redirect.h)
    _fields_ = [("family", ct.c_uint32), ("port", ct.c_uint32), ("addr", ct.c_uint32 * 4)]


class FakeTable(dict):
    """A BCC hash table as set_targets uses it: keys by their bytes, values as c_uint32."""

    Key = TargetKey

    def __setitem__(self, key, value):
        super().__setitem__(bytes(key), value.value)

    def __delitem__(self, key):
        super().__delitem__(bytes(key))

    def entries(self) -> dict[tuple[int, str, int], int]:
        """(family, address, port) -> listener port (0: the plain one)."""
        out = {}
        for raw, value in self.items():
            k = TargetKey.from_buffer_copy(raw)
            words = b"".join(int(w).to_bytes(4, "little") for w in k.addr)
            addr = (
                socket.inet_ntop(socket.AF_INET, words[:4])
                if k.family == socket.AF_INET
                else socket.inet_ntop(socket.AF_INET6, words)
            )
            out[(k.family, addr, socket.ntohs(k.port))] = socket.ntohs(value)
        return out


def redirector(table: FakeTable) -> Redirector:
    r = Redirector("/nonexistent", "/sys/fs/cgroup", InjectSection())
    r._bpf = {b"redirect_targets": table}  # type: ignore[assignment,unused-ignore]
    return r


V4 = socket.AF_INET
V6 = socket.AF_INET6


@pytest.mark.parametrize(
    "host, kernel",
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("::FFFF:10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::127.0.0.1", "::7f00:1"),  # v4-compatible (deprecated) is IPv6, not IPv4
    ],
)
def test_an_address_as_the_kernel_keys_it(host, kernel):
    assert _unmapped(host) == kernel


def test_address_words_are_in_network_order_as_the_kernel_reads_them():
    assert _addr_words("127.0.0.1") == (
        V4,
        [int.from_bytes(bytes([127, 0, 0, 1]), "little"), 0, 0, 0],
    )
    family, words = _addr_words("::1")
    assert family == V6 and words[:3] == [0, 0, 0]
    assert words[3].to_bytes(4, "little") == b"\x00\x00\x00\x01"


def test_a_mapped_target_is_keyed_as_ipv4_and_recorded_as_it_was_named():
    table = FakeTable()
    r = redirector(table)
    r.set_targets({Target("::ffff:127.0.0.1", 8080), Target("::1", 8080, 15443)})
    assert table.entries() == {(V4, "127.0.0.1", 8080): 0, (V6, "::1", 8080): 15443}
    # the kernel records a connect to ::ffff:127.0.0.1 as 127.0.0.1: the proxy finds the
    # server under the address its target named
    assert r._spelled == {("127.0.0.1", 8080): "::ffff:127.0.0.1"}
    assert spellings([Target("10.0.0.1", 1), Target("::ffff:10.0.0.2", 2)]) == {
        ("10.0.0.2", 2): "::ffff:10.0.0.2"
    }


def test_two_spellings_of_one_address_are_one_key_which_stays_while_either_does():
    table = FakeTable()
    r = redirector(table)
    both = {Target("127.0.0.1", 80, 15443), Target("::ffff:127.0.0.1", 80)}
    r.set_targets(both)
    assert table.entries() == {(V4, "127.0.0.1", 80): 15443}  # the IPv4 spelling's listener
    assert r._spelled == {}  # recorded as 127.0.0.1, which is how that target names it
    r.set_targets({Target("::ffff:127.0.0.1", 80)})  # one spelling goes: the key stays
    assert table.entries() == {(V4, "127.0.0.1", 80): 0}
    assert r._spelled == {("127.0.0.1", 80): "::ffff:127.0.0.1"}
    r.set_targets(set())
    assert table.entries() == {}


def test_an_earlier_agents_targets_this_one_lacks_are_removed():
    table = FakeTable()
    old = redirector(table)
    old.set_targets({Target("10.0.0.1", 443), Target("::ffff:10.0.0.2", 443)})
    new = redirector(table)
    new._stale_targets = list(table.keys())
    new.set_targets({Target("10.0.0.2", 443)})
    assert table.entries() == {(V4, "10.0.0.2", 443): 0}


def test_localhost_is_intercepted_in_both_families_whatever_the_nodes_hosts_file():
    """A node's /etc/hosts may map localhost to 127.0.0.1 only (this machine's does); a
    container's or pod's maps it to ::1 too, and its clients try ::1 first. localhost is
    loopback in both families (RFC 6761 §6.3): both are intercepted."""
    from agent.config import ServerSection
    from agent.inject.components import redirect_targets
    from agent.inject.upstreams import UpstreamResolver

    def v4_only(host, port, **_):
        assert host == "localhost"
        return [(V4, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    servers = [ServerSection(name="local", url="http://localhost:9000/mcp", mode="broker")]
    targets = redirect_targets(UpstreamResolver(servers, resolve=v4_only).refresh(), 0)
    assert targets == {Target("127.0.0.1", 9000), Target("::1", 9000)}


@pytest.mark.parametrize("present", [True, False])
def test_the_sender_probe_is_compiled_only_where_the_kernel_has_its_tracepoint(
    tmp_path, monkeypatch, present
):
    """bpf/redirect.c's probe of who writes on a connection attaches to a recent
    tracepoint: without it the program is built without the probe (it would fail to load),
    and the agent says that writers go unchecked."""
    tracepoint = tmp_path / "tcp_sendmsg_locked"
    if present:
        tracepoint.mkdir()
    monkeypatch.setattr(redirect, "_SENDMSG_TRACEPOINT", tracepoint)
    with structlog.testing.capture_logs() as logs:
        flags = redirect.compile_flags(tmp_path / "pins")
    assert ("-DHAVE_SENDMSG_TRACEPOINT" in flags) is present
    assert f'-DPIN_DIR="{tmp_path / "pins"}"' in flags
    assert any(f.startswith("-DSK_COOKIE_OFF=") for f in flags)
    warned = [e for e in logs if "is not checked" in e["event"]]
    assert len(warned) == (0 if present else 1)
