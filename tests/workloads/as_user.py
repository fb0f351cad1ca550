"""Run a workload module as another user, in a cgroup:
    python -m tests.workloads.as_user CGROUP_DIR UID GID MODULE ARGS

The process first moves itself into CGROUP_DIR (so the test need not run Python between
fork and exec, in a parent full of threads). The interpreter lives where an unprivileged
user may not read it, so the module (and what it imports) is loaded next; then the process
drops to UID/GID with no supplementary groups, for good (real, effective and saved ids),
and runs the module's main() with ARGS. From then on the kernel, and so the agent, sees a
process of that user in that cgroup. Exits with main()'s status.
"""

from __future__ import annotations

import importlib
import os
import sys


def main() -> int:
    cgroup, uid, gid, module = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write("0")
    mod = importlib.import_module(module)
    # what the workloads import lazily, loaded while the files are still readable
    for name in (
        *getattr(mod, "LAZY_IMPORTS", ()),
        "concurrent.futures.thread",
        "json",
        "encodings.idna",
        "grpc._channel",
    ):
        importlib.import_module(name)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    assert os.getresuid() == (uid, uid, uid) and os.getgroups() == []
    sys.argv = [module, *sys.argv[5:]]
    return mod.main()


if __name__ == "__main__":
    raise SystemExit(main())
