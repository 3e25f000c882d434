"""Authentication: from a call's metadata and its TLS client certificate to a `Principal`.

The keys file is read every `API_KEYS_RELOAD_MS` in a worker thread and reloaded when its
content changed; a file that has disappeared, become unreadable or invalid is refused and the
keys in force stay in force, so a broken edit never opens the server.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import trio

from eventstore.auth import keyfile
from eventstore.auth.principals import (
    ANONYMOUS,
    Permissions,
    Principal,
    certificate_subject,
    common_name,
)
from eventstore.errors import Unauthenticated

log = logging.getLogger(__name__)

Mode = Literal["open", "mtls", "api_keys"]

# Compared against when a key's id is unknown, so that case costs what a known id costs.
_DUMMY_DIGEST = hashlib.sha256(b"no such key").digest()


@dataclass(frozen=True)
class _Keys:
    by_id: dict[str, tuple[bytes, Principal]]
    by_subject: dict[str, Principal]


def _index(keys: keyfile.KeysFile) -> _Keys:
    by_id: dict[str, tuple[bytes, Principal]] = {}
    for entry in keys.keys:
        if entry.revoked_at is not None:
            continue
        digest = bytes.fromhex(entry.hash.removeprefix(keyfile.HASH_PREFIX))
        by_id[entry.id] = (digest, Principal(
            entry.name, Permissions(tuple(entry.read), tuple(entry.write), entry.admin),
            key_id=entry.id))
    by_subject = {
        cert.subject: Principal(cert.name, Permissions(tuple(cert.read), tuple(cert.write),
                                                       cert.admin), subject=cert.subject)
        for cert in keys.certificates
    }
    return _Keys(by_id, by_subject)


def _read(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class Authenticator:
    """Turns credentials into a `Principal`, or raises `Unauthenticated`."""

    def __init__(self, keys_path: str | None, *, client_certificates: bool,
                 reload_seconds: float = 1.0) -> None:
        self._path = keys_path
        self._client_certificates = client_certificates
        self._reload_seconds = reload_seconds
        self._keys = _Keys({}, {})
        # What the file held when last read (None: missing): a reload compares contents, so
        # no edit is missed however quickly it follows another, and a file replaced by a
        # rename is never seen half-written.
        self._content: bytes | None = None
        if keys_path is not None:
            # At start-up a bad file stops the server (KeyFileError names it).
            try:
                self._content = _read(keys_path)
            except OSError as exc:
                raise keyfile.KeyFileError(
                    f"{keys_path}: cannot read the keys file: {exc.strerror}") from None
            if self._content is None:
                log.warning("API_KEYS_FILE does not exist (yet): every call is refused until "
                            "keys are created with `eventstore keys create`",
                            extra={"path": keys_path})
            else:
                self._keys = _index(keyfile.parse(self._content, keys_path))

    @property
    def mode(self) -> Mode:
        if self._path is not None:
            return "api_keys"
        return "mtls" if self._client_certificates else "open"

    @property
    def key_count(self) -> int:
        return len(self._keys.by_id)

    def reload_if_changed(self) -> bool:
        """Re-read the keys file if it changed; True when new keys took effect. Blocking.
        A file that disappeared, cannot be read or is not valid leaves the keys in force."""
        if self._path is None:
            return False
        try:
            content = _read(self._path)
        except OSError as exc:
            content = None
            problem = exc.strerror
        else:
            problem = "it has disappeared"
        if content == self._content:
            return False
        self._content = content
        if content is None:
            log.error("the API keys file cannot be read (%s); the keys loaded before stay in "
                      "force", problem, extra={"path": self._path})
            return False
        try:
            keys = _index(keyfile.parse(content, self._path))
        except (keyfile.KeyFileError, ValueError) as exc:
            log.error("the API keys file is not valid; the keys loaded before stay in force: %s",
                      exc, extra={"path": self._path})
            return False
        self._keys = keys
        log.info("API keys reloaded", extra={"keys": len(keys.by_id),
                                             "certificates": len(keys.by_subject)})
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Watch the keys file for changes."""
        task_status.started()
        if self._path is None:
            return
        while True:
            await trio.sleep(self._reload_seconds)
            await trio.to_thread.run_sync(self.reload_if_changed)

    def authenticate(self, metadata: Iterable[tuple[str, Any]],
                     peer_certificate: dict[str, Any] | None) -> Principal:
        """The caller of a call with this (custom) metadata and TLS client certificate."""
        subject = None
        if peer_certificate and peer_certificate.get("subject"):
            subject = peer_certificate["subject"]
        if self._client_certificates and peer_certificate is not None and subject is None:
            # A CA may sign a certificate with an empty subject (its names in the SAN only):
            # it would identify nobody.
            raise Unauthenticated("the client certificate has an empty subject")
        if self._path is None:
            if subject is None:
                return ANONYMOUS
            text = certificate_subject(subject)
            return Principal(common_name(subject) or text, subject=text)
        key = _key_from(metadata)
        if key is not None:
            return self._by_key(key)
        if subject is not None:
            text = certificate_subject(subject)
            principal = self._keys.by_subject.get(text)
            if principal is None:
                raise Unauthenticated(
                    f"the client certificate {text} is not allowed, and no API key was sent")
            return principal
        raise Unauthenticated(
            "no credentials: send an API key as 'authorization: Bearer <key>' or 'x-api-key'")

    def _by_key(self, key: str) -> Principal:
        key_id = keyfile.key_id_of(key)
        found = self._keys.by_id.get(key_id) if key_id is not None else None
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        expected = found[0] if found is not None else _DUMMY_DIGEST
        if not hmac.compare_digest(digest, expected) or found is None:
            # Neither the key nor anything derived from it goes into the message or a log.
            raise Unauthenticated("the API key is not valid (unknown, revoked or malformed)")
        return found[1]


def _key_from(metadata: Iterable[tuple[str, Any]]) -> str | None:
    bearer = api_key = None
    for name, value in metadata:
        if not isinstance(value, str):
            continue
        if name == "authorization" and bearer is None:
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                bearer = credentials.strip()
            else:
                bearer = ""  # another scheme: no usable key, but credentials were sent
        elif name == "x-api-key" and api_key is None:
            api_key = value.strip()
    if bearer is not None:
        return bearer
    return api_key
