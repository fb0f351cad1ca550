from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Selector(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class SPIFFEID(_message.Message):
    __slots__ = ("trust_domain", "path")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    path: str
    def __init__(self, trust_domain: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class X509SVID(_message.Message):
    __slots__ = ("cert_chain", "id", "expires_at", "hint")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    id: SPIFFEID
    expires_at: int
    hint: str
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ..., id: _Optional[_Union[SPIFFEID, _Mapping]] = ..., expires_at: _Optional[int] = ..., hint: _Optional[str] = ...) -> None: ...

class JWTSVID(_message.Message):
    __slots__ = ("token", "id", "expires_at", "issued_at", "hint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    token: str
    id: SPIFFEID
    expires_at: int
    issued_at: int
    hint: str
    def __init__(self, token: _Optional[str] = ..., id: _Optional[_Union[SPIFFEID, _Mapping]] = ..., expires_at: _Optional[int] = ..., issued_at: _Optional[int] = ..., hint: _Optional[str] = ...) -> None: ...
