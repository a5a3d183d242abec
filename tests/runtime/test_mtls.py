"""mTLS: client certificates from the configured CA only, the peer's identity in callbacks,
and certificates reloaded on SIGHUP without dropping the streams already open; on both
transports, grpc.aio's being the oracle for what the native one reports."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import ssl
import sys
from typing import Any

import grpc
import pytest
from conftest import Certs, read_until, spawn, stop_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb

from calloutkit import (
    CalloutServer,
    ConfigError,
    NetworkCalloutServer,
    PeerIdentity,
    ProcessingResult,
    ServerConfig,
)
from calloutkit.testing import http_headers

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PEER_SERVER = "tests/servers/peer_server.py"
TRANSPORTS = ["grpcio", "native"]


class Authority:
    """A throwaway CA that issues client certificates."""

    def __init__(self, name: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.pem = (x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
                    .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                   critical=True)
                    .sign(self._key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str | x509.Name, *sans: x509.GeneralName,
              ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a client certificate."""
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = (common_name if isinstance(common_name, x509.Name)
                   else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(self._name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)),
                                            critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def headers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_headers=http_headers({":path": "/"}, True))


def open_stream(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                                 response_deserializer=pb.ProcessingResponse.FromString)()


def channel(port: int, server_ca: bytes, client: tuple[bytes, bytes] | None = None,
            ) -> grpc.aio.Channel:
    cert, key = client if client is not None else (None, None)
    creds = grpc.ssl_channel_credentials(root_certificates=server_ca, private_key=key,
                                         certificate_chain=cert)
    # A channel of its own, so each test's handshake really happens.
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                   options=[("grpc.use_local_subchannel_pool", 1)])


async def ask(chan: grpc.aio.Channel) -> dict[str, str]:
    """One request-headers exchange; the headers the server added."""
    call = open_stream(chan)
    await call.write(headers())
    reply = await call.read()
    await call.done_writing()
    mutation = reply.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def serve(folder: str, transport: str, *extra: str) -> Any:
    process = spawn([sys.executable, "-m", "calloutkit", "serve", PEER_SERVER,
                     "--transport", transport,
                     "--address", "127.0.0.1:0", "--disable_plaintext", "--combined_health_check",
                     "--cert_chain_path", os.path.join(folder, "chain.pem"),
                     "--private_key_path", os.path.join(folder, "key.pem"), *extra])
    line = read_until(process, "serving:")
    return process, int(line.split("grpc+tls 127.0.0.1:")[1].split()[0].rstrip(","))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_only_clients_with_a_certificate_from_the_client_ca_get_in(
        certs: Certs, tmp_path: Any, transport: str) -> None:
    clients, strangers = Authority("clients CA"), Authority("some other CA")
    ca_path = tmp_path / "clients-ca.pem"
    ca_path.write_bytes(clients.pem)
    envoy = clients.issue("envoy-front", x509.DNSName("envoy.internal"),
                          x509.UniformResourceIdentifier("spiffe://mesh/envoy"))
    process, port = serve(os.path.dirname(certs.cert_path), transport,
                          "--client_ca_path", str(ca_path))
    try:
        for client in (None, strangers.issue("envoy-front", x509.DNSName("envoy.internal"))):
            async with channel(port, certs.ca_pem, client) as chan:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await ask(chan)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        async with channel(port, certs.ca_pem, envoy) as chan:
            added = await ask(chan)
        assert added["x-peer"] == "envoy-front" and added["x-peer-subject"] == "CN=envoy-front"
        assert set(added["x-peer-sans"].split(",")) == {"envoy.internal", "spiffe://mesh/envoy"}
    finally:
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
        stop_process(process)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sighup_swaps_the_certificate_for_new_connections_only(
        tmp_path: Any, transport: str) -> None:
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old, new = Certs(str(tmp_path / "old")), Certs(str(tmp_path / "new"))
    live = tmp_path / "live"
    live.mkdir()
    for name in ("chain.pem", "key.pem"):
        shutil.copy(os.path.join(os.path.dirname(old.cert_path), name), live / name)
    process, port = serve(str(live), transport)
    try:
        async with channel(port, old.ca_pem) as before:
            stream = open_stream(before)
            await stream.write(headers())
            assert (await stream.read()).request_headers.response.header_mutation \
                .set_headers[0].header.raw_value == b"-"  # no client certificate asked
            for name in ("chain.pem", "key.pem"):
                shutil.copy(os.path.join(os.path.dirname(new.cert_path), name), live / name)
            os.kill(process.pid, signal.SIGHUP)
            read_until(process, "TLS reload: new connections get")
            async with channel(port, new.ca_pem) as after:
                assert (await ask(after))["x-peer"] == "-"
            async with channel(port, old.ca_pem) as stale:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await ask(stale)  # the old CA no longer vouches for the server
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            for _ in range(3):  # the stream opened before the reload goes on
                await stream.write(headers())
                assert (await stream.read()).HasField("request_headers")
            await stream.done_writing()
            assert await stream.code() is grpc.StatusCode.OK
        # A reload that cannot pair the files keeps the certificate in use.
        (live / "key.pem").write_bytes(old.key_pem)
        os.kill(process.pid, signal.SIGHUP)
        assert "TLS reload failed, keeping the current certificate" in read_until(
            process, "TLS reload")
        async with channel(port, new.ca_pem) as after:
            assert (await ask(after))["x-peer"] == "-"
    finally:
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0
        stop_process(process)


