"""Start the real oidc-provider (tests/oidc/oidc_server.mjs) on loopback for a test.

With `tls` (a tests/tlsca.py TestCA) it serves https as https://localhost:PORT with a leaf
of that CA, and trusts that CA for what it fetches itself (clients' jwks_uri: the agent's
bundle endpoint over https), as an authorization server elsewhere trusts the Web PKI.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.helpers import stop_process
from tests.tlsca import TestCA

HERE = Path(__file__).resolve().parent


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
        self.stderr_path = self.cfg_path.with_suffix(".stderr")
        self.proc: subprocess.Popen | None = None
        self.issuer = ""

    def _leaf(self, tmp_path: Path, ca: TestCA) -> dict[str, str]:
        cert, key = ca.issue(f"oidc-{time.monotonic_ns()}")
        return {"cert": str(cert), "key": str(key)}

    def start(self) -> OidcProvider:
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
        stop_process(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
