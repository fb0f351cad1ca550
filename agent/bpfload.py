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


def compile_program(name: str, cflags: list[str] | None = None):
    """Compile bpf/<name>.c with BCC; raises on a missing file or a verifier/compiler error."""
    from bcc import BPF

    src = source_dir() / f"{name}.c"
    if not src.is_file():
        raise FileNotFoundError(f"missing BPF source {src}")
    flags = [f"-I{source_dir()}", *(cflags or [])]
    return BPF(src_file=str(src).encode(), cflags=flags)