def test_mtls_options_are_checked(certs: Certs, tmp_path: Any) -> None:
    tls = {"secure_address": ("127.0.0.1", 0), "disable_plaintext": True,
           "combined_health_check": True, "cert_chain_path": certs.cert_path,
           "private_key_path": certs.key_path}
    config = ServerConfig.build(**tls, client_ca_path=certs.ca_path)
    assert config.require_client_auth and config.client_ca == certs.ca_pem
    with pytest.raises(ConfigError, match="require_client_auth needs client_ca_path"):
        ServerConfig.build(**tls, require_client_auth=True)
    with pytest.raises(ConfigError, match="require_client_auth off"):
        ServerConfig.build(**tls, client_ca_path=certs.ca_path, require_client_auth=False)
    with pytest.raises(ConfigError, match="client_ca_path needs the TLS listener"):
        ServerConfig.build(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                           combined_health_check=True, client_ca_path=certs.ca_path)
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("nope")
    with pytest.raises(ConfigError, match=r"client CA .*ca\.txt' is not PEM"):
        ServerConfig.build(**tls, client_ca_path=str(not_pem))
    assert PeerIdentity.__doc__


class NetworkPeer(NetworkCalloutServer):
    async def on_read_data(self, data: bytes, end_of_stream: bool, context: Any) -> Any:
        peer = context.peer_identity
        who = f"{peer.common_name if peer else '-'}|{','.join(peer.uris if peer else ())}"
        return ProcessingResult(who.encode(), True)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_l4_callback_sees_the_peer_too(certs: Certs, transport: str) -> None:
    clients = Authority("clients CA")
    server = NetworkPeer(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                         combined_health_check=True, cert_chain_path=certs.cert_path,
                         private_key_path=certs.key_path, client_ca=clients.pem,
                         transport=transport)
    await server.start()
    try:
        envoy = clients.issue("envoy-edge", x509.UniformResourceIdentifier("spiffe://mesh/edge"))
        async with channel(server.secure_port, certs.ca_pem, envoy) as chan:
            call = chan.stream_stream(
                "/envoy.service.network_ext_proc.v3.NetworkExternalProcessor/Process",
                request_serializer=npb.ProcessingRequest.SerializeToString,
                response_deserializer=npb.ProcessingResponse.FromString)()
            await call.write(npb.ProcessingRequest(read_data=npb.Data(data=b"hi")))
            reply = await call.read()
            await call.done_writing()
        assert reply.read_data.data == b"envoy-edge|spiffe://mesh/edge"
    finally:
        await server.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_https_health_listener_reloads_its_certificate_too(tmp_path: Any,
                                                                     transport: str) -> None:
    for name in ("old", "new", "live"):
        (tmp_path / name).mkdir()
    old, new = Certs(str(tmp_path / "old")), Certs(str(tmp_path / "new"))
    live = tmp_path / "live"
    for source in (old.cert_path, old.key_path):
        shutil.copy(source, live / os.path.basename(source))
    server = CalloutServer(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                           health_check_address=("127.0.0.1", 0), secure_health_check=True,
                           cert_chain_path=str(live / "chain.pem"),
                           private_key_path=str(live / "key.pem"), transport=transport)
    await server.start()
    try:
        assert await probe(server.health_check_port, old.ca_pem) == b"HTTP/1.1 200 OK"
        for source in (new.cert_path, new.key_path):
            shutil.copy(source, live / os.path.basename(source))
        assert server.reload_certificates()
        assert await probe(server.health_check_port, new.ca_pem) == b"HTTP/1.1 200 OK"
        with pytest.raises(ssl.SSLCertVerificationError):
            await probe(server.health_check_port, old.ca_pem)
    finally:
        await server.stop(0)


async def probe(port: int | None, ca: bytes) -> bytes:
    """The status line of an HTTPS GET to the health listener, trusting ``ca`` only."""
    context = ssl.create_default_context(cadata=ca.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="localhost")
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return (await reader.readline()).rstrip()
    finally:
        writer.close()


