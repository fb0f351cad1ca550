"""parse_pod_list over tests/testdata/kubelet/pods.json; KubeletClient against a real HTTPS
server on 127.0.0.1 with a throwaway CA minted here (keys live only in tmp dirs)."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.attest.kubelet import KubeletClient
from agent.attest.kubelet_errors import KubeletError
from agent.attest.kubelet_pods import ContainerRef, parse_pod_list
from tests.helpers import serving

PODS_JSON = Path(__file__).resolve().parent.parent / "testdata" / "kubelet" / "pods.json"
PAYMENTS = "6513270e-269e-4d37-b2a7-4de452e6b438"
REPORT = "d23f0824-128b-4f33-8c5c-7fd0a6a3a450"
LEGACY = "9531985d-5d9d-49f8-9818-e811892f902b"
STATIC = "a81259cef8e959c624df1d456e5d3297"
APP_ID = "6320b74ad202499479cdbac479343923784ac584ebd344766e804e783c210f89"
ENVOY_ID = "688e2c153efa54086843e206a5f821f204a5f8fcc7654f3dd7a2b6b1619e6691"
MIGRATE_ID = "ca7d6a7c30b2672fc2122c1073eed6c5a42e0b7706d85b6c8a983e3d51599c48"
BATCH_ID = "38b873d6d8cb75f8f02b9dc0f4b9770cb0a006a235f5ebd605d4b5356f918f10"
DEBUGGER_ID = "af080fdcd389d92d15d0ecbbac130fd4f6de9d6403e0a2670ab2a3cdce2a8643"
CRIO_ID = f"cri-o://{APP_ID}"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXNlcnZpY2UtYWNjb3VudC10b2tlbg.c2lnbmF0dXJl"


def _list(*items) -> str:
    return json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": list(items)})


def _pod(uid="u1", spec=None, status=None, **meta) -> dict:
    return {
        "metadata": {"uid": uid, "name": "p", "namespace": "ns", **meta},
        "spec": spec or {},
        "status": status or {},
    }


# --- parsing -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pods():
    return parse_pod_list(PODS_JSON.read_bytes())


def test_fixture_pods_are_keyed_by_uid(pods):
    assert set(pods) == {PAYMENTS, REPORT, LEGACY, STATIC}


def test_running_pod_with_init_container(pods):
    pod = pods[PAYMENTS]
    assert (pod.namespace, pod.name, pod.service_account, pod.node_name) == (
        "payments",
        "payments-api-6c9f7d8b4d-q7x2m",
        "payments-api",
        "worker-1",
    )
    assert pod.labels["app.kubernetes.io/name"] == "payments-api"
    # init container included; envoy's previous (OOMKilled) id is history, not a container
    assert {cid: ref.name for cid, ref in pod.containers.items()} == {
        MIGRATE_ID: "db-migrate",
        APP_ID: "app",
        ENVOY_ID: "envoy",
    }
    assert pod.containers[ENVOY_ID] == ContainerRef(
        "envoy",
        "docker.io/envoyproxy/envoy:v1.31.2",
        "docker.io/envoyproxy/envoy@sha256:"
        "724022a6320b45e4e0b5d2d5078526a1ba205ab0103b90e15e90da8133443d35",
    )


def test_pending_pod_has_no_containers_yet(pods):
    assert (pods[REPORT].service_account, dict(pods[REPORT].containers)) == ("reporter", {})


def test_pod_without_labels_or_service_account_and_with_a_debug_container(pods):
    pod = pods[LEGACY]
    assert (dict(pod.labels), pod.service_account) == ({}, "default")
    assert {cid: ref.name for cid, ref in pod.containers.items()} == {
        BATCH_ID: "batch",
        DEBUGGER_ID: "debugger-kx7pl",
    }


def test_static_pod_keeps_the_kubelets_hash_uid(pods):
    assert (pods[STATIC].namespace, pods[STATIC].service_account) == ("kube-system", "default")


def test_pod_info_is_immutable_and_hashable(pods):
    pod = pods[PAYMENTS]
    with pytest.raises(TypeError):
        pod.labels["team"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        pod.containers["0" * 64] = ContainerRef("x", "", "")  # type: ignore[index]
    with pytest.raises(AttributeError):
        pod.name = "other"  # type: ignore[misc]
    assert hash(pod) == hash(parse_pod_list(PODS_JSON.read_text())[PAYMENTS])


@pytest.mark.parametrize(
    "spec, want",
    [
        ({"serviceAccountName": "builder", "serviceAccount": "old"}, "builder"),
        ({"serviceAccount": "old"}, "old"),
        ({"serviceAccountName": ""}, "default"),
        ({}, "default"),
    ],
    ids=["name-wins", "deprecated-alias", "empty-name", "absent"],
)
def test_service_account(spec, want):
    assert parse_pod_list(_list(_pod(spec=spec)))["u1"].service_account == want


@pytest.mark.parametrize(
    "container_id, key",
    [
        ("containerd://" + APP_ID, APP_ID),
        ("docker://" + APP_ID, APP_ID),
        ("cri-o://" + APP_ID, APP_ID),
        ("containerd://abc123", None),
        ("containerd://" + APP_ID.upper(), None),
        (APP_ID, None),
        ("", None),
        (None, None),
    ],
    ids=["containerd", "docker", "cri-o", "short", "upper-case", "no-scheme", "empty", "null"],
)
def test_container_id_scheme_is_stripped(container_id, key):
    status = {
        "containerStatuses": [
            {"name": "c", "image": "i", "imageID": "d", "containerID": container_id}
        ]
    }
    containers = parse_pod_list(_list(_pod(status=status)))["u1"].containers
    assert list(containers) == ([key] if key else [])


def test_empty_items_are_no_pods():
    assert parse_pod_list('{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}') == {}
    assert parse_pod_list(_list()) == {}


@pytest.mark.parametrize(
    "doc, message",
    [
        pytest.param(
            b"<html>404</html>",
            " is not JSON: Expecting value: line 1 column 1 (char 0)",
            id="html",
        ),
        pytest.param(
            b"\xff\xfe\xfa",
            " is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
            id="not-utf8",
        ),
        pytest.param("[]", " is not a JSON object (want a v1 PodList, got array)", id="array"),
        pytest.param(
            '{"kind":"Pod","apiVersion":"v1"}',
            " has kind 'Pod' apiVersion 'v1', want "
            "'PodList' 'v1'; check that the URL is the kubelet's",
            id="wrong-kind",
        ),
        pytest.param(
            '{"apiVersion":"v1","items":[]}',
            " has kind None apiVersion 'v1', want "
            "'PodList' 'v1'; check that the URL is the kubelet's",
            id="no-kind",
        ),
        pytest.param(
            '{"kind":"PodList","apiVersion":"v1","items":{}}',
            ": 'items' is object, want a list",
            id="items-object",
        ),
        pytest.param(_list("pod"), ": items[0] is string, want an object", id="item-string"),
        pytest.param(
            _list({"spec": {}}), ": items[0].metadata is null, want an object", id="no-metadata"
        ),
        pytest.param(
            _list(_pod(), {"metadata": {"name": "p", "namespace": "ns"}}),
            ": items[1].metadata.uid is missing or not a non-empty string",
            id="no-uid",
        ),
        pytest.param(
            _list(_pod(labels={"app": 1})),
            ": items[0].metadata.labels has a non-string value",
            id="label-number",
        ),
        pytest.param(
            _list(_pod(spec={"serviceAccountName": 7})),
            ": items[0].spec.serviceAccountName is number, want a string",
            id="sa-number",
        ),
        pytest.param(
            _list(_pod(status={"containerStatuses": {}})),
            ": items[0].status.containerStatuses is object, want a list",
            id="statuses-object",
        ),
        pytest.param(
            _list(_pod(status={"initContainerStatuses": [{"containerID": CRIO_ID}]})),
            ": items[0].status.initContainerStatuses[0].name is missing or not a non-empty string",
            id="status-without-name",
        ),
    ],
)
def test_malformed_documents(doc, message):
    with pytest.raises(KubeletError) as exc:
        parse_pod_list(doc)
    assert str(exc.value) == "kubelet /pods response" + message


# --- a real HTTPS kubelet stand-in on loopback ---------------------------------------


def _cert(name: str, key, issuer: x509.Certificate | None = None, issuer_key=None):
    """A CA certificate when issuer is None, else a serving cert for 127.0.0.1/worker-1."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("worker-1"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = _cert("test kubelet CA", ca_key)
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "other-ca.pem").write_bytes(
        _cert("some other CA", ec.generate_private_key(ec.SECP256R1())).public_bytes(pem)
    )
    (d / "server.pem").write_bytes(_cert("worker-1", server_key, ca, ca_key).public_bytes(pem))
    (d / "server.key").write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return d


