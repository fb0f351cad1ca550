"""The kubelet's view of the pods on this node, read from its authenticated /pods endpoint.

The kubelet, not the API server, is the source: it knows every pod on the node the moment
it starts containers (static pods included), and asking it keeps the agent's load local.
A container id from the cgroup path (resolvers.py) is looked up in `PodInfo.containers`.

What the kubelet requires of the caller (for operators wiring RBAC):
- authentication: a bearer token the kubelet can check with a TokenReview, which needs
  the kubelet to run with --authentication-token-webhook (kubeadm sets it);
- authorization: `get` on `nodes/pods` on kubelets with KubeletFineGrainedAuthz (beta,
  on by default since Kubernetes 1.33), else `get` on `nodes/proxy`, which also allows
  exec into every container on the node: prefer a kubelet that knows `nodes/pods`;
- TLS: the kubelet's serving certificate must verify against `ca_file` *and* name the
  host in `url`. Certificates from serverTLSBootstrap carry the node's name and IPs,
  rarely 127.0.0.1: point `url` at the node IP (downward API `status.hostIP`).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import structlog

__all__ = ["ContainerRef", "KubeletClient", "KubeletError", "PodInfo", "parse_pod_list"]

log = structlog.get_logger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_URL = "https://127.0.0.1:10250"
DEFAULT_TOKEN_FILE = f"{SERVICE_ACCOUNT_DIR}/token"
DEFAULT_CA_FILE = f"{SERVICE_ACCOUNT_DIR}/ca.crt"

# A busy node's /pods is a few MiB; anything far larger is not a kubelet talking.
MAX_RESPONSE_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Bearer tokens (JWTs) are printable ASCII without spaces. Checking before sending keeps
# the token out of http.client's "Invalid header value" error, which quotes the value.
_TOKEN = re.compile(r"[\x21-\x7e]+")
# Regular, init and ephemeral (kubectl debug) containers can all make outbound calls.
_STATUS_LISTS = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")


class KubeletError(Exception):
    """The kubelet could not be asked, or its answer was not a pod list.

    `status` is the HTTP status code when the kubelet answered with an error.
    Messages never contain the bearer token.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ContainerRef:
    name: str
    image: str
    image_id: str


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    service_account: str
    node_name: str
    labels: Mapping[str, str] = field(hash=False)
    containers: Mapping[str, ContainerRef] = field(hash=False)  # bare 64-hex id -> ref


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_url(url: str, env: Mapping[str, str]) -> str:
    """attest.kubelet.url with ${VAR} taken from the environment (NODE_IP from the downward
    API on Kubernetes). An IPv6 address lands in brackets, as a URL host must be; a variable
    that is not set is an error naming it, not a literal "${NODE_IP}" to connect to."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in env or not env[name]:
            raise KubeletError(
                f"attest.kubelet.url uses ${{{name}}}, which is not set in "
                "the agent's environment (on Kubernetes: set it from the "
                "downward API, fieldRef status.hostIP)"
            )
        value = env[name]
        if ":" in value and not value.startswith("["):
            try:
                ipaddress.IPv6Address(value)
                return f"[{value}]"
            except ValueError:
                pass
        return value

    return _VAR.sub(sub, url)


def parse_pod_list(doc: bytes | str) -> dict[str, PodInfo]:
    """PodInfo by pod uid from a kubelet /pods body (a v1 PodList). Raises KubeletError."""
    try:
        # Decoded here rather than by json.loads, which would guess UTF-16/32 from the
        # first bytes: the kubelet writes UTF-8, and anything else is not its answer.
        data = json.loads(doc.decode("utf-8") if isinstance(doc, bytes) else doc)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise KubeletError(f"kubelet /pods response is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise KubeletError(
            "kubelet /pods response is not a JSON object "
            f"(want a v1 PodList, got {_json_type(data)})"
        )
    kind, version = data.get("kind"), data.get("apiVersion")
    if (kind, version) != ("PodList", "v1"):
        raise KubeletError(
            f"kubelet /pods response has kind {kind!r} apiVersion {version!r}, "
            "want 'PodList' 'v1'; check that the URL is the kubelet's"
        )
    items = data.get("items")
    if items is None:  # Go encodes an empty list as null
        return {}
    if not isinstance(items, list):
        raise KubeletError(f"kubelet /pods response: 'items' is {_json_type(items)}, want a list")
    pods = (_parse_pod(item, f"items[{i}]") for i, item in enumerate(items))
    return {pod.uid: pod for pod in pods}


def _parse_pod(item: Any, where: str) -> PodInfo:
    pod = _object(item, where)
    meta = _object(pod.get("metadata"), f"{where}.metadata")
    spec = _object(pod.get("spec") or {}, f"{where}.spec")
    status = _object(pod.get("status") or {}, f"{where}.status")
    return PodInfo(
        uid=_required_string(meta, "uid", f"{where}.metadata"),
        namespace=_required_string(meta, "namespace", f"{where}.metadata"),
        name=_required_string(meta, "name", f"{where}.metadata"),
        # serviceAccount is the deprecated alias of serviceAccountName. Unset, the pod runs
        # as the namespace's `default` account (what the ServiceAccount admission plugin
        # fills in); in kubelet output that is seen only for static pods.
        service_account=(
            _optional_string(spec, "serviceAccountName", f"{where}.spec")
            or _optional_string(spec, "serviceAccount", f"{where}.spec")
            or "default"
        ),
        node_name=_optional_string(spec, "nodeName", f"{where}.spec"),
        labels=MappingProxyType(_labels(meta.get("labels"), f"{where}.metadata.labels")),
        containers=MappingProxyType(_containers(status, f"{where}.status")),
    )


def _containers(status: dict, where: str) -> dict[str, ContainerRef]:
    refs: dict[str, ContainerRef] = {}
    for key in _STATUS_LISTS:
        statuses = status.get(key)
        if statuses is None:
            continue
        if not isinstance(statuses, list):
            raise KubeletError(
                f"kubelet /pods response: {where}.{key} is {_json_type(statuses)}, want a list"
            )
        for j, entry in enumerate(statuses):
            cs = _object(entry, f"{where}.{key}[{j}]")
            cid = _bare_container_id(cs.get("containerID"))
            if cid is None:
                continue  # not started yet (pending pod): nothing in a cgroup can match it
            refs[cid] = ContainerRef(
                name=_required_string(cs, "name", f"{where}.{key}[{j}]"),
                image=_optional_string(cs, "image", f"{where}.{key}[{j}]"),
                image_id=_optional_string(cs, "imageID", f"{where}.{key}[{j}]"),
            )
    return refs


def _bare_container_id(value: Any) -> str | None:
    """`containerd://<id>`, `docker://<id>`, `cri-o://<id>` -> `<id>`, if 64 hex."""
    if not isinstance(value, str):
        return None
    scheme, sep, cid = value.partition("://")
    # Anything else can never equal an id taken from a cgroup path, so it is dropped.
    return cid if scheme and sep and _HEX64.fullmatch(cid) else None


def _labels(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    labels = _object(value, where)
    if not all(isinstance(v, str) for v in labels.values()):
        raise KubeletError(f"kubelet /pods response: {where} has a non-string value")
    return dict(labels)


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise KubeletError(
            f"kubelet /pods response: {where} is {_json_type(value)}, want an object"
        )
    return value


def _required_string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise KubeletError(
            f"kubelet /pods response: {where}.{key} is missing or not a non-empty string"
        )
    return value


def _optional_string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise KubeletError(
            f"kubelet /pods response: {where}.{key} is {_json_type(value)}, want a string"
        )
    return value


def _json_type(value: Any) -> str:
    for py, name in (
        (bool, "boolean"),
        (dict, "object"),
        (list, "array"),
        (str, "string"),
        ((int, float), "number"),
    ):
        if isinstance(value, py):
            return name
    return "null"


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
        self._url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self._host, self._port = parts.hostname, parts.port or 443
        # A path prefix lets the same client go through the API server's node proxy.
        self._path = parts.path.rstrip("/") + "/pods"
        self._token_file, self._ca_file = token_file, ca_file
        self._ttl, self._min_interval = cache_ttl_seconds, min_refresh_interval
        self._timeout = timeout
        self._insecure = insecure_skip_verify
        self._clock = clock

        self._lock = threading.Lock()  # guards the fields below; never held during I/O
        self._refresh_lock = threading.Lock()  # one refresh at a time (single flight)
        self._pods: dict[str, PodInfo] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_error: KubeletError | None = None

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
                    if self._last_error is not None:
                        raise KubeletError(str(self._last_error), status=self._last_error.status)
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

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._ttl

    def _fetch(self) -> dict[str, PodInfo]:
        token = self._read_token()  # every time: projected tokens rotate on disk
        conn = http.client.HTTPSConnection(
            self._host, self._port, timeout=self._timeout, context=self._tls_context()
        )
        try:
            conn.request(
                "GET",
                self._path,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    "User-Agent": "credless",
                },
            )
            response = conn.getresponse()
            body = response.read(MAX_RESPONSE_BYTES + 1)
        except ssl.SSLCertVerificationError as e:
            raise KubeletError(
                f"TLS verification of the kubelet at {self._url} failed ({e.verify_message}); "
                f"check that {self._ca_file} holds the CA that signed the kubelet's serving "
                "certificate and that the certificate names the url's host, or set "
                "insecure_skip_verify"
            ) from None
        except ssl.SSLError as e:
            raise KubeletError(
                f"TLS handshake with the kubelet at {self._url} failed: {e.reason or e}"
            ) from None
        except TimeoutError:
            raise KubeletError(
                f"kubelet at {self._url} did not answer within "
                f"{self._timeout:g}s; check the url and the kubelet's health"
            ) from None
        except OSError as e:
            raise KubeletError(
                f"cannot reach the kubelet at {self._url}: {e.strerror or e}; "
                "check the url (node address and kubelet --port)"
            ) from None
        except (http.client.HTTPException, ValueError) as e:
            # Exception text is left out: http.client quotes header values, and one of them
            # holds the token.
            raise KubeletError(
                f"kubelet at {self._url} sent no valid HTTP response ({type(e).__name__})"
            ) from None
        finally:
            conn.close()
        if response.status != 200:
            raise KubeletError(
                self._status_message(response.status, body, token), status=response.status
            )
        if len(body) > MAX_RESPONSE_BYTES:
            raise KubeletError(
                f"kubelet /pods response from {self._url} is larger than "
                f"{MAX_RESPONSE_BYTES >> 20} MiB"
            )
        pods = parse_pod_list(body)
        log.debug("kubelet pods refreshed", url=self._url, pods=len(pods))
        return pods

    def _read_token(self) -> str:
        try:
            with open(self._token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8"
            raise KubeletError(
                f"cannot read the kubelet bearer token from {self._token_file}: "
                f"{reason}; mount a service account token there"
            ) from None
        if not _TOKEN.fullmatch(token):
            raise KubeletError(
                f"{self._token_file} does not hold a bearer token (it is empty "
                "or has spaces or control characters inside)"
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
                "kubelet's serving certificate"
            ) from None

    def _status_message(self, status: int, body: bytes, token: str) -> str:
        if status == 401:
            text = (
                f"kubelet at {self._url} answered 401 Unauthorized: it did not accept the "
                f"bearer token from {self._token_file}; check that the token is current "
                "and that the kubelet runs with --authentication-token-webhook"
            )
        elif status == 403:
            text = (
                f"kubelet at {self._url} answered 403 Forbidden: grant the token's "
                "identity 'get' on 'nodes/pods' (kubelets with KubeletFineGrainedAuthz, "
                "Kubernetes 1.33+) or on 'nodes/proxy' (older kubelets)"
            )
        else:
            text = f"kubelet at {self._url} answered HTTP {status}; check the kubelet's logs"
        # The kubelet's own words say which user and subresource it checked: worth keeping,
        # minus anything that echoes the credential.
        # Redact before cutting, so a token straddling the cut cannot leak in part.
        said = body.decode("utf-8", "replace").replace(token, "[redacted]")
        said = " ".join(said.split())[:300]
        return f"{text} (kubelet said: {said})" if said else text
