"""Assertion mode's rules (agent/inject/assertion.py), found by mutation testing: what counts
as a workload's own JWT (a placeholder is replaced, a JWT refused), what a token request's
form and a registration's metadata carry after credless's rewrite (blank parameters kept,
the workload's client_secret and jwks_uri never sent on, the field limit), what the audit
and the refusal name (the error code, the duplicated parameters, the jti, the audience),
which registration endpoint is the server's own (host case-folded, default ports by
scheme), and the request that goes to the authorization server (one Content-Length, no
Transfer-Encoding) or the answer the workload gets instead (status line, OAuth error,
Connection: close when it is closed).

Sans-IO: the rewriting functions on their own, and AssertionRequests.handle() on the world
of tests/unit/test_assertion_seams.py (the AS's connection a stand-in transport)."""

from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest

from agent.identity.jwtsvid import JwtSvid
from agent.inject import assertion, assertion_route
from agent.inject.assertion import (
    Refused,
    is_jwt,
    jti_of,
    rewrite_registration,
    rewrite_token_form,
)
from agent.inject.http1 import HEAD
from agent.inject.record import AuditBase
from agent.inject.served import Served
from agent.inject.upstreams import Upstream
from agent.oauth.discovery import ServerMetadata
from tests.unit.test_assertion_seams import (
    AS_UP,
    ISSUER,
    MINTED,
    RESPONSE,
    SID,
    AsTokens,
    AsWorld,
    Minting,
    server,
)
from tests.unit.test_fast_path import INFO

REG = "https://as.example/reg"
JWKS_URI = "https://node.example:8444/jwks.json"
FORM = b"Content-Type: application/x-www-form-urlencoded"
JSON = b"Content-Type: application/json"


def b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


WORKLOAD_JWT = f"{b64({'alg': 'ES256'})}.{b64({'sub': 'me', 'jti': 'w-1'})}.c2ln"


def mint(*audience: str, jti: str = "jti-1"):
    return lambda: SimpleNamespace(token=MINTED, jti=jti, audience=audience or (ISSUER,))


def refused(call) -> Refused:
    with pytest.raises(Refused) as e:
        call()
    return e.value


def register(meta: Any, jwks_uri: str | None = JWKS_URI, **kw: Any):
    body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return rewrite_registration(
        body,
        SID,
        kw.pop("statement", mint(REG)),
        endpoint=REG,
        jwks_uri=jwks_uri,
        jwks=kw.pop("jwks", lambda: {"keys": [{"kty": "EC", "kid": "k"}]}),
        **kw,
    )


# ---------------------------------------------------------------- what is a JWT
@pytest.mark.parametrize(
    "value",
    [
        '{"payload": "e30", "protected": "x", "signature": "c2ln"}',  # flattened JWS JSON
        '{"protected": "x", "ciphertext": "c", "iv": "i", "tag": "t"}',  # JWE JSON
        '{"signatures": [{"protected": "x", "signature": "c2ln"}]}',  # detached payload
    ],
    ids=["flattened-jws", "jwe", "detached-jws"],
)
def test_each_json_serialization_of_a_jws_or_jwe_is_a_jwt(value):
    assert is_jwt(value)


@pytest.mark.parametrize(
    "value",
    [
        '{"client": "placeholder"}',  # a JSON object with no JWS/JWE member
        f"{b64({'typ': 'JWT'})}.{b64({'sub': 'x'})}.c2ln",  # a header without alg
        f"{b64({'alg': 1})}.{b64({'sub': 'x'})}.c2ln",  # alg not a string
        f"{b64([1, 2])}.{b64({'sub': 'x'})}.c2ln",  # a header that is no object
    ],
    ids=["json-object", "no-alg", "alg-not-string", "header-array"],
)
def test_json_that_is_no_jws_or_jwe_is_a_placeholder(value):
    assert is_jwt(value) is False