class _Kubelet(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.requests: list[dict[str, str]] = []
        self.status, self.body = 200, PODS_JSON.read_bytes()
        self.url = f"https://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server: _Kubelet = self.server  # type: ignore[assignment]
        server.requests.append({"path": self.path, **dict(self.headers)})
        # Echo the credential back, as a careless proxy might: the client must redact it.
        body = server.body.replace(b"$AUTH", self.headers.get("Authorization", "").encode())
        self.send_response(server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def kubelet(pki):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki / "server.pem", pki / "server.key")
    server = _Kubelet(tls)
    with serving(server, "kubelet"):
        yield server


class FakeClock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_client(kubelet, pki, token_file, clock):
    def make(url: str | None = None, **options) -> KubeletClient:
        options = {
            "token_file": str(token_file),
            "ca_file": str(pki / "ca.pem"),
            "cache_ttl_seconds": 5,
            "min_refresh_interval": 1,
            "clock": clock,
            **options,
        }
        return KubeletClient(url or kubelet.url, **options)

    return make


@pytest.fixture
def client(make_client):
    return make_client()


def _assert_no_token(exc: BaseException | None) -> None:
    while exc is not None:
        assert TOKEN not in str(exc) and TOKEN not in repr(exc)
        exc = exc.__cause__ or exc.__context__


def test_sends_the_bearer_token_and_finds_the_pod(client, kubelet):
    pod = client.pod(PAYMENTS)
    assert pod is not None and pod.name == "payments-api-6c9f7d8b4d-q7x2m"
    assert [(r["path"], r["Authorization"]) for r in kubelet.requests] == [
        ("/pods", f"Bearer {TOKEN}")
    ]


def test_url_path_prefix_is_kept(make_client, kubelet):
    make_client(kubelet.url + "/api/v1/nodes/worker-1/proxy/").pod(PAYMENTS)
    assert kubelet.requests[0]["path"] == "/api/v1/nodes/worker-1/proxy/pods"


def test_fresh_cache_hits_do_not_refetch_and_expiry_does(client, kubelet, clock):
    assert client.pod(PAYMENTS) is not None
    clock.now += 4.9
    assert client.pod(PAYMENTS) is not None
    assert client.pod(LEGACY) is not None
    assert len(kubelet.requests) == 1
    clock.now += 0.1  # the 5 s ttl is up
    assert client.pod(PAYMENTS) is not None
    assert len(kubelet.requests) == 2


def test_a_miss_refreshes_once_then_is_rate_limited(client, kubelet, clock):
    new_uid = "0f0e0d0c-0b0a-4909-8807-060504030201"
    assert client.pod(PAYMENTS) is not None
    kubelet.body = _list(_pod(uid=new_uid)).encode()  # the pod starts after the first fetch
    assert client.pod(new_uid) is None  # within min_refresh_interval: no request
    clock.now += 0.99
    assert client.pod(new_uid) is None
    assert len(kubelet.requests) == 1
    clock.now += 0.01
    assert client.pod(new_uid) is not None  # one refresh, and it is there now
    assert client.pod("does-not-exist") is None
    assert client.pod("does-not-exist") is None
    assert len(kubelet.requests) == 2


def test_concurrent_misses_share_one_request(client, kubelet):
    barrier = threading.Barrier(16)

    def look_up(_):
        barrier.wait()
        return client.pod("does-not-exist")

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(look_up, range(16))) == [None] * 16
    assert len(kubelet.requests) == 1


