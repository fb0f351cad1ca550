"""FakeKubelet: an in-test HTTPS server shaped like the kubelet's authenticated API (:10250).

This is a FAKE, not a kubelet. No kubelet (nor API server for its TokenReview and
SubjectAccessReview) can run on the test machines, so this server is built from the public
kubelet code's behaviour, as far as credless meets it:

- authentication (pkg/kubelet/server/server.go, InstallAuthFilter): a bearer token is
  looked up in `tokens` (standing in for the TokenReview webhook); none or an unknown one
  is 401 with the body "Unauthorized";
- authorization (pkg/kubelet/server/auth.go, GetRequestAttributes): GET is verb `get` on
  resource `nodes`; /pods and /runningpods/ are subresource `pods`, /healthz `healthz`,
  /configz `configz` *then* `proxy` when KubeletFineGrainedAuthz is on (any one allows),
  else `proxy` alone; /stats, /metrics, /logs have their own. The gate: absent before
  1.32, alpha (off) in 1.32, beta (on) from 1.33, GA (locked on) from 1.36;
- the 403 body: "Forbidden (user=U, verb=get, resource=nodes, subresource(s)=[pods proxy])"
  from 1.32, "Forbidden (user=U, verb=get, resource=nodes, subresource=proxy)" before;
- `grants` stands in for RBAC: user -> the `nodes/<sub>` resources bound to it for `get`.

Serving certificates for the three trust choices are made by the helpers below: one signed
by a cluster CA (serverTLSBootstrap), and kubeadm's default, a self-signed pair as
client-go's certutil.GenerateSelfSignedCertKey writes it (kubelet.crt: leaf, then its own
CA `<host>-ca@<unix time>`; SAN: the host name only).
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.observe.serving import serve_in_background, stop_serving
from tests.tlsca import subject_alt_names, write_key

FINE_GRAINED_ALPHA = (1, 32)
FINE_GRAINED_BETA = (1, 33)
FINE_GRAINED_GA = (1, 36)

_PODS = ("/pods", "/runningpods")
_OWN = {"/stats": "stats", "/metrics": "metrics", "/logs": "log", "/checkpoint": "checkpoint"}
_FINE = {"/healthz": "healthz", "/configz": "configz", "/statusz": "statusz"}


def _is_subpath(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


@dataclass
class KubeletVersion:
    """A kubelet's minor version and its KubeletFineGrainedAuthz gate (None: the default)."""

    minor: tuple[int, int]
    gate: bool | None = None

    def __post_init__(self) -> None:
        if self.gate is not None and self.minor < FINE_GRAINED_ALPHA:
            raise ValueError(f"kubelet {self.minor} has no KubeletFineGrainedAuthz gate")
        if self.gate is False and self.minor >= FINE_GRAINED_GA:
            raise ValueError("KubeletFineGrainedAuthz is GA (locked on) from 1.36")

    @property
    def fine_grained(self) -> bool:
        if self.gate is not None:
            return self.gate
        return self.minor >= FINE_GRAINED_BETA

    def subresources(self, path: str) -> list[str]:
        """GetRequestAttributes: the subresources tried for a GET of path, in order."""
        subs = []
        if self.fine_grained:
            if any(_is_subpath(path, p) for p in _PODS):
                subs.append("pods")
            subs += [sub for p, sub in _FINE.items() if _is_subpath(path, p)]
        own = [sub for p, sub in _OWN.items() if _is_subpath(path, p)]
        return subs + (own or ["proxy"])

    def forbidden(self, user: str, subs: list[str]) -> str:
        if self.minor < FINE_GRAINED_ALPHA:
            return f"Forbidden (user={user}, verb=get, resource=nodes, subresource={subs[0]})"
        return (
            f"Forbidden (user={user}, verb=get, resource=nodes, subresource(s)=[{' '.join(subs)}])"
        )


@dataclass
class Request:
    path: str
    authorization: str
    status: int


@dataclass
class FakeKubelet:
    """Serves on 127.0.0.1 (port 0: the kernel picks) until stopped; see `running()`."""

    cert_file: Path
    key_file: Path
    version: KubeletVersion
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> user name
    grants: dict[str, set[str]] = field(default_factory=dict)  # user -> {"nodes/pods", ...}
    pods: dict = field(default_factory=lambda: {"kind": "PodList", "apiVersion": "v1"})
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(self.cert_file, self.key_file)
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, ctype = fake.answer(self.path, self.headers.get("Authorization"))
                fake.requests.append(
                    Request(self.path, self.headers.get("Authorization", ""), status)
                )
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"

    def answer(self, target: str, authorization: str | None) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        scheme, _, token = (authorization or "").partition(" ")
        user = self.tokens.get(token) if scheme == "Bearer" else None
        if user is None:
            return 401, b"Unauthorized", text
        path = target.split("?", 1)[0]
        subs = self.version.subresources(path)
        granted = self.grants.get(user, set())
        if not any(f"nodes/{sub}" in granted for sub in subs):
            return 403, self.version.forbidden(user, subs).encode(), text
        if any(_is_subpath(path, p) for p in _PODS):
            return 200, json.dumps(self.pods).encode(), "application/json"
        if path == "/healthz":
            return 200, b"ok", text
        return 404, b"404 page not found\n", text

    def start(self) -> None:
        self._thread = serve_in_background(self._server, "fake-kubelet")

    def stop(self) -> None:
        stop_serving(self._server)
        self._thread.join()


@contextmanager
def running(kubelet: FakeKubelet) -> Iterator[FakeKubelet]:
    kubelet.start()
    try:
        yield kubelet
    finally:
        kubelet.stop()


# ------------------------------------------------------------------ serving certificates
def self_signed_serving_cert(directory: Path, host: str) -> tuple[Path, Path]:
    """kubeadm's default kubelet serving certificate (no serverTLSBootstrap), as
    certutil.GenerateSelfSignedCertKey(host, nil, nil) makes it: a CA `<host>-ca@<ts>` and a
    leaf `<host>@<ts>` naming only `host`, both in kubelet.crt (leaf first)."""
    now = dt.datetime.now(dt.UTC)
    stamp = int(now.timestamp())
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{host}-ca@{stamp}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{host}@{stamp}")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(subject_alt_names((host,))), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "kubelet.crt", directory / "kubelet.key"
    cert_path.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    write_key(key_path, key)
    return cert_path, key_path
