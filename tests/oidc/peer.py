"""Start the real oidc-provider (tests/oidc/provider.mjs) on loopback for a test.

With `tls` (a tests/tlsca.py TestCA) it serves https as https://localhost:PORT with a leaf
of that CA, and trusts that CA for what it fetches itself (clients' jwks_uri: the agent's
bundle endpoint over https), as an authorization server elsewhere trusts the Web PKI.

Where it runs: a test's provider is served by its test process's one node process
(tests/oidc/oidc_host.mjs, started on first use), as a provider of its own (storage, keys,
socket, log): a node process and oidc-provider's import cost about 0.25 s of CPU, and a run
starts some 150 providers. A provider gets a process of its own (tests/oidc/oidc_server.mjs,
`.proc`) when the test asks for it (own_process: it signals the process) or serves https
(its trust is the process's NODE_EXTRA_CA_CERTS).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.helpers import stop_process
from tests.tlsca import TestCA

HERE = Path(__file__).resolve().parent
ANSWER_SECONDS = 60  # for a provider's start or stop, on a loaded 2-core machine


class ProviderHost:
    """tests/oidc/oidc_host.mjs, spoken to over its stdin and stdout; it exits when its
    stdin closes (at this process's exit, or its death)."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="credless-oidc-host-", suffix=".stderr")
        self.stderr_path = Path(name)  # its stdout too: oidc-provider's notices
        answers, theirs = os.pipe()
        with os.fdopen(fd, "wb") as output:
            self.proc = subprocess.Popen(
                ["node", str(HERE / "oidc_host.mjs"), str(theirs)],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                pass_fds=(theirs,),
                text=True,
            )
        os.close(theirs)
        self.answers = os.fdopen(answers, "r")
        self._lock = threading.Lock()
        self._last_id = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, **request: object) -> dict:
        """The host's answer to request; RuntimeError with its stderr if it gives none."""
        assert self.proc.stdin is not None
        with self._lock:
            self._last_id += 1
            request["id"] = self._last_id
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.answers], [], [], ANSWER_SECONDS)
                line = self.answers.readline() if ready else ""
            except OSError as e:
                line = f"(host gone: {e})"
            try:
                answer = json.loads(line)
            except ValueError:
                answer = {}
            if answer.get("id") != request["id"] or "error" in answer:
                raise RuntimeError(
                    f"oidc-provider host answered {line!r} to {request['op']}: "
                    f"{answer.get('error', '')} {self.stderr_path.read_text()[-2000:]}"
                )
            return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        stop_process(self.proc)
        self.answers.close()
        self.stderr_path.unlink(missing_ok=True)


_host: ProviderHost | None = None


def provider_host() -> ProviderHost:
    """This process's host, started on first use, and again if it died."""
    global _host
    if _host is None or not _host.alive():
        if _host is not None:
            _host.close()
        else:
            atexit.register(lambda: _host is not None and _host.close())
        _host = ProviderHost()
    return _host


class OidcProvider:
    def __init__(
        self,
        tmp_path: Path,
        *,
        clients=(),
        resources=None,
        dpop=True,
        require_nonce=False,
        registration=False,
        spiffe_assertion=True,
        access_token_ttl=300,
        tls: TestCA | None = None,
        own_process=False,
    ):
        if not (HERE / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError("tests/oidc/node_modules is missing: run `make setup`")
        self.cfg_path = tmp_path / f"oidc-{time.monotonic_ns()}.json"
        self.cfg_path.write_text(
            json.dumps(
                {
                    "port": 0,
                    "clients": list(clients),
                    "resources": resources or {},
                    "dpop": {"enabled": dpop, "require_nonce": require_nonce},
                    "registration": {"enabled": registration},
                    "spiffe_assertion": spiffe_assertion,
                    "access_token_ttl": access_token_ttl,
                    **({"tls": self._leaf(tmp_path, tls)} if tls else {}),
                }
            )
        )
        self.ca = tls
        self.own_process = own_process or tls is not None
        self.stderr_path = self.cfg_path.with_suffix(".stderr")  # its events, one JSON line each
        self.proc: subprocess.Popen | None = None  # its own process, if it has one
        self._host: ProviderHost | None = None  # the process serving it, if shared
        self.issuer = ""

    def _leaf(self, tmp_path: Path, ca: TestCA) -> dict[str, str]:
        cert, key = ca.issue(f"oidc-{time.monotonic_ns()}")
        return {"cert": str(cert), "key": str(key)}

    def start(self) -> OidcProvider:
        if not self.own_process:
            self._host = provider_host()
            self.stderr_path.touch()
            answer = self._host.call(
                op="start", config=str(self.cfg_path), log=str(self.stderr_path)
            )
            self.issuer = answer["issuer"]
            return self
        env = dict(os.environ)
        if self.ca is not None:
            env["NODE_EXTRA_CA_CERTS"] = str(self.ca.cert_path)
        self.proc = subprocess.Popen(
            ["node", str(HERE / "oidc_server.mjs"), str(self.cfg_path)],
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "wb"),
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(
                f"oidc-provider did not start: {line!r} {self.stderr_path.read_text()[-2000:]}"
            )
        self.issuer = line.split()[1]
        return self

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def registration_endpoint(self) -> str:
        return f"{self.issuer}/reg"

    def fetched(self) -> list[str]:
        """The URLs oidc-provider fetched itself (clients' jwks_uri), in order."""
        return [e["url"] for e in self.events("fetch")]

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for ln in self.stderr_path.read_text().splitlines():
            if ln.startswith("{"):
                e = json.loads(ln)
                if name is None or e.get("event") == name:
                    out.append(e)
        return out

    def stop(self) -> None:
        if self._host is not None:
            host, self._host = self._host, None
            if host.alive():
                host.call(op="stop", issuer=self.issuer)
        stop_process(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