def test_token_file_is_reread_on_each_refresh(client, kubelet, clock, token_file):
    client.pod(PAYMENTS)
    token_file.write_text("rotated.token.value")
    clock.now += 5
    client.pod(PAYMENTS)
    assert [r["Authorization"] for r in kubelet.requests] == [
        f"Bearer {TOKEN}",
        "Bearer rotated.token.value",
    ]


@pytest.mark.parametrize(
    "host, ca",
    [("127.0.0.1", "other-ca.pem"), ("localhost", "ca.pem")],
    ids=["unknown-ca", "cert-does-not-name-host"],
)
def test_tls_verification_fails_closed(make_client, kubelet, pki, host, ca):
    url = kubelet.url.replace("127.0.0.1", host)  # the cert names 127.0.0.1 and worker-1
    with pytest.raises(KubeletError) as exc:
        make_client(url, ca_file=str(pki / ca)).pod(PAYMENTS)
    assert str(exc.value).startswith(f"TLS verification of the kubelet at {url} failed")
    assert kubelet.requests == []  # the token never left the client
    _assert_no_token(exc.value)


def test_insecure_skip_verify_accepts_an_unknown_ca(make_client, pki):
    client = make_client(ca_file=str(pki / "other-ca.pem"), insecure_skip_verify=True)
    assert client.pod(PAYMENTS) is not None