class Recorder(CalloutServer):
    """Keeps what each request's callback saw of its caller."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seen: list[tuple[dict[str, list[bytes]], PeerIdentity | None, str]] = []

    def on_request_headers(self, headers: Any, context: Any) -> None:
        self.seen.append((context.auth_context(), context.peer_identity, context.peer()))


def tls_server(certs: Certs, transport: str, **options: Any) -> Recorder:
    return Recorder(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                    combined_health_check=True, cert_chain_path=certs.cert_path,
                    private_key_path=certs.key_path, transport=transport, **options)


async def test_the_native_auth_context_is_grpcs_for_the_same_certificate(certs: Certs) -> None:
    clients = Authority("clients CA")
    odd = x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]),
        x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Ex, ample+"<x>;\\ '),
            x509.NameAttribute(NameOID.USER_ID, "u1")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                           "#ops")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(x509.ObjectIdentifier("1.2.3.4"),
                                                           "odd")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "Zoë envoy")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "second")]),
    ])
    presented = [
        clients.issue("envoy-front", x509.DNSName("envoy.internal"),
                      x509.UniformResourceIdentifier("spiffe://mesh/envoy")),
        clients.issue(odd, x509.OtherName(x509.ObjectIdentifier("1.2.3"), b"\x0c\x01a"),
                      x509.DNSName("*.w.x"), x509.IPAddress(ipaddress.ip_address("::1")),
                      x509.RFC822Name("ops@example.com"),
                      x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                      x509.UniformResourceIdentifier("spiffe://mesh"),
                      x509.DNSName("second.internal")),
        clients.issue(x509.Name([])),
    ]
    seen = {}
    for transport in TRANSPORTS:
        server = tls_server(certs, transport, client_ca=clients.pem)
        async with contextlib.AsyncExitStack() as stack:
            await server.start()
            stack.push_async_callback(server.stop, 0)
            for client in presented:
                async with channel(server.secure_port, certs.ca_pem, client) as chan:
                    await ask(chan)
        seen[transport] = server.seen
    for grpcio, native in zip(seen["grpcio"], seen["native"], strict=True):
        grpc_auth, native_auth = dict(grpcio[0]), dict(native[0])
        # BoringSSL offers a post-quantum group rustls with ring does not have.
        assert native_auth.pop("ssl_negotiated_key_exchange_group") == [b"X25519"]
        grpc_auth.pop("ssl_negotiated_key_exchange_group")
        assert native_auth == grpc_auth
        assert list(native_auth) == list(grpc_auth)  # same keys, in the same order
        assert native[1] == grpcio[1] and native[1] is not None
        assert native[2].startswith("ipv4:127.0.0.1:")
    first = seen["native"][0][1]
    assert first is not None and first.uris == ("spiffe://mesh/envoy",)
    assert seen["native"][1][1].subject == (  # type: ignore[union-attr]
        r'CN=second,CN=Zo\C3\AB envoy,1.2.3.4=#0C036F6464,OU=\#ops,'
        r'O=Ex\, ample\+\"\<x\>\;\\\ +UID=u1,C=FR')


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_plaintext_and_tls_without_a_client_ca_have_no_peer_identity(
        certs: Certs, transport: str) -> None:
    plain = Recorder(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                     combined_health_check=True, transport=transport)
    async with contextlib.AsyncExitStack() as stack:
        await plain.start()
        stack.push_async_callback(plain.stop, 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plain.plaintext_port}") as chan:
            await ask(chan)
    assert plain.seen[0][:2] == ({"transport_security_type": [b"insecure"],
                                  "security_level": [b"TSI_SECURITY_NONE"]}, None)
    server = tls_server(certs, transport)
    async with contextlib.AsyncExitStack() as stack:
        await server.start()
        stack.push_async_callback(server.stop, 0)
        async with channel(server.secure_port, certs.ca_pem) as chan:
            await ask(chan)
    auth, identity, _ = server.seen[0]
    assert identity is None and "x509_pem_cert" not in auth
    assert auth["transport_security_type"] == [b"ssl"]
    assert auth["ssl_tls_version"] == [b"TLSv1.3"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reload_swaps_the_client_ca_for_new_connections_only(
        certs: Certs, tmp_path: Any, transport: str) -> None:
    old, new = Authority("old clients CA"), Authority("new clients CA")
    ca_path = tmp_path / "clients-ca.pem"
    ca_path.write_bytes(old.pem)
    server = tls_server(certs, transport, client_ca_path=str(ca_path))
    await server.start()
    try:
        before = old.issue("before")
        async with channel(server.secure_port, certs.ca_pem, before) as open_chan:
            stream = open_stream(open_chan)
            await stream.write(headers())
            assert (await stream.read()).HasField("request_headers")
            ca_path.write_bytes(new.pem)
            assert server.reload_certificates()
            async with channel(server.secure_port, certs.ca_pem, new.issue("after")) as chan:
                await ask(chan)
            async with channel(server.secure_port, certs.ca_pem, old.issue("late")) as chan:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await ask(chan)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            await stream.write(headers())  # the connection made before the reload goes on
            assert (await stream.read()).HasField("request_headers")
            await stream.done_writing()
            assert await stream.code() is grpc.StatusCode.OK
        ca_path.write_text("not a CA")
        assert not server.reload_certificates()  # logged; the new CA stays
        async with channel(server.secure_port, certs.ca_pem, new.issue("again")) as chan:
            await ask(chan)
        names = [identity.common_name for _, identity, _ in server.seen if identity]
        assert names == ["before", "after", "before", "again"]
    finally:
        await server.stop(0)
