"""Registration entries: validation messages, matching rules, templates."""

from __future__ import annotations

import pytest

from agent.identity import entries
from agent.identity.spiffeid import TrustDomain
from tests.conftest import TESTDATA

TD = TrustDomain.parse("example.org")


def reg(*raw):
    return entries.parse({"entry": list(raw)}, TD)


def test_invalid_entries_are_refused_with_entry_and_reason():
    with pytest.raises(entries.EntriesError) as err:
        entries.load(TESTDATA / "entries/invalid.toml", TD)
    assert err.value.problems == (TESTDATA / "entries/invalid.err").read_text().splitlines()


def test_duplicate_ids_are_refused():
    with pytest.raises(entries.EntriesError) as err:
        reg(
            {"id": "a", "spiffe_id": "spiffe://example.org/a", "selectors": ["unix:uid:0"]},
            {"id": "a", "spiffe_id": "spiffe://example.org/b", "selectors": ["unix:uid:1"]},
        )
    assert err.value.problems == ['entry[1] (id "a"): duplicate id; every entry needs its own']


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
    with pytest.raises(entries.EntriesError) as err:
        entries.parse(
            {
                "entry": [
                    {
                        "id": "x",
                        "spiffe_id": "spiffe://example.org/x",
                        "selectors": ["a:b:c"],
                        "authorization_server_audience": "yes",
                    }
                ]
            },
            td,
        )
    assert err.value.problems == [
        "entry[0] (id \"x\"): authorization_server_audience must be true or false, got 'yes'"
    ]
