"""Thin user-space loader for the kernel programs in bpf/.

Kernel code lives only in bpf/*.c; this module finds those files (in a source checkout or
inside an installed wheel) and compiles them through BCC. Importing bcc is deferred to the
call so that commands that never touch the kernel (check-config, ps over the admin socket)
work on machines without BCC.
"""

from __future__ import annotations

import os
from pathlib import Path


def source_dir() -> Path:
    override = os.environ.get("CREDLESS_BPF_DIR")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for candidate in (here / "_bpf", here.parent / "bpf"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"BPF sources not found in {here / '_bpf'} or {here.parent / 'bpf'};"
        " set CREDLESS_BPF_DIR to the directory holding bpf/*.c"
    )


def compile_program(*names: str, cflags: list[str] | None = None):
    """Compile bpf/<name>.c with BCC, as one object when given more than one name; raises on
    a missing file or a verifier/compiler error.

    Several files in one object: BCC pays about 0.2 to 0.35 s of CPU for every compile,
    however small the program (it parses its helpers and the kernel headers again and reads
    /proc/kallsyms), so an agent compiles all its programs once, their sources concatenated:
    attestation's process_events at its start, with the redirect's and the cgroup watcher's
    when it injects (agent/inject/redirect.Redirector.compile_with; the object is
    attestation's, which stops last, and each part attaches and detaches its own programs).
    BCC takes only the functions of the main file as programs (an #include'd file's are
    helpers), hence the concatenation rather than an #include. Their names must not
    collide, and a map two of them declare is declared once (a header both include, or a
    macro the first defines: process_images). Each ring buffer has a consumer of its own
    (agent/inject/cgroup_watch.RingConsumer): BCC's one per object may not be added to
    while another thread polls it.
    """
    from bcc import BPF

    sources = [source_dir() / f"{name}.c" for name in names]
    for src in sources:
        if not src.is_file():
            raise FileNotFoundError(f"missing BPF source {src}")
    flags = [f"-I{source_dir()}", *(cflags or [])]
    if len(sources) == 1:
        return BPF(src_file=str(sources[0]).encode(), cflags=flags)
    return BPF(text=b"\n".join(src.read_bytes() for src in sources), cflags=flags)
