"""Attestation's process event source compiles its programs into the redirect's object when
the agent injects (agent/wiring.py: one object, one BCC compile), and alone otherwise. BCC's
object is stood in for at the narrowest seam (its tables); the kernel half runs in every
integration test that starts an agent."""

from __future__ import annotations

import ctypes as ct
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from agent.attest import events
from agent.attest.events import ProcessEventSource


class Event(ct.Structure):  # what BCC derives from struct process_event, in short
    _fields_ = [("type", ct.c_uint32)]


class Object:
    """A bcc.BPF as the source uses it."""

    def __init__(self) -> None:
        ring = SimpleNamespace(_event_class=Event, open_ring_buffer=self._opened)
        self.tables = {
            b"process_events": ring,
            b"process_images": SimpleNamespace(map_fd=-1, Leaf=object),
            b"process_events_lost": {},
            b"image_changes": SimpleNamespace(map_fd=-1),  # not mappable: syscalls only
        }
        self.rings: list[Any] = []
        self.cleaned = 0
        self.polled = threading.Event()

    def _opened(self, callback: Any) -> None:
        self.rings.append(callback)

    def __getitem__(self, name: bytes) -> Any:
        return self.tables[name]

    def ring_buffer_poll(self, timeout_ms: int) -> None:
        self.polled.set()
        threading.Event().wait(timeout_ms / 1000)

    def cleanup(self) -> None:
        self.cleaned += 1


class Redirect:
    """agent/inject/redirect.Redirector's compile_with, recorded."""

    def __init__(self, program: Object):
        self.program = program
        self.asked: list[tuple[list[str], list[str]]] = []

    def compile_with(self, first: Any = (), first_flags: Any = ()) -> Object:
        self.asked.append((list(first), list(first_flags)))
        return self.program


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[str, ...], list[str]]]:
    made: list[tuple[tuple[str, ...], list[str]]] = []

    def compile_program(*names: str, cflags: list[str]) -> Object:
        made.append((names, cflags))
        return Object()

    monkeypatch.setattr(events, "compile_program", compile_program)
    monkeypatch.setattr(events, "compile_flags", lambda pages, pin_dir: ["-DRINGBUF_PAGES=8"])
    return made


def test_shared_with_the_redirect_its_programs_are_compiled_first_into_that_object(compiled):
    program = Object()
    redirect = Redirect(program)
    source = ProcessEventSource(lambda ev: None, ring_pages=8)
    source.shared_with = redirect
    source.start()
    try:
        assert redirect.asked == [(["process_events"], ["-DRINGBUF_PAGES=8"])]
        assert compiled == []  # no object of its own
        assert len(program.rings) == 1 and program.polled.wait(10)  # its ring, read
    finally:
        source.stop()
    assert program.cleaned == 1  # the source owns the object: it stops last


def test_alone_it_compiles_an_object_of_its_own(compiled):
    source = ProcessEventSource(lambda ev: None, ring_pages=8)
    source.start()
    source.stop()
    assert compiled == [(("process_events",), ["-DRINGBUF_PAGES=8"])]
