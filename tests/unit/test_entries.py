"""Registration entries: validation messages, matching rules, templates."""

from __future__ import annotations

import pytest

from agent.identity import entries
from agent.identity.spiffeid import TrustDomain
from tests.conftest import REPO

TD = TrustDomain.parse("example.org")


def reg(*raw):
    return entries.parse({"entry": list(raw)}, TD)


# invalid files and their exact messages: tests/testdata/entries, run by test_config.py


def test_the_example_entries_load_with_defaults_filled_in():
    r = entries.load(REPO / "deploy/entries.example.toml", TD)
    by_id = {e.id: e for e in r.entries}
    assert set(by_id) == {"mcp-agent-service", "k8s-workloads", "spiffe-native-client"}
    assert by_id["k8s-workloads"].x509_svid_ttl_seconds == 1800
    assert by_id["k8s-workloads"].jwt_svid_ttl_seconds is None
    assert by_id["spiffe-native-client"].authorization_server_audience is True
    assert by_id["mcp-agent-service"].authorization_server_audience is False
    assert [by_id[i].order for i in ("mcp-agent-service", "k8s-workloads")] == [0, 1]
    assert by_id["mcp-agent-service"].selectors == frozenset(
        {"systemd:id:mcp-agent.service", "unix:user:mcp"}
    )


def test_an_entry_without_id_is_named_by_its_place_in_the_file():
    r = reg(
        {"spiffe_id": "spiffe://example.org/a", "selectors": ["unix:uid:0"]},
        {"spiffe_id": "spiffe://example.org/b", "selectors": ["unix:uid:1"]},
    )
    assert [(e.id, e.order) for e in r.entries] == [("entry-0", 0), ("entry-1", 1)]


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(entries.EntriesError, match="file not found"):
        entries.load(tmp_path / "nope.toml", TD)
    (tmp_path / "e.toml").write_text("")
    assert len(entries.load(tmp_path / "e.toml", TD)) == 0


def test_all_selectors_must_match_and_no_match_is_none():
    r = reg(
        {
            "id": "a",
            "spiffe_id": "spiffe://example.org/a",
            "selectors": ["unix:uid:0", "systemd:id:x.service"],
        }
    )
    assert r.match({"unix:uid:0"}) is None
    m = r.match({"unix:uid:0", "systemd:id:x.service", "unix:gid:0"})
    assert str(m.spiffe_id) == "spiffe://example.org/a" and m.also_matched == ()


def test_most_specific_wins_then_file_order():
    r = reg(
        {"id": "broad", "spiffe_id": "spiffe://example.org/broad", "selectors": ["unix:uid:0"]},
        {
            "id": "narrow",
            "spiffe_id": "spiffe://example.org/narrow",
            "selectors": ["unix:uid:0", "unix:gid:0"],
        },
        {
            "id": "tie",
            "spiffe_id": "spiffe://example.org/tie",
            "selectors": ["unix:uid:0", "unix:user:root"],
        },
    )
    m = r.match({"unix:uid:0", "unix:gid:0", "unix:user:root"})
    assert m.entry.id == "narrow" and m.also_matched == ("tie", "broad")


def test_templates_fill_from_single_selectors():
    r = reg(
        {
            "id": "k8s",
            "spiffe_id": "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}",
            "selectors": ["k8s:pod-label:app:web"],
        }
    )
    m = r.match({"k8s:pod-label:app:web", "k8s:ns:prod", "k8s:sa:agent"})
    assert str(m.spiffe_id) == "spiffe://example.org/ns/prod/sa/agent"
    assert r.match({"k8s:pod-label:app:web", "k8s:ns:prod"}) is None  # no k8s:sa
    assert r.match({"k8s:pod-label:app:web", "k8s:ns:a", "k8s:ns:b", "k8s:sa:x"}) is None


def test_template_values_cannot_add_segments_or_bad_characters():
    r = reg(
        {
            "id": "t",
            "spiffe_id": "spiffe://example.org/svc/{systemd:id}",
            "selectors": ["unix:uid:0"],
        }
    )
    assert r.match({"unix:uid:0", "systemd:id:a/../admin"}) is None
    assert r.match({"unix:uid:0", "systemd:id:has space"}) is None
    assert (
        str(r.match({"unix:uid:0", "systemd:id:web.service"}).spiffe_id)
        == "spiffe://example.org/svc/web.service"
    )


def test_an_entry_may_opt_in_to_authorization_server_audiences_and_says_so_plainly():
    td = TrustDomain.parse("example.org")
    reg = entries.parse(
        {
            "entry": [
                {
                    "id": "native",
                    "spiffe_id": "spiffe://example.org/native",
                    "selectors": ["a:b:c"],
                    "authorization_server_audience": True,
                },
                {
                    "id": "proxied",
                    "spiffe_id": "spiffe://example.org/proxied",
                    "selectors": ["a:b:d"],
                },
            ]
        },
        td,
    )
    assert [e.authorization_server_audience for e in reg.entries] == [True, False]
    # anything but a boolean is refused: tests/testdata/entries/
    # authorization_server_audience_not_boolean.toml