@pytest.mark.parametrize(
    "status, message",
    [
        (
            401,
            "answered 401 Unauthorized: it did not accept the bearer token from {token_file}; "
            "check that the token is current and that the kubelet runs with "
            "--authentication-token-webhook (kubelet said: Unauthorized Bearer [redacted])",
        ),
        (
            403,
            "answered 403 Forbidden: this kubelet authorizes GET /pods as 'nodes/proxy' only "
            "(no KubeletFineGrainedAuthz: a kubelet before 1.33, or the gate turned off), so "
            "'nodes/pods' is not enough; grant system:serviceaccount:credless:agent 'get' on "
            "'nodes/proxy' (deploy/k8s/rbac-nodes-proxy.yaml: a broad grant, see "
            "deploy/k8s/README.md), or turn KubeletFineGrainedAuthz on (kubelet said: "
            "Forbidden (user=system:serviceaccount:credless:agent, verb=get, resource=nodes, "
            "subresource(s)=[proxy]) Bearer [redacted])",
        ),
        (
            500,
            "answered HTTP 500; check the kubelet's logs (kubelet said: Unauthorized Bearer "
            "[redacted])",
        ),
    ],
    ids=["401", "403", "500"],
)
def test_http_errors_name_the_status_and_never_the_token(
    client, kubelet, token_file, status, message
):
    kubelet.status = status
    kubelet.body = b"Unauthorized\n$AUTH"  # the stand-in echoes the Authorization header
    if status == 403:
        kubelet.body = (
            b"Forbidden (user=system:serviceaccount:credless:agent, verb=get, "
            b"resource=nodes, subresource(s)=[proxy])\n$AUTH"
        )
    with pytest.raises(KubeletError) as exc:
        client.pod(PAYMENTS)
    assert exc.value.status == status
    assert str(exc.value) == f"kubelet at {kubelet.url} " + message.format(token_file=token_file)
    _assert_no_token(exc.value)


def test_a_failed_refresh_is_rate_limited_and_repeats_its_error(client, kubelet, clock):
    kubelet.status = 500
    with pytest.raises(KubeletError) as first:
        client.pod(PAYMENTS)
    with pytest.raises(KubeletError) as again:
        client.pod(PAYMENTS)  # not "no such pod": the kubelet is failing
    assert (str(again.value), again.value.status) == (str(first.value), 500)
    assert len(kubelet.requests) == 1
    kubelet.status = 200
    clock.now += 1
    assert client.pod(PAYMENTS) is not None
    assert len(kubelet.requests) == 2


