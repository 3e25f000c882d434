"""TLS for the gRPC port: the server's SSLContext, and a listener whose failed handshakes
(plaintext clients, missing or foreign client certificates) are a debug line, not a traceback."""

from __future__ import annotations

import logging
import ssl

import anyio
import anyio.abc
from anyio.streams.tls import TLSListener

from eventstore.config import ConfigError, Settings

log = logging.getLogger(__name__)


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC port's TLS context (None without TLS_CERT_FILE). TLS 1.2 or later, ALPN h2;
    with TLS_CLIENT_CA_FILE, a client certificate signed by that CA is required."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS_CERT_FILE / TLS_KEY_FILE: cannot load the certificate and key:"
                          f" {exc}") from None
    if settings.tls_client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS_CLIENT_CA_FILE: cannot load the CA certificates: {exc}"
                              ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class QuietTLSListener(TLSListener):
    """anyio's TLSListener logs every failed handshake with a traceback; a client that speaks
    plaintext or has no acceptable certificate is not a server error."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: anyio.abc.AnyByteStream,
                                     ) -> None:
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        log.info("TLS handshake failed: %s", exc)
