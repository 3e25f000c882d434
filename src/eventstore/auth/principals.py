"""Callers and what they may do (no I/O here).

A stream-type pattern is an exact name, or a name in which `*` matches any run of characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from eventstore.errors import PermissionDenied
from eventstore.store.validation import type_pattern_regex


@dataclass(frozen=True)
class Permissions:
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    admin: bool = False
    _read: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _write: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_read", type_pattern_regex(self.read))
        object.__setattr__(self, "_write", type_pattern_regex(self.write))

    def may_read(self, stream_type: str) -> bool:
        return self.admin or self._read.match(stream_type) is not None

    def may_write(self, stream_type: str) -> bool:
        return self.admin or self._write.match(stream_type) is not None

    @property
    def reads_everything(self) -> bool:
        return self.admin or "*" in self.read


EVERYTHING = Permissions(admin=True)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `recorded`: whether its identity goes into event metadata
    (not for the anonymous caller of open mode)."""

    name: str
    permissions: Permissions = EVERYTHING
    key_id: str | None = None
    subject: str | None = None
    recorded: bool = True
    # The JSON recorded under `$eventstore.caller` in each appended event's metadata.
    caller_json: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The key id is not recorded here (the audit line has it): a retry sent with another
        # key of the same service, during a rotation, must still be recognised as a retry.
        value: dict[str, str] = {"name": self.name}
        if self.subject is not None:
            value["subject"] = self.subject
        object.__setattr__(self, "caller_json", orjson.dumps(value) if self.recorded else None)

    def describe(self) -> str:
        if self.key_id is not None:
            return f"API key {self.key_id} ({self.name})"
        if self.subject is not None:
            return f"certificate {self.subject}"
        return self.name

    def audit_fields(self) -> dict[str, str]:
        fields = {"caller": self.name}
        if self.key_id is not None:
            fields["caller_key_id"] = self.key_id
        if self.subject is not None:
            fields["caller_subject"] = self.subject
        return fields

    def check_read(self, stream_type: str) -> None:
        if not self.permissions.may_read(stream_type):
            raise PermissionDenied(
                f"{self.describe()} may not read stream type {stream_type!r}")

    def check_write(self, stream_type: str) -> None:
        if not self.permissions.may_write(stream_type):
            raise PermissionDenied(
                f"{self.describe()} may not write stream type {stream_type!r}")

    def read_scope(self, stream_types: Sequence[str]) -> tuple[str, ...] | None:
        """For ReadAll / SubscribeToAll with a filter naming `stream_types` (empty: all):
        None when no restriction beyond the filter is needed, else the patterns the stream
        type must match. Refuses a filter naming a type it may not read, and a caller
        that may read nothing."""
        for stream_type in stream_types:
            self.check_read(stream_type)
        if stream_types or self.permissions.reads_everything:
            return None
        if not self.permissions.read:
            raise PermissionDenied(f"{self.describe()} may not read any stream type")
        return self.permissions.read


ANONYMOUS = Principal("anonymous", recorded=False)


def certificate_subject(subject: Sequence[Sequence[tuple[str, str]]]) -> str:
    """An `ssl` peer certificate's subject, RFC 4514 style (most specific first):
    `CN=progress,OU=services,O=example`."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
             "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
             "emailAddress": "emailAddress"}
    parts = []
    for rdn in reversed(subject):
        parts.append("+".join(f"{short.get(attr, attr)}={_escape_dn(value)}"
                              for attr, value in rdn))
    return ",".join(parts)


def _escape_dn(value: str) -> str:
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def common_name(subject: Sequence[Sequence[tuple[str, str]]]) -> str | None:
    for rdn in reversed(subject):
        for attr, value in rdn:
            if attr == "commonName":
                return value
    return None
