"""The executable-hash cache on the real kernel: a trusted binary overwritten in place.

Issue 15 item 4: `unix:sha256:` selectors come from a SHA-256 of the file the process runs,
cached by file identity. Code of the same size written over a trusted binary, with its
mtime put back by utime(2), must not be attested with the trusted binary's digest.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess

import pytest
from prometheus_client import CollectorRegistry

from agent.attest.attestor import Attestor
from agent.config import AttestSection, IdentitySection
from agent.identity.manager import IdentityManager
from agent.observe.logging import AuditLog
from tests.kernel import cgroup_child, copied_binaries, enter_cgroup

pytestmark = pytest.mark.kernel


def test_a_same_size_overwrite_with_its_mtime_restored_loses_the_sha256_identity(tmp_path, procs):
    registry = CollectorRegistry()
    attestor = Attestor(AttestSection(), registry=registry)
    with cgroup_child() as cg, copied_binaries("sleep", "cat") as bins:
        # the trusted tool and the attacker's code, padded to one size (an ELF runs the same
        # with bytes after its end)
        trusted_code, other_code = bins["sleep"].read_bytes(), bins["cat"].read_bytes()
        size = max(len(trusted_code), len(other_code)) + 4096
        trusted_code, other_code = trusted_code.ljust(size, b"\0"), other_code.ljust(size, b"\0")
        tool = bins["sleep"].parent / "trusted-tool"
        tool.write_bytes(trusted_code)
        os.chmod(tool, 0o755)
        trusted = hashlib.sha256(trusted_code).hexdigest()
        entries = tmp_path / "entries.toml"
        entries.write_text(f"""
[[entry]]
id = "trusted-tool"
spiffe_id = "spiffe://example.org/trusted-tool"
selectors = ["unix:sha256:{trusted}", "cgroup:path:/{cg.name}"]
""")
        manager = IdentityManager(
            IdentitySection(entries_file=str(entries)),
            str(tmp_path / "state"),
            audit=AuditLog("n", io.StringIO()),
            registry=registry,
        )
        attestor.start()
        try:
            manager.start()
            try:
                p = subprocess.Popen([str(tool), "30"], preexec_fn=enter_cgroup(cg))
                procs.append(p)
                att = attestor.attest(p.pid, timeout=5)
                assert att is not None and f"unix:sha256:{trusted}" in att.selectors
                ident = manager.resolve(att)
                assert ident is not None and str(ident.spiffe_id).endswith("/trusted-tool")
                p.kill()
                p.wait()

                # the attack: same inode, same size, same mtime; new code
                before = os.stat(tool)
                with open(tool, "r+b") as f:
                    f.write(other_code)
                os.utime(tool, ns=(before.st_atime_ns, before.st_mtime_ns))
                after = os.stat(tool)
                assert (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == (
                    before.st_dev,
                    before.st_ino,
                    before.st_size,
                    before.st_mtime_ns,
                )
                assert after.st_ctime_ns != before.st_ctime_ns  # what utime cannot put back

                q = subprocess.Popen(
                    [str(tool)], stdin=subprocess.PIPE, preexec_fn=enter_cgroup(cg)
                )  # cat, waiting on stdin
                procs.append(q)
                att2 = attestor.attest(q.pid, timeout=5)
                assert att2 is not None and att2.exe == str(tool)
                poisoned = f"unix:sha256:{trusted}" in att2.selectors
                assert not poisoned, "the overwritten binary was attested with the trusted digest"
                assert f"unix:sha256:{hashlib.sha256(other_code).hexdigest()}" in att2.selectors
                assert manager.resolve(att2) is None
            finally:
                manager.stop()
        finally:
            attestor.stop()