def test_jti_of_reads_only_an_object_and_bounds_what_it_quotes():
    assert jti_of(f"{b64({'alg': 'ES256'})}.{b64(['jti'])}.c2ln") is None
    long = "j" * 300
    got = jti_of(f"{b64({'alg': 'ES256'})}.{b64({'jti': long})}.c2ln")
    assert got is not None and long.startswith(got) and len(got) == 128


# ---------------------------------------------------------------- token requests
def test_an_empty_client_assertion_is_one_credless_adds():
    out = rewrite_token_form(b"grant_type=client_credentials&client_assertion=", SID, mint())
    assert out.fields["action"] == "added"
    assert dict(parse_qsl(out.body.decode()))["client_assertion"] == MINTED


def test_the_default_policy_refuses_a_workload_jwt_and_replace_replaces_it():
    body = urlencode({"grant_type": "client_credentials", "client_assertion": WORKLOAD_JWT})
    e = refused(lambda: rewrite_token_form(body.encode(), SID, mint()))
    assert e.error == "invalid_request" and e.fields["what"] == "client_assertion"
    out = rewrite_token_form(body.encode(), SID, mint(), "replace")
    assert out.fields["action"] == "replaced_workload_jwt"


def test_blank_parameters_are_kept_as_sent():
    body = b"grant_type=client_credentials&scope=&resource=https%3A%2F%2Fa%2Fmcp&state="
    out = rewrite_token_form(body, SID, mint())
    pairs = parse_qsl(out.body.decode(), keep_blank_values=True)
    assert pairs[:4] == [
        ("grant_type", "client_credentials"),
        ("scope", ""),
        ("resource", "https://a/mcp"),
        ("state", ""),
    ]


def test_a_blank_client_secret_is_removed_and_audited_as_removed():
    out = rewrite_token_form(b"grant_type=client_credentials&client_secret=", SID, mint())
    assert out.fields["removed"] == ["client_secret"]
    assert "client_secret" not in out.body.decode()


def test_a_form_of_more_fields_than_the_limit_is_refused_one_at_the_limit_is_not():
    def body(n: int) -> bytes:
        return "&".join(
            ["grant_type=client_credentials"] + [f"p{i}=v" for i in range(n - 1)]
        ).encode()

    out = rewrite_token_form(body(assertion.MAX_FIELDS), SID, mint())
    assert out.fields["action"] == "added"
    e = refused(lambda: rewrite_token_form(body(assertion.MAX_FIELDS + 1), SID, mint()))
    assert e.error == "invalid_request" and "valid form" in e.description


@pytest.mark.parametrize("body", [b"grant_type=a&\xff=1", b"novalue"])
def test_a_form_that_cannot_be_read_is_an_invalid_request(body):
    assert refused(lambda: rewrite_token_form(body, SID, mint())).error == "invalid_request"


@pytest.mark.parametrize(
    "body, why",
    [
        (
            b"grant_type=a&client_secret=s3cr3t-\xff",
            "it is not ASCII, or a percent-encoded value is not UTF-8",
        ),
        (
            b"grant_type=a&client_secret=s3cr3t-%ff",
            "it is not ASCII, or a percent-encoded value is not UTF-8",
        ),
        (
            b"grant_type=a&client_secret:s3cr3t",
            "a field is not name=value (fields are joined by &)",
        ),
    ],
    ids=["not-ascii", "not-utf8", "not-name-value"],
)
def test_a_form_credless_cannot_read_is_refused_in_its_own_words_alone(body, why):
    # the description goes to the workload and into the audit: fixed words naming the
    # fault, nothing of the body (which may hold a client_secret)
    e = refused(lambda: rewrite_token_form(body, SID, mint()))
    assert e.description == f"credless: the token request is not a valid form: {why}"


def test_parameters_given_twice_are_named_in_the_refusal_and_its_audit():
    body = b"grant_type=a&grant_type=b&client_id=x&client_id=y&scope=s&scope=t"
    e = refused(lambda: rewrite_token_form(body, SID, mint()))
    assert e.error == "invalid_request"
    assert e.fields == {"duplicated": ["client_id", "grant_type"]}  # scope may repeat
    assert "client_id, grant_type" in e.description


