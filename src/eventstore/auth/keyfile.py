"""The API keys file (`API_KEYS_FILE`): its format, and the operations behind
`eventstore keys …` (create, list, revoke, allow a certificate subject).

Only SHA-256 hashes of keys are stored. A key is `es_<id>_<secret>`: the 16-hex-digit id is
public (it names the key in lists and audit lines); the secret is 32 random bytes in
base64url. Random keys of that length need no slow password hash. Writes replace the file
atomically (a temporary file, then rename) with mode 0600, so the server, which re-reads it when
it changes, never sees half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

KEY_PATTERN = re.compile(r"es_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
HASH_PREFIX = "sha256:"
_HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


class KeyFileError(ValueError):
    """The keys file cannot be read or is not valid; the message names the file and the
    problem."""


class KeyEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    hash: str
    read: list[str] = msgspec.field(default_factory=list)
    write: list[str] = msgspec.field(default_factory=list)
    admin: bool = False
    created_at: str = ""
    revoked_at: str | None = None


class CertificateEntry(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    name: str
    read: list[str] = msgspec.field(default_factory=list)
    write: list[str] = msgspec.field(default_factory=list)
    admin: bool = False


class KeysFile(msgspec.Struct, kw_only=True):
    keys: list[KeyEntry] = msgspec.field(default_factory=list)
    certificates: list[CertificateEntry] = msgspec.field(default_factory=list)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id inside a key's text, or None when the text is not shaped like one of our keys."""
    match = KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _check_patterns(where: str, patterns: Iterable[str]) -> None:
    for pattern in patterns:
        if not pattern or len(pattern) > 255:
            raise KeyFileError(f"{where}: a stream type pattern must have 1 to 255 characters,"
                               f" got {pattern!r}")


def parse(data: bytes, source: str = "API_KEYS_FILE") -> KeysFile:
    """Decode and check a keys file's content."""
    try:
        keys = msgspec.json.decode(data, type=KeysFile)
    except msgspec.DecodeError as exc:
        raise KeyFileError(f"{source}: not a valid keys file: {exc}") from None
    seen: set[str] = set()
    for entry in keys.keys:
        where = f"{source}: key {entry.id!r}"
        if not re.fullmatch(r"[0-9a-f]{16}", entry.id):
            raise KeyFileError(f"{where}: the id must be 16 lower-case hex digits")
        if entry.id in seen:
            raise KeyFileError(f"{where}: the id appears twice")
        seen.add(entry.id)
        if not _HASH_PATTERN.fullmatch(entry.hash):
            raise KeyFileError(f"{where}: the hash must be 'sha256:' and 64 hex digits")
        if not entry.name:
            raise KeyFileError(f"{where}: the name must not be empty")
        _check_patterns(where, [*entry.read, *entry.write])
    subjects: set[str] = set()
    for cert in keys.certificates:
        where = f"{source}: certificate {cert.subject!r}"
        if not cert.subject or not cert.name:
            raise KeyFileError(f"{where}: subject and name must not be empty")
        if cert.subject in subjects:
            raise KeyFileError(f"{where}: the subject appears twice")
        subjects.add(cert.subject)
        _check_patterns(where, [*cert.read, *cert.write])
    return keys


def load(path: str | os.PathLike[str]) -> KeysFile:
    """Read and check the keys file; a missing file is an empty one."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return KeysFile()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the keys file: {exc.strerror}") from None
    return parse(data, str(path))


def save(path: str | os.PathLike[str], keys: KeysFile) -> None:
    """Replace the file atomically; readable by its owner only."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.format(msgspec.json.encode(keys), indent=2) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself survives a crash only once the directory is on disk.
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def _editing(path: str | os.PathLike[str]) -> Iterator[KeysFile]:
    """The file's keys, to change and save while holding an exclusive lock (a sidecar
    `.lock` file), so that two `eventstore keys` commands at once cannot undo each other —
    a revocation lost to a concurrent create would bring a key back."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield load(path)


def _check_some_permission(where: str, read: list[str], write: list[str], admin: bool) -> None:
    """An entry that may do nothing could call only the health service: surely a mistake."""
    if not (read or write or admin):
        raise KeyFileError(f"{where} would have no permissions (it could call only the health "
                           "service): give it read or write patterns, or admin")


def create_key(path: str | os.PathLike[str], name: str, *, read: Iterable[str] = (),
               write: Iterable[str] = (), admin: bool = False) -> tuple[str, str]:
    """Add a new key for the service `name`; return (its id, its text). The text is not
    stored anywhere: show it once."""
    if not name:
        raise KeyFileError("the key's name (the calling service) must not be empty")
    read, write = list(read), list(write)
    _check_patterns("the new key", [*read, *write])
    _check_some_permission("the new key", read, write, admin)
    with _editing(path) as keys:
        key_id = secrets.token_hex(8)
        while any(entry.id == key_id for entry in keys.keys):
            key_id = secrets.token_hex(8)
        text = f"es_{key_id}_{secrets.token_urlsafe(32)}"
        keys.keys.append(KeyEntry(id=key_id, name=name, hash=hash_key(text), read=read,
                                  write=write, admin=admin, created_at=_now()))
        save(path, keys)
    return key_id, text


def revoke_key(path: str | os.PathLike[str], key_id: str) -> bool:
    """Mark the key revoked; False when no such (unrevoked) key exists."""
    with _editing(path) as keys:
        for i, entry in enumerate(keys.keys):
            if entry.id == key_id and entry.revoked_at is None:
                keys.keys[i] = msgspec.structs.replace(entry, revoked_at=_now())
                save(path, keys)
                return True
    return False


def list_keys(path: str | os.PathLike[str]) -> list[KeyEntry]:
    return load(path).keys


def allow_certificate(path: str | os.PathLike[str], subject: str, name: str, *,
                      read: Iterable[str] = (), write: Iterable[str] = (),
                      admin: bool = False) -> None:
    """Let client certificates with exactly this subject (RFC 4514 style, most specific
    first: `CN=progress,O=example`) call as `name`, with these permissions."""
    if not subject or not name:
        raise KeyFileError("subject and name must not be empty")
    read, write = list(read), list(write)
    _check_patterns(f"certificate {subject!r}", [*read, *write])
    _check_some_permission(f"certificate {subject!r}", read, write, admin)
    with _editing(path) as keys:
        keys.certificates = [c for c in keys.certificates if c.subject != subject]
        keys.certificates.append(CertificateEntry(subject=subject, name=name, read=read,
                                                  write=write, admin=admin))
        save(path, keys)
