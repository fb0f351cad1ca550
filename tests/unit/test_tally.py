"""The proxy's plain-number series expose exactly what prometheus_client's own would."""

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from agent.observe.tally import TallyCounter, TallyHistogram

BOUNDS = (0.001, 0.01, 0.1, 1)
# table: observations, including ones equal to a bound (le is inclusive) and above all
SAMPLES = [
    [],
    [0.0005],
    [0.001, 0.01, 0.1, 1],
    [0.0011, 0.5, 2.0, 1e9, 0.0],
    [0.05] * 7,
]


def _samples(registry, keep=("_bucket", "_count", "_sum", "_total")) -> list[str]:
    """Exposition lines without the _created series (prometheus_client's own timestamps)."""
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if not line.startswith("#")
        and "_created" not in line
        and any(k in line.split("{")[0].split(" ")[0] for k in keep)
    ]


@pytest.mark.parametrize("values", SAMPLES)
def test_histogram_matches_prometheus_client(values):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    t = TallyHistogram("h_seconds", "doc", ["server"], buckets=BOUNDS, registry=ours)
    p = Histogram("h_seconds", "doc", ["server"], buckets=BOUNDS, registry=theirs)
    cell = t.labels("a")
    p.labels("a")  # both: a series exists from its first labels()
    for v in values:
        cell.observe(v)
        p.labels("a").observe(v)
    assert _samples(ours) == _samples(theirs)


@pytest.mark.parametrize("increments", [[], [1], [1, 1, 5]])
def test_counter_matches_prometheus_client(increments):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    t = TallyCounter("requests", "doc", ["server", "outcome"], registry=ours)
    p = Counter("requests", "doc", ["server", "outcome"], registry=theirs)
    t.labels("s", "ok")
    p.labels("s", "ok")
    for n in increments:
        t.labels("s", "ok").inc(n)
        p.labels("s", "ok").inc(n)
    assert _samples(ours) == _samples(theirs)


def test_unlabelled_series_and_wrong_label_count():
    reg = CollectorRegistry()
    h = TallyHistogram("added_seconds", "doc", buckets=BOUNDS, registry=reg)
    h.observe(0.02)
    assert reg.get_sample_value("added_seconds_bucket", {"le": "0.1"}) == 1
    assert reg.get_sample_value("added_seconds_bucket", {"le": "0.01"}) == 0
    assert reg.get_sample_value("added_seconds_count") == 1
    with pytest.raises(ValueError, match="expected labels"):
        TallyCounter("c", "doc", ["a"], registry=reg).labels("x", "y")


def test_name_clash_is_refused_as_prometheus_client_does():
    reg = CollectorRegistry()
    Counter("requests", "doc", registry=reg)
    with pytest.raises(ValueError, match="Duplicated"):
        TallyCounter("requests", "doc", registry=reg)


def test_histogram_needs_a_finite_bound():
    with pytest.raises(ValueError, match="finite bucket"):
        TallyHistogram("h", "doc", buckets=(float("inf"),), registry=None)