def test_a_non_json_answer_is_a_kubelet_error(client, kubelet):
    kubelet.body = b"<html>hello</html>"
    with pytest.raises(KubeletError, match="^kubelet /pods response is not JSON"):
        client.pod(PAYMENTS)


_NOT_A_TOKEN = (
    "{path} does not hold a bearer token (it is empty or has spaces or control characters inside)"
)


@pytest.mark.parametrize(
    "option, content, message",
    [
        (
            "token_file",
            None,
            "cannot read the kubelet bearer token from {path}: No such file or "
            "directory; mount a service account token there",
        ),
        ("token_file", "\n", _NOT_A_TOKEN),
        ("token_file", TOKEN + "\r\nX-Injected: 1", _NOT_A_TOKEN),
        (
            "ca_file",
            None,
            "cannot load the kubelet CA from {path}: No such file or directory; point "
            "ca_file at a PEM bundle with the CA that signed the kubelet's serving "
            "certificate",
        ),
    ],
    ids=["missing-token", "empty-token", "header-injection", "missing-ca"],
)
def test_unusable_local_files(make_client, kubelet, tmp_path, option, content, message):
    path = tmp_path / "unusable"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KubeletError) as exc:
        make_client(**{option: str(path)}).pod(PAYMENTS)
    assert str(exc.value) == message.format(path=path)
    assert kubelet.requests == []
    _assert_no_token(exc.value)


@pytest.fixture
def silent_port():
    """A loopback port that completes TCP handshakes (backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_timeout(make_client, silent_port):
    url = f"https://127.0.0.1:{silent_port}"
    with pytest.raises(KubeletError) as exc:
        make_client(url, timeout=0.2).pod(PAYMENTS)
    assert str(exc.value) == (
        f"kubelet at {url} did not answer within 0.2s; check the url and the kubelet's health"
    )


def test_connection_refused(make_client):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KubeletError, match=r"^cannot reach the kubelet at .*: Connection refused"):
        make_client(f"https://127.0.0.1:{port}").pod(PAYMENTS)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:10255",
        "127.0.0.1:10250",
        "https://user:pw@127.0.0.1:10250",
        "https://127.0.0.1:10250/?x=1",
    ],
    ids=["plain-http", "no-scheme", "userinfo", "query"],
)
def test_constructor_rejects_unsafe_urls(url):
    with pytest.raises(ValueError):
        KubeletClient(url)


EXPAND_CASES = [
    # (url, environment, expanded)
    ("https://${NODE_IP}:10250", {"NODE_IP": "10.0.0.7"}, "https://10.0.0.7:10250"),
    ("https://${NODE_IP}:10250", {"NODE_IP": "fd00::7"}, "https://[fd00::7]:10250"),
    ("https://${NODE_IP}:10250", {"NODE_IP": "[fd00::7]"}, "https://[fd00::7]:10250"),
    ("https://127.0.0.1:10250", {}, "https://127.0.0.1:10250"),
    (
        "https://${HOST}:${PORT}/base",
        {"HOST": "node-a.example", "PORT": "10250"},
        "https://node-a.example:10250/base",
    ),
]


@pytest.mark.parametrize("url,env,expanded", EXPAND_CASES)
def test_kubelet_url_expansion(url, env, expanded):
    from agent.attest.kubelet_settings import expand_url

    assert expand_url(url, env) == expanded


@pytest.mark.parametrize("env", [{}, {"NODE_IP": ""}])
def test_kubelet_url_with_an_unset_variable_is_refused_naming_it(env):
    from agent.attest.kubelet_errors import KubeletError
    from agent.attest.kubelet_settings import expand_url

    with pytest.raises(KubeletError, match=r"\$\{NODE_IP\}.*not set.*status.hostIP"):
        expand_url("https://${NODE_IP}:10250", env)
