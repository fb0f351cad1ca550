"""Counters and histograms for the proxy's per-request path, held as plain numbers.

prometheus_client's Counter.inc and Histogram.observe take a lock and walk the buckets: about
a microsecond and three respectively, five times per proxied request, which was a tenth of
the proxy's whole per-request CPU. The series here are updated by the one event-loop thread
with plain arithmetic (an increment, a bisect) and read by the exposition through the
standard custom-collector interface, so what a scrape shows is the same metric families,
names and bucket semantics as prometheus_client's own (`_total`, `_bucket{le}` cumulative,
`_count`, `_sum`).

Only one thread may update a series (the proxy's loop). A scrape from another thread reads
without a lock: it may see an observation in a bucket before it is in `_sum`, never a torn
number (each update is one assignment under the GIL).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString


class CounterCell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class HistogramCell:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bucket le=b holds observations <= b: the first bound not below value
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


Cell = TypeVar("Cell", CounterCell, HistogramCell)


class _Family(ABC, Generic[Cell]):
    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
    ):
        self.name, self.doc = name, doc
        self.labelnames = tuple(labelnames)
        self._cells: dict[tuple[str, ...], Cell] = {}
        if not self.labelnames:
            self._cells[()] = self._new_cell()
        if registry is not None:  # as prometheus_client: None registers nowhere
            registry.register(self)

    def labels(self, *values: str) -> Cell:
        """The series for these label values (created on first use). Callers on a hot path
        keep the cell: labels() is a dict lookup, the cell's update is the cheap part."""
        cell = self._cells.get(values)  # the usual call: a series already made, str labels
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            key = tuple(str(v) for v in values)
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = self._new_cell()
        return cell

    @abstractmethod
    def _new_cell(self) -> Cell: ...

    @abstractmethod
    def collect(self) -> Iterator[Metric]: ...

    def _series(self) -> list[tuple[tuple[str, ...], Cell]]:
        return list(self._cells.items())  # a snapshot: the loop may add a series meanwhile


class TallyCounter(_Family[CounterCell]):
    def _new_cell(self) -> CounterCell:
        return CounterCell()

    def describe(self) -> Iterator[CounterMetricFamily]:  # for the registry's name check
        yield CounterMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, cell in self._series():
            family.add_metric(list(key), cell.value)
        yield family


class TallyHistogram(_Family[HistogramCell]):
    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = (),
        registry: CollectorRegistry | None = None,
    ):
        self.bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        if not self.bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket bound")
        super().__init__(name, doc, labelnames, registry)

    def _new_cell(self) -> HistogramCell:
        return HistogramCell(self.bounds)

    def observe(self, value: float) -> None:
        self._cells[()].observe(value)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, cell in self._series():
            counts, total = list(cell.counts), cell.sum
            cumulative, running = [], 0
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=False):
                running += n
                cumulative.append((floatToGoString(bound), running))
            family.add_metric(list(key), cumulative, total)
        yield family
