"""What a refused Workload API call records and says: one `workload_api.denied` audit event
naming who asked (as far as known: pid and uid from the socket's peer credentials, exe
from the attestation, the SPIFFE ID its entry gave it) and what it asked, and a status
message ending with that event's id, which the SPIFFE libraries show their callers. From a
workload's error to the audit line: docs/errors.md.
"""

from __future__ import annotations

from typing import Any

from grpclib.const import Status

from agent.attest.selectors import Attestation
from agent.identity.manager import Identity
from agent.identity.workload_callers import Caller
from agent.observe.logging import AuditLog, new_event_id


class Denied(Exception):
    """A call refused: the status and message for the caller, and what is known of who
    asked (filled in as it is learnt) and of what it asked, for the audit event. Every
    refusal is one workload_api.denied event, and the message names its id."""

    def __init__(self, code: Status, message: str, **asked: Any):
        self.code, self.message, self.asked = code, message, asked
        self.attestation: Attestation | None = None
        self.identity: Identity | None = None

    def about(self, att: Attestation | None, ident: Identity | None) -> Denied:
        self.attestation = self.attestation or att
        self.identity = self.identity or ident
        return self


def caller_fields(
    caller: Caller | None, att: Attestation | None, ident: Identity | None
) -> dict[str, Any]:
    """Who made a call, as far as known, for its audit event: pid and uid from the socket's
    peer credentials (or the attestation), exe from the attestation, the SPIFFE ID its
    entry gave it. None where unknown (a caller that could not be attested has no exe)."""
    att = att or (caller.attestation if caller is not None else None)
    pid = att.tgid if att is not None else caller.cred.pid if caller is not None else None
    uid = att.uid if att is not None else caller.cred.uid if caller is not None else None
    return {
        "pid": pid,
        "uid": uid,
        "exe": att.exe if att is not None else None,
        "spiffe_id": str(ident.spiffe_id) if ident is not None else None,
    }


def audit_denial(audit: AuditLog | None, method: str, caller: Caller | None, d: Denied) -> str:
    """Audit the refusal d of a call to method by caller; the message to answer it with
    (naming the event; without an audit log, d's message as it is)."""
    if audit is None:
        return d.message
    event_id = new_event_id()
    audit.emit(
        "workload_api.denied",
        event_id=event_id,
        method=method,
        code=d.code.name,
        reason=d.message,
        **caller_fields(caller, d.attestation, d.identity),
        **d.asked,
    )
    return f"{d.message} (audit event {event_id})"
