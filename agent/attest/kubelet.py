"""The kubelet client: the agent's view of the pods on this node, read from the kubelet's
authenticated /pods endpoint over pinned TLS, cached and rate-limited.

The kubelet, not the API server, is the source: it knows every pod on the node the moment
it starts containers (static pods included), and asking it keeps the agent's load local.
The body is parsed by kubelet_pods.py (sans-IO); failures are KubeletErrors with the
outcomes of kubelet_errors.py; ${VAR} in the settings is expanded by kubelet_settings.py.

What the kubelet requires of the caller (for operators wiring RBAC; deploy/k8s/README.md):
- authentication: a bearer token the kubelet can check with a TokenReview, which needs
  the kubelet to run with --authentication-token-webhook (kubeadm sets it);
- authorization: the kubelet checks GET /pods as `get` on `nodes/pods` *or* `nodes/proxy`
  when fine-grained kubelet authorization is on (KubeletFineGrainedAuthz: alpha in 1.32,
  on by default from 1.33, GA in 1.36), and as `nodes/proxy` alone otherwise. `nodes/proxy`
  also reaches exec, attach and port-forward on the kubelet: prefer `nodes/pods`. A 403
  names the subresources the kubelet checked, so the error says which one to grant;
- TLS: the kubelet's serving certificate must verify against `ca_file` *and* name the
  host in `url` (or `server_name`). Certificates from serverTLSBootstrap are signed by the
  cluster CA and carry the node's name and IPs, rarely 127.0.0.1: point `url` at the node IP
  (downward API `status.hostIP`). kubeadm's default is a self-signed certificate naming
  only the node's host name (/var/lib/kubelet/pki/kubelet.crt): trust that file as
  `ca_file` with `server_name` = the host name, or, as a documented last resort,
  `insecure_skip_verify`.

Every request is counted by outcome (`credless_kubelet_requests_total{outcome}`) when a
registry is given.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter

from agent.attest.kubelet_errors import (
    OUTCOMES,
    RBAC_FILES,
    Forbidden,
    KubeletError,
    parse_forbidden,
)
from agent.attest.kubelet_pods import PodInfo, parse_pod_list

__all__ = ["DEFAULT_CA_FILE", "DEFAULT_TOKEN_FILE", "DEFAULT_URL", "KubeletClient", "Probe"]

log = structlog.get_logger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_URL = "https://127.0.0.1:10250"
DEFAULT_TOKEN_FILE = f"{SERVICE_ACCOUNT_DIR}/token"
DEFAULT_CA_FILE = f"{SERVICE_ACCOUNT_DIR}/ca.crt"

# A busy node's /pods is a few MiB; anything far larger is not a kubelet talking.
MAX_RESPONSE_BYTES = 64 << 20
# Bearer tokens (JWTs) are printable ASCII without spaces. Checking before sending keeps
# the token out of http.client's "Invalid header value" error, which quotes the value.
_TOKEN = re.compile(r"[\x21-\x7e]+")
# A server name to verify the certificate against: a DNS name or an address, nothing else.
_SERVER_NAME = re.compile(r"[A-Za-z0-9.:_-]+")


@dataclass(frozen=True)
class Probe:
    """One uncached request to the kubelet (`credless doctor`): the HTTP status, and for a
    403 what the kubelet checked. `error` is the operator message for anything but 200."""

    path: str
    status: int
    forbidden: Forbidden | None
    error: KubeletError | None


class _PinnedNameConnection(http.client.HTTPSConnection):
    """Connects to the url's host but verifies the certificate against another name: a
    kubelet reached by node IP whose self-signed certificate names only its host name."""

    def __init__(self, host: str, port: int, *, server_name: str, **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self._server_name
        )


class KubeletClient:
    """Looks pods up by uid, from a cache of the kubelet's /pods. Thread-safe.

    A fresh cache hit costs no request. A miss (a pod that just started) or an expired
    cache triggers one refresh, but never more than one per `min_refresh_interval`, so a
    flood of lookups for a uid that does not exist cannot hammer the kubelet; concurrent
    misses share one request. While rate-limited, a miss returns None, or re-raises the
    last refresh's error if it failed: "no such pod" and "kubelet unreachable" never
    look alike. `clock` is injectable for tests; it must be monotonic.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token_file: str = DEFAULT_TOKEN_FILE,
        ca_file: str = DEFAULT_CA_FILE,
        cache_ttl_seconds: float = 5.0,
        min_refresh_interval: float = 0.5,
        timeout: float = 5.0,
        insecure_skip_verify: bool = False,
        server_name: str | None = None,
        registry: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(
                f"kubelet url {url!r} must be https://host[:port]: the bearer "
                "token must not travel in clear text"
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(
                "kubelet url must not carry credentials, a query or a fragment; "
                "the token comes from token_file"
            )
        if cache_ttl_seconds < 0 or min_refresh_interval < 0 or timeout <= 0:
            raise ValueError(
                "cache_ttl_seconds and min_refresh_interval must be >= 0 and timeout > 0"
            )
        if server_name is not None and not _SERVER_NAME.fullmatch(server_name):
            raise ValueError(
                f"kubelet server_name {server_name!r} must be a host name or an address"
            )
        self._url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self._host, self._port = parts.hostname, parts.port or 443
        # A path prefix lets the same client go through the API server's node proxy.
        self._base = parts.path.rstrip("/")
        self._token_file, self._ca_file = token_file, ca_file
        self._ttl, self._min_interval = cache_ttl_seconds, min_refresh_interval
        self._timeout = timeout
        self._insecure = insecure_skip_verify
        self._server_name = server_name
        self._clock = clock
        self._requests = Counter(
            "credless_kubelet_requests",
            "Requests to the kubelet, by outcome (forbidden: grant the RBAC resource the "
            "agent's log names; tls_verify: check attest.kubelet.ca_file)",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self._requests.labels(outcome)

        self._lock = threading.Lock()  # guards the fields below; never held during I/O
        self._refresh_lock = threading.Lock()  # one refresh at a time (single flight)
        self._pods: dict[str, PodInfo] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_error: KubeletError | None = None

    @property
    def url(self) -> str:
        return self._url

    def pod(self, uid: str) -> PodInfo | None:
        """The pod with this uid on this node, or None. Raises KubeletError."""
        with self._lock:
            if uid in self._pods and self._fresh(self._clock()):
                return self._pods[uid]
        with self._refresh_lock:
            with self._lock:
                now = self._clock()
                if uid in self._pods and self._fresh(now):
                    return self._pods[uid]  # another thread refreshed while we waited
                if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
                    if (e := self._last_error) is not None:
                        raise KubeletError(
                            str(e), status=e.status, outcome=e.outcome, grant=e.grant
                        )
                    return self._pods.get(uid)
                self._last_attempt = now
            try:
                pods = self._fetch()
            except KubeletError as e:
                with self._lock:
                    self._last_error = e
                raise
            with self._lock:
                self._pods, self._fetched_at, self._last_error = pods, now, None
                return pods.get(uid)

    def probe(self, path: str = "/pods") -> Probe:
        """One GET of `path` under the url, bypassing the cache, for `credless doctor`.
        Raises KubeletError when there is no HTTP answer (files, TLS, network)."""
        status, body, token = self._counted(path)
        if status == 200:
            self._requests.labels("ok").inc()
            return Probe(path, status, None, None)
        return Probe(path, status, parse_forbidden(body), self._status_error(status, body, token))

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._ttl

    def _fetch(self) -> dict[str, PodInfo]:
        status, body, token = self._counted("/pods")
        if status != 200:
            raise self._status_error(status, body, token)
        try:
            pods = parse_pod_list(body)
        except KubeletError:
            self._requests.labels("bad_response").inc()
            raise
        self._requests.labels("ok").inc()
        log.debug("kubelet pods refreshed", url=self._url, pods=len(pods))
        return pods

    def _counted(self, path: str) -> tuple[int, bytes, str]:
        """_request, with its outcome counted unless it is a 200, which the caller counts
        once it knows the body is what it asked for."""
        try:
            status, body, token = self._request(path)
        except KubeletError as e:
            self._requests.labels(e.outcome).inc()
            raise
        if status != 200:
            self._requests.labels(_status_outcome(status)).inc()
        return status, body, token

    def _request(self, path: str) -> tuple[int, bytes, str]:
        token = self._read_token()  # every time: projected tokens rotate on disk
        context = self._tls_context()
        if self._server_name is None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=context
            )
        else:
            conn = _PinnedNameConnection(
                self._host,
                self._port,
                server_name=self._server_name,
                timeout=self._timeout,
                context=context,
            )
        try:
            conn.request(
                "GET",
                self._base + path,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    "User-Agent": "credless",
                },
            )
            response = conn.getresponse()
            body = response.read(MAX_RESPONSE_BYTES + 1)
        except ssl.SSLCertVerificationError as e:
            name = self._server_name or self._host
            raise KubeletError(
                f"TLS verification of the kubelet at {self._url} failed ({e.verify_message}); "
                f"check that {self._ca_file} holds the CA that signed the kubelet's serving "
                f"certificate and that the certificate names {name!r} (the url's host, or "
                "server_name); deploy/k8s/README.md lists the choices, insecure_skip_verify "
                "last",
                outcome="tls_verify",
            ) from None
        except ssl.SSLError as e:
            raise KubeletError(
                f"TLS handshake with the kubelet at {self._url} failed: {e.reason or e}",
                outcome="tls_error",
            ) from None
        except TimeoutError:
            raise KubeletError(
                f"kubelet at {self._url} did not answer within "
                f"{self._timeout:g}s; check the url and the kubelet's health",
                outcome="timeout",
            ) from None
        except OSError as e:
            raise KubeletError(
                f"cannot reach the kubelet at {self._url}: {e.strerror or e}; "
                "check the url (node address and kubelet --port)",
                outcome="unreachable",
            ) from None
        except (http.client.HTTPException, ValueError) as e:
            # Exception text is left out: http.client quotes header values, and one of them
            # holds the token.
            raise KubeletError(
                f"kubelet at {self._url} sent no valid HTTP response ({type(e).__name__})",
                outcome="bad_response",
            ) from None
        finally:
            conn.close()
        if len(body) > MAX_RESPONSE_BYTES:
            raise KubeletError(
                f"kubelet {path} response from {self._url} is larger than "
                f"{MAX_RESPONSE_BYTES >> 20} MiB",
                outcome="bad_response",
            )
        if response.status != 200:
            # An error body is quoted in messages and parsed for the user the kubelet saw:
            # whatever echoes the credential there must not carry it further.
            body = body.replace(token.encode(), b"[redacted]")
        return response.status, body, token

    def _read_token(self) -> str:
        try:
            with open(self._token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8"
            raise KubeletError(
                f"cannot read the kubelet bearer token from {self._token_file}: "
                f"{reason}; mount a service account token there",
                outcome="local_config",
            ) from None
        if not _TOKEN.fullmatch(token):
            raise KubeletError(
                f"{self._token_file} does not hold a bearer token (it is empty "
                "or has spaces or control characters inside)",
                outcome="local_config",
            )
        return token

    def _tls_context(self) -> ssl.SSLContext:
        if self._insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            # Loaded on every refresh, like the token: the CA bundle can rotate too. With a
            # cafile, the system trust store is *not* loaded: only this CA is trusted.
            return ssl.create_default_context(cafile=self._ca_file)
        except (OSError, ssl.SSLError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise KubeletError(
                f"cannot load the kubelet CA from {self._ca_file}: {reason}; "
                "point ca_file at a PEM bundle with the CA that signed the "
                "kubelet's serving certificate",
                outcome="local_config",
            ) from None

    def _status_error(self, status: int, body: bytes, token: str) -> KubeletError:
        grant = None
        if status == 401:
            text = (
                f"kubelet at {self._url} answered 401 Unauthorized: it did not accept the "
                f"bearer token from {self._token_file}; check that the token is current "
                "and that the kubelet runs with --authentication-token-webhook"
            )
        elif status == 403:
            text, grant = self._forbidden_text(parse_forbidden(body))
        else:
            text = f"kubelet at {self._url} answered HTTP {status}; check the kubelet's logs"
        # The kubelet's own words say which user and subresource it checked: worth keeping,
        # minus anything that echoes the credential.
        # Redact before cutting, so a token straddling the cut cannot leak in part.
        said = body.decode("utf-8", "replace").replace(token, "[redacted]")
        said = " ".join(said.split())[:300]
        message = f"{text} (kubelet said: {said})" if said else text
        return KubeletError(message, status=status, outcome=_status_outcome(status), grant=grant)

    def _forbidden_text(self, forbidden: Forbidden | None) -> tuple[str, str | None]:
        head = f"kubelet at {self._url} answered 403 Forbidden"
        if forbidden is None or forbidden.grant is None:
            return (
                f"{head}: grant the token's identity 'get' on 'nodes/pods' (kubelets with "
                "KubeletFineGrainedAuthz, on by default from Kubernetes 1.33) or on "
                "'nodes/proxy' (older kubelets)",
                None,
            )
        who, verb, grant = forbidden.user, forbidden.verb, forbidden.grant
        if forbidden.fine_grained:
            return (
                f"{head}: grant {who} '{verb}' on '{grant}' ({RBAC_FILES.get(grant, 'RBAC')}); "
                "this kubelet has fine-grained authorization (KubeletFineGrainedAuthz), so "
                "'nodes/proxy' is not needed",
                grant,
            )
        if grant == "nodes/proxy":
            return (
                f"{head}: this kubelet authorizes GET /pods as 'nodes/proxy' only (no "
                "KubeletFineGrainedAuthz: a kubelet before 1.33, or the gate turned off), so "
                f"'nodes/pods' is not enough; grant {who} '{verb}' on 'nodes/proxy' "
                f"({RBAC_FILES['nodes/proxy']}: a broad grant, see deploy/k8s/README.md), or "
                "turn KubeletFineGrainedAuthz on",
                grant,
            )
        return f"{head}: grant {who} '{verb}' on '{grant}'", grant


def _status_outcome(status: int) -> str:
    return {200: "ok", 401: "unauthorized", 403: "forbidden"}.get(status, "http_error")
