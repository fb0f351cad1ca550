"""`credless explain`'s reading of the registration entries: the same choice as
Registry.match, with the reason for every entry."""

from __future__ import annotations

import itertools

import pytest

from agent.identity import entries
from agent.identity.spiffeid import TrustDomain

TD = TrustDomain.parse("example.org")
REG = entries.parse(
    {
        "entry": [
            {"id": "uid", "spiffe_id": "spiffe://example.org/uid", "selectors": ["unix:uid:0"]},
            {
                "id": "svc",
                "spiffe_id": "spiffe://example.org/svc",
                "selectors": ["unix:uid:0", "systemd:id:a.service"],
            },
            {
                "id": "ns",
                "spiffe_id": "spiffe://example.org/ns/{k8s:ns}",
                "selectors": ["k8s:sa:bot"],
            },
            {"id": "uid-too", "spiffe_id": "spiffe://example.org/u2", "selectors": ["unix:uid:0"]},
        ]
    },
    TD,
)
SELECTORS = ["unix:uid:0", "systemd:id:a.service", "k8s:sa:bot", "k8s:ns:prod", "k8s:ns:dev"]


def by_id(selectors):
    return {c.entry.id: c for c in entries.consider(REG.entries, selectors)}


def test_each_entry_says_why_it_does_or_does_not_match():
    c = by_id({"unix:uid:0", "k8s:sa:bot"})
    assert c["svc"].reason == "the process lacks systemd:id:a.service" and not c["svc"].matched
    assert c["ns"].reason == (
        "its SPIFFE ID template needs {k8s:ns}, and the process has no k8s:ns: selector"
    )
    assert c["uid"].chosen and str(c["uid"].spiffe_id) == "spiffe://example.org/uid"
    assert c["uid-too"].matched and not c["uid-too"].chosen
    assert "a more specific or earlier entry is chosen" in c["uid-too"].reason


def test_a_template_with_several_values_or_a_bad_one_says_so():
    c = by_id({"k8s:sa:bot", "k8s:ns:prod", "k8s:ns:dev"})
    assert "the process has 2 k8s:ns: selectors" in c["ns"].reason
    c = by_id({"k8s:sa:bot", "k8s:ns:a/b"})
    assert "not one SPIFFE path segment" in c["ns"].reason
    c = by_id({"k8s:sa:bot", "k8s:ns:prod"})
    assert c["ns"].chosen and str(c["ns"].spiffe_id) == "spiffe://example.org/ns/prod"


@pytest.mark.parametrize(
    "selectors",
    [set(s) for n in range(len(SELECTORS) + 1) for s in itertools.combinations(SELECTORS, n)],
)
def test_the_chosen_entry_is_the_one_registry_match_gives(selectors):
    m = REG.match(selectors)
    chosen = [c for c in entries.consider(REG.entries, selectors) if c.chosen]
    if m is None:
        assert chosen == []
    else:
        assert [(c.entry.id, c.spiffe_id) for c in chosen] == [(m.entry.id, m.spiffe_id)]
        matched = {c.entry.id for c in entries.consider(REG.entries, selectors) if c.matched}
        assert matched == {m.entry.id, *m.also_matched}
