"""TLS material of a running server: credentials that reload, and who the peer is.

The gRPC TLS listener uses gRPC's dynamic credentials: gRPC asks `ServerTls` before each new
handshake whether the certificate changed, so a reload (SIGHUP, or `reload`) reaches new
connections while connections already open, and their streams, carry on with the old one.
The native transport gets the new material pushed to it instead (``install``), with the same
effect.
The HTTPS health listener's `ssl.SSLContext` is reloaded in place, which likewise affects
only new connections. A reload that cannot read or pair the new files keeps the old ones.

Client certificates (mTLS) are checked by the gRPC listener only: health probes (kubelet,
load balancers) rarely present one, and health says nothing but serving or draining.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import grpc

from ._config import ServerConfig, read_pem
from ._errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """The certificate a client presented on a TLS listener with ``client_ca_path`` (mTLS).

    ``subject`` is the certificate's subject (``CN=envoy,O=example``) and ``common_name``
    its CN; ``dns_names``, ``uris``, ``ip_addresses`` and
    ``emails`` are its subject alternative names; ``pem`` is the certificate itself.
    """

    subject: str | None
    common_name: str | None
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    emails: tuple[str, ...]
    subject_alternative_names: tuple[str, ...]
    pem: str | None


def peer_identity(grpc_context: Any) -> PeerIdentity | None:
    """The verified client certificate of a call, or None (plaintext, or no certificate)."""
    if grpc_context is None:
        return None
    auth = grpc_context.auth_context()
    if not auth.get("x509_pem_cert"):
        return None

    def values(key: str) -> tuple[str, ...]:
        return tuple(v.decode("utf-8", "replace") for v in auth.get(key, ()))

    subject, names, pem = (values("x509_subject"), values("x509_common_name"),
                           values("x509_pem_cert"))
    return PeerIdentity(subject[0] if subject else None, names[0] if names else None,
                        values("peer_dns"), values("peer_uri"), values("peer_ip"),
                        values("peer_email"),
                        values("x509_subject_alternative_name"), pem[0] if pem else None)


class ServerTls:
    """The TLS material of one server, as first configured and as last reloaded."""

    def __init__(self, config: ServerConfig) -> None:
        assert config.cert_chain is not None and config.private_key is not None
        self._config = config
        self._chain, self._key, self._ca = config.cert_chain, config.private_key, config.client_ca
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._health: ssl.SSLContext | None = None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(), self._fetch,
            require_client_authentication=self._config.require_client_auth)

    def health_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _load(context, self._chain, self._key)
        self._health = context
        return context

    def reload(self, install: Callable[[bytes, bytes, bytes | None], None] | None = None,
               ) -> bool:
        """Re-read the certificate files; True when new connections now get them.

        ``install(chain, key, client_ca)`` hands them to a listener that is not gRPC's; its
        ValueError (material it cannot use) is a failed reload like any other.
        """
        cfg = self._config
        if cfg.cert_chain_path is None and cfg.private_key_path is None \
                and cfg.client_ca_path is None:
            logger.info("TLS reload: the certificate was given as bytes; nothing to re-read")
            return False
        try:
            chain = (self._chain if cfg.cert_chain_path is None
                     else read_pem(cfg.cert_chain_path, "certificate chain"))
            key = (self._key if cfg.private_key_path is None
                   else read_pem(cfg.private_key_path, "private key"))
            ca = (self._ca if cfg.client_ca_path is None
                  else read_pem(cfg.client_ca_path, "client CA"))
            _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, key)  # a pair that fits?
            if install is not None:
                install(chain, key, ca)
        except (ConfigError, ssl.SSLError, ValueError) as exc:
            logger.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self._chain, self._key, self._ca = chain, key, ca
        self._pending = self._grpc_config()
        if self._health is not None:
            _load(self._health, chain, key)
        logger.info("TLS reload: new connections get the certificate from %s",
                    cfg.cert_chain_path or "memory")
        return True

    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self._key, self._chain)],
                                                         root_certificates=self._ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake, maybe from one of its threads; None: no change.
        pending, self._pending = self._pending, None
        return pending


def _load(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    # ssl only loads certificates from files; keep them on disk just long enough to load.
    with tempfile.TemporaryDirectory(prefix="calloutkit-") as tmp:
        chain_path, key_path = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((chain_path, chain), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        context.load_cert_chain(chain_path, key_path)