def test_the_audit_names_the_assertions_audience_and_a_missing_grant_type():
    out = rewrite_token_form(b"scope=x", SID, mint(ISSUER, ISSUER + "/token"))
    assert out.fields["grant_type"] is None
    assert out.fields["audience"] == f"{ISSUER}, {ISSUER}/token"


def test_a_workloads_other_client_id_is_audited_bounded():
    other = "c" * 300
    out = rewrite_token_form(f"grant_type=a&client_id={other}".encode(), SID, mint())
    quoted = out.fields["workload_client_id"]
    assert other.startswith(quoted) and len(quoted) == 200
    assert dict(parse_qsl(out.body.decode()))["client_id"] == SID


# ---------------------------------------------------------------- registrations
@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"a": 1, "a": 2}', b"[1]", b'"text"'],
    ids=["not-json", "duplicate", "array", "string"],
)
def test_a_registration_credless_cannot_read_is_invalid_client_metadata(body):
    e = refused(lambda: register(body))
    assert e.error == "invalid_client_metadata"
    assert isinstance(e.description, str) and e.description.startswith("credless: ")


def test_duplicated_members_are_named_and_only_they():
    e = refused(lambda: register(b'{"b": 1, "a": 1, "c": 1, "a": 2, "b": 3, "b": 4}'))
    assert e.description.endswith("duplicate members a, b")


def test_a_workloads_software_statement_is_refused_by_default_naming_what():
    e = refused(lambda: register({"software_statement": WORKLOAD_JWT}))
    assert e.error == "invalid_software_statement"
    assert e.fields == {"what": "software_statement", "workload_jti": "w-1"}


def test_a_software_statement_that_is_no_string_is_replaced_as_absent():
    out = register({"client_name": "x", "software_statement": {"alg": "none"}})
    assert out.fields["action"] == "added"
    assert json.loads(out.body)["software_statement"] == MINTED


def test_the_workloads_client_secret_and_jwks_uri_never_reach_the_server():
    sent = {"client_name": "x", "client_secret": "s3cret", "jwks_uri": "https://evil/jwks"}
    inline = json.loads(register(sent, jwks_uri=None).body)
    assert "client_secret" not in inline and "jwks_uri" not in inline
    assert inline["jwks"] == {"keys": [{"kty": "EC", "kid": "k"}]}
    by_uri = json.loads(register(sent).body)
    assert "client_secret" not in by_uri and by_uri["jwks_uri"] == JWKS_URI


def test_with_a_jwks_uri_the_keys_are_not_read():
    def no_keys() -> dict:
        raise AssertionError("the keys were read")

    out = register({"client_name": "x"}, jwks=no_keys)
    assert json.loads(out.body)["jwks_uri"] == JWKS_URI


def test_the_audit_names_each_member_credless_replaced_and_what_it_put_in():
    out = register(
        {
            "jwks_uri": "https://evil/jwks",
            "spiffe_id": "spiffe://example.org/other",
            "token_endpoint_auth_method": "private_key_jwt",  # as credless's: not replaced
        },
        statement=mint(REG, REG + "/2", jti="st-1"),
    )
    assert out.fields["replaced"] == ["jwks_uri", "spiffe_id"]
    assert out.fields["jti"] == "st-1" and out.fields["jwks_uri"] == JWKS_URI
    assert out.fields["audience"] == f"{REG}, {REG}/2"
    same = register({"jwks_uri": JWKS_URI, "spiffe_id": SID})
    assert same.fields["replaced"] == []


# ---------------------------------------------------------------- through handle()
class Recording(Minting):
    """Minting that records each JWT-SVID's ttl and issuer too."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int | None, str | None]] = []

    def jwt_svid(self, ident, audience, ttl=None, iss=None) -> JwtSvid:
        self.asked.append((ttl, iss))
        return super().jwt_svid(ident, audience, ttl, iss)


class Metadata(AsTokens):
    """AsTokens whose metadata names `registration` as the registration endpoint."""

    def __init__(self, srv, registration: str | None = ISSUER + "/reg", **kw: Any):
        super().__init__(srv, **kw)
        self.registration = registration

    async def server_metadata(self, issuer: str) -> ServerMetadata:
        self.asked.append(issuer)
        return ServerMetadata(issuer, ISSUER + "/token", registration_endpoint=self.registration)


class World(AsWorld):
    """AsWorld on another upstream (`up`), with JWT-SVIDs recorded, sending raw requests."""

    def __init__(self, oauth: AsTokens, up: Upstream = AS_UP, max_body: int = 4096):
        super().__init__(oauth, max_body=max_body)
        self.identity = Recording()
        self.proxy.assertions.identity = self.identity
        self.proxy.pool.put((SID, up.host, up.port, up.scheme), self.upstream)
        s = self.served
        self.served = Served(self.client, INFO, up, s.holder(), 0, {"spiffe_id": SID}, s.fragment)

    async def raw(self, request: bytes) -> bool:
        self.client.data_received(request)
        ev = await self.client.next()
        assert ev is not None and ev[0] == HEAD
        head = ev[1]
        audit_base = AuditBase({"method": "POST", "path": "/"}, self.served.fragment)
        task = asyncio.ensure_future(self.proxy.assertions.handle(head, self.served, audit_base, 0))
        while not task.done() and not self.upstream.transport.out:
            await asyncio.sleep(0)  # a turn of the loop: the request goes upstream or is answered
        if not task.done():
            self.upstream.data_received(RESPONSE)
        return await task

    async def post(self, target: bytes, body: bytes, *fields: bytes, host: bytes = b"") -> bool:
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
            target,
            host or b"127.0.0.1:9000",
            b"".join(f + b"\r\n" for f in fields),
            len(body),
        )
        return await self.raw(head + body)

    def events(self, name: str) -> list[dict]:
        return [e for e in self.audit() if e["event"] == name]

    def upstream_head(self) -> list[tuple[bytes, bytes]]:
        head = self.upstream.transport.out.split(b"\r\n\r\n", 1)[0]
        return [
            (k.strip().lower(), v.strip())
            for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        ]

    def answer_fields(self) -> list[tuple[bytes, bytes]]:
        head = self.client.transport.out.split(b"\r\n\r\n", 1)[0]
        return [
            (k.strip().lower(), v.strip().lower())
            for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        ]


def run(body):
    return asyncio.run(body())


def test_the_token_request_sent_on_has_one_content_length_its_bodys():
    async def body():
        w = World(AsTokens(server()))
        form = b"grant_type=client_credentials&client_assertion=placeholder"
        await w.post(b"/token", form, FORM)
        fields = w.upstream_head()
        sent = w.upstream.transport.out.split(b"\r\n\r\n", 1)[1]
        assert [v for k, v in fields if k == b"content-length"] == [b"%d" % len(sent)]
        assert dict(parse_qsl(sent.decode()))["client_assertion"] == MINTED

    run(body)


def test_a_chunked_token_request_goes_on_with_a_content_length_and_no_chunks():
    async def body():
        w = World(AsTokens(server()))
        form = b"grant_type=client_credentials"
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(form), form)
        await w.raw(
            b"POST /token HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
            + FORM
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked
        )
        fields = w.upstream_head()
        sent = w.upstream.transport.out.split(b"\r\n\r\n", 1)[1]
        assert b"transfer-encoding" not in dict(fields)
        assert [v for k, v in fields if k == b"content-length"] == [b"%d" % len(sent)]
        assert dict(parse_qsl(sent.decode()))["client_id"] == SID

    run(body)


@pytest.mark.parametrize("coding", [b"identity", b" IDENTITY "])
def test_an_identity_content_coding_is_read_and_credentialed(coding):
    async def body():
        w = World(AsTokens(server()))
        await w.post(
            b"/token", b"grant_type=client_credentials", FORM, b"Content-Encoding: " + coding
        )
        assert w.sent_form()["client_assertion"] == MINTED

    run(body)


def test_the_413_and_415_answers_name_their_cause_in_the_answer_and_the_audit():
    async def body():
        big = World(AsTokens(server()), max_body=100)
        keep = await big.post(b"/token", b"a" * 200, FORM)
        assert not keep
        out = big.client.transport.out
        assert out.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
        assert (b"connection", b"close") in big.answer_fields()
        _, answer = big.answer()
        [event] = big.events("assertion.refused")
        assert answer["error"] == event["error"] == "invalid_request"
        assert answer["error_description"] == event["reason"] and "100 bytes" in event["reason"]

        coded = World(AsTokens(server()))
        keep = await coded.post(b"/token", b"x=1", FORM, b"Content-Encoding: gzip")
        assert keep
        assert coded.client.transport.out.startswith(b"HTTP/1.1 415 Unsupported Media Type\r\n")
        assert b"connection" not in dict(coded.answer_fields())
        _, answer = coded.answer()
        [event] = coded.events("assertion.refused")
        assert answer["error"] == event["error"] == "invalid_request"
        assert answer["error_description"] == event["reason"] and "gzip" in event["reason"]

    run(body)


def test_a_refused_token_request_is_answered_400_keeping_the_connection_and_audited():
    async def body():
        w = World(AsTokens(server()))
        form = b"grant_type=client_credentials&client_assertion=" + WORKLOAD_JWT.encode()
        keep = await w.post(b"/token", form, FORM)
        assert keep
        assert w.client.transport.out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"connection" not in dict(w.answer_fields())
        _, answer = w.answer()
        [event] = w.events("assertion.refused")
        assert event["request"] == assertion_route.TOKEN
        assert answer["error"] == event["error"] == "invalid_request"
        assert answer["error_description"] == event["reason"]
        assert event["what"] == "client_assertion" and event["workload_jti"] == "w-1"
        assert WORKLOAD_JWT not in w.audit_out.getvalue()

    run(body)


def test_a_refusal_on_a_connection_the_workload_closes_says_connection_close():
    async def body():
        w = World(AsTokens(server()))
        form = b"client_assertion=" + WORKLOAD_JWT.encode()
        keep = await w.post(b"/token", form, FORM, b"Connection: close")
        assert not keep
        assert (b"connection", b"close") in w.answer_fields()

    run(body)


def test_metadata_that_fails_is_a_502_server_error_keeping_the_connection():
    async def body():
        w = World(AsTokens(server(), fail=True))
        keep = await w.post(b"/reg", b"{}", JSON)
        assert keep
        assert w.client.transport.out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        _, answer = w.answer()
        [event] = w.events("request.failed")
        assert answer["error"] == "server_error"
        assert event["reason"] == f"no authorization server metadata for {ISSUER}"
        assert event["reason"] in answer["error_description"]

    run(body)


def test_a_server_not_configured_or_of_an_unknown_profile_fails_closed_naming_it():
    async def body():
        w = World(AsTokens(server()))
        w.oauth.servers = {}
        await w.post(b"/token", b"grant_type=client_credentials", FORM)
        _, answer = w.answer()
        assert w.upstream.transport.out == b"" and "'as'" in answer["error_description"]

        odd = SimpleNamespace(
            workload_assertion="refuse",
            assertion_audience="issuer",
            auth_profile="odd",
            issuer=ISSUER,
        )
        w = World(AsTokens(server()))
        w.oauth.servers = {"as": odd}
        await w.post(b"/token", b"grant_type=client_credentials", FORM)
        _, answer = w.answer()
        assert w.upstream.transport.out == b"" and "'odd'" in answer["error_description"]

    run(body)


@pytest.mark.parametrize("target, ctype", [(b"/token", FORM), (b"/reg", JSON)])
def test_each_assertion_is_short_lived_and_issued_by_the_callers_identity(target, ctype):
    async def body():
        w = World(AsTokens(server()))
        await w.post(target, b"grant_type=a" if ctype == FORM else b"{}", ctype)
        assert w.identity.asked == [(assertion.ASSERTION_TTL, SID)]

    run(body)


def test_a_registration_follows_the_servers_workload_assertion_setting():
    async def body():
        w = World(AsTokens(server(workload_assertion="replace")))
        meta = {"client_name": "w", "software_statement": WORKLOAD_JWT}
        await w.post(b"/reg", json.dumps(meta).encode(), JSON)
        assert w.sent_json()["software_statement"] == MINTED
        [event] = w.events("assertion.injected")
        assert event["action"] == "replaced_workload_jwt"

    run(body)


def test_a_json_post_to_another_path_goes_on_as_sent():
    async def body():
        for registration in (ISSUER + "/reg", None):
            w = World(Metadata(server(), registration))
            sent = b'{"client_name": "w", "software_statement": "mine"}'
            for target in (b"/other", b"/"):
                w.upstream.transport.out = b""
                await w.post(target, sent, JSON)
                assert w.upstream.transport.out.endswith(b"\r\n\r\n" + sent)
            assert w.events("assertion.injected") == [] and w.identity.asked == []

    run(body)


def test_only_a_credentialed_token_request_loses_its_accept_encoding():
    # a token request's answer comes uncompressed, so the assertion credless minted can be
    # masked in it; a request credless sends on as it came, or a registration (no client
    # assertion in it), keeps what the workload asked for
    async def body():
        gzip = b"Accept-Encoding: gzip"
        for target, sent, ctype, kept in [
            (b"/token", b"grant_type=client_credentials", FORM, False),
            (b"/other", b'{"client_name": "w"}', JSON, True),
            (b"/reg", b'{"client_name": "w"}', JSON, True),
        ]:
            w = World(AsTokens(server()))
            await w.post(target, sent, ctype, gzip)
            assert ((b"accept-encoding", b"gzip") in w.upstream_head()) is kept, target

    run(body)


def test_a_registration_endpoint_without_a_path_is_the_root():
    async def body():
        w = World(Metadata(server(), "http://127.0.0.1:9000"))
        await w.post(b"/", b'{"client_name": "w"}', JSON)
        assert w.sent_json()["spiffe_id"] == SID

    run(body)


def up_at(host: str, port: int, scheme: str = "http") -> Upstream:
    origin = f"{scheme}://{host}:{port}"
    return Upstream(
        "as", scheme, host, port, origin, "assertion", b"/token", (f"{host}:{port}".encode(),)
    )


@pytest.mark.parametrize(
    "up, endpoint, ours",
    [
        (up_at("127.0.0.1", 9000), "http://127.0.0.1:9000/reg", True),
        (up_at("as.example", 9000), "http://AS.Example:9000/reg", True),  # host case-folded
        (up_at("127.0.0.1", 80), "http://127.0.0.1/reg", True),  # http's default port
        (up_at("127.0.0.1", 443, "https"), "https://127.0.0.1/reg", True),  # https's
        (up_at("127.0.0.1", 443), "http://127.0.0.1/reg", False),
        (up_at("127.0.0.1", 80, "https"), "https://127.0.0.1/reg", False),
        (up_at("127.0.0.1", 81), "http://127.0.0.1/reg", False),
        (up_at("127.0.0.1", 9000), "http://127.0.0.2:9000/reg", False),  # another host
        (up_at("127.0.0.1", 9000), "http://127.0.0.1:9001/reg", False),  # another port
        (up_at("xxxx", 9000), "http://:9000/reg", False),  # no host at all
    ],
)
def test_only_a_registration_endpoint_on_the_servers_own_address_is_credentialed(
    up, endpoint, ours
):
    async def body():
        w = World(Metadata(server(), endpoint), up=up)
        sent = b'{"client_name": "w", "spiffe_id": "spiffe://example.org/other"}'
        host = up.authorities[0]
        await w.post(b"/reg", sent, JSON, host=host)
        if ours:
            assert w.sent_json()["spiffe_id"] == SID
            assert [e["request"] for e in w.events("assertion.injected")] == ["registration"]
        else:
            assert w.upstream.transport.out.endswith(b"\r\n\r\n" + sent)
            assert w.events("assertion.injected") == []

    run(body)
