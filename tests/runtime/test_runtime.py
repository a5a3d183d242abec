"""The shared runtime: listeners, health, reflection, drain, signals, concurrency."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import LOOPBACK, Certs, read_until, running, spawn, stop_process
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from calloutkit import CalloutServer, ConfigError, add_header_mutation
from calloutkit.testing import http_headers

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def process_call(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                                 response_deserializer=pb.ProcessingResponse.FromString)


def headers_request(path: str = "/") -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_headers=http_headers({":path": path, ":method": "GET"},
                                                             end_of_stream=True))


def http_status(url: str, method: str = "GET", context: ssl.SSLContext | None = None) -> int:
    return http_get(url, method, context)[0]


def http_get(url: str, method: str = "GET",
             context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5,
                                    context=context) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


async def grpc_health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


class Blocking(CalloutServer):
    """request headers wait until the test opens the gate (sync or async flavour)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.async_gate = asyncio.Event()

    def on_request_headers(self, headers, context):
        self.gate.wait(10)  # a blocking sync callback: must not stall other streams
        return add_header_mutation(add=[("x-blocked", "released")])

    async def on_response_headers(self, headers, context):
        await self.async_gate.wait()
        return add_header_mutation(add=[("x-resp", "1")])


async def test_500_streams_held_open_are_all_answered():
    server = CalloutServer(**LOOPBACK)
    async with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            call = process_call(channel)
            streams = [call() for _ in range(500)]
            for stream in streams:
                await stream.write(headers_request())
            replies = await asyncio.gather(*(stream.read() for stream in streams))
            assert all(r.HasField("request_headers") for r in replies)
            assert server.active_streams == 500  # none was closed: all held open at once
            for stream in streams:
                await stream.done_writing()
            await asyncio.gather(*(stream.read() for stream in streams))


async def test_blocking_sync_callback_does_not_stall_other_streams():
    server = Blocking(**LOOPBACK)
    async with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            call = process_call(channel)
            blocked = call()
            await blocked.write(headers_request())
            other = call()
            await other.write(pb.ProcessingRequest(response_headers=http_headers({":status":
                                                                                  "200"})))
            server.async_gate.set()
            reply = await asyncio.wait_for(other.read(), 5)  # answered while `blocked` waits
            assert reply.response_headers.response.header_mutation.set_headers[0].header.key == (
                "x-resp")
            server.gate.set()
            reply = await asyncio.wait_for(blocked.read(), 5)
            assert reply.request_headers.response.header_mutation.set_headers[0].header.raw_value \
                == b"released"
            blocked.cancel()
            other.cancel()


TRANSPORTS = ["grpcio", "native"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_health_reflects_serving_and_draining(transport):
    server = Blocking(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                      health_check_address=("127.0.0.1", 0), transport=transport)
    server.gate.set()
    await server.start()
    health_url = f"http://127.0.0.1:{server.health_check_port}/"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
        serving = health_pb2.HealthCheckResponse.SERVING
        assert await grpc_health(channel) == serving
        assert await grpc_health(channel, "envoy.service.ext_proc.v3.ExternalProcessor") == serving
        # Watch: the status at once, then each change (here, the drain).
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"))
        assert (await asyncio.wait_for(watch.read(), 5)).status == serving
        # an empty 200, as the documented server answers: some probes compare the body
        assert await asyncio.to_thread(http_get, health_url) == (200, b"")
        assert await asyncio.to_thread(http_status, health_url, "HEAD") == 200
        assert await asyncio.to_thread(http_status, health_url, "POST") == 405

        in_flight = process_call(channel)()
        await in_flight.write(pb.ProcessingRequest(response_headers=http_headers({":status":
                                                                                  "200"})))
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(server.stop(grace=10))
        assert (await asyncio.wait_for(watch.read(), 5)).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await grpc_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.to_thread(http_get, health_url) == (503, b"draining\n")
        # Refused as it opens, before any message (a write racing the status would turn it
        # into grpc.aio's client-side INTERNAL "Internal error from Core").
        refused = process_call(channel)()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await refused.read()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not stopping.done()
        server.async_gate.set()  # the stream in flight finishes within the grace period
        reply = await asyncio.wait_for(in_flight.read(), 5)
        assert reply.HasField("response_headers")
        await in_flight.done_writing()
        # The open watch held nothing up: the drain waited for the stream in flight only.
        await asyncio.wait_for(stopping, 5)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_health_watch_of_an_unknown_service_and_a_malformed_request(transport):
    async with running(CalloutServer(**LOOPBACK, transport=transport)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="no.Such"))
            assert (await asyncio.wait_for(watch.read(), 5)).status == (
                health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            watch.cancel()
            for method in ("Check", "Watch"):
                call = channel.unary_stream(f"/grpc.health.v1.Health/{method}")(b"\xff\xff")
                assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert await call.details() == "malformed request"
        assert server.active_streams == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reflection_lists_the_services(transport):
    server = CalloutServer(reflection=True, **LOOPBACK, transport=transport)
    async with running(server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                      reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")]))
            got = [reply async for reply in replies]
            names = {s.name for s in got[0].list_services_response.service}
            assert names == {"envoy.service.ext_proc.v3.ExternalProcessor",
                             "grpc.health.v1.Health",
                             "grpc.reflection.v1alpha.ServerReflection"}
            assert got[1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        # What grpcurl does: list the services, then resolve one to its methods.
        found = await asyncio.to_thread(describe_by_reflection, server.plaintext_port,
                                        "envoy.service.ext_proc.v3.ExternalProcessor")
        assert "envoy.service.ext_proc.v3.ExternalProcessor" in found[0]
        assert found[1] == ["Process"]


def describe_by_reflection(port: int, service: str) -> tuple[list[str], list[str]]:
    """The services a reflection client lists, and the methods of ``service``."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        found = DescriptorPool(database).FindServiceByName(service)
        return services, [method.name for method in found.methods]


async def test_tls_listener_and_https_health(certs: Certs):
    server = CalloutServer(secure_address=("127.0.0.1", 0), disable_plaintext=True,
                           health_check_address=("127.0.0.1", 0), secure_health_check=True,
                           cert_chain_path=certs.cert_path, private_key_path=certs.key_path)
    async with running(server):
        creds = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.secure_port}", creds,
                                           options=[("grpc.ssl_target_name_override",
                                                     "localhost")]) as channel:
            stream = process_call(channel)()
            await stream.write(headers_request())
            assert (await stream.read()).HasField("request_headers")
            stream.cancel()
        context = ssl.create_default_context(cadata=certs.ca_pem.decode())
        url = f"https://localhost:{server.health_check_port}/"
        assert await asyncio.to_thread(http_status, url, "GET", context) == 200


def test_run_blocks_and_shutdown_works_from_another_thread():
    server = CalloutServer(**LOOPBACK)
    runner = threading.Thread(target=server.run)
    runner.start()
    deadline = time.monotonic() + 10
    while not server.serving and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.serving
    server.shutdown()
    runner.join(10)
    assert not runner.is_alive()


@pytest.mark.parametrize("transport", ["grpcio", "native"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_sigterm_drains_the_open_stream_then_exits_zero(loop, transport):
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "tests/servers/slow_server.py", "--plaintext_address", "127.0.0.1:0",
                     "--health_check_address", "127.0.0.1:0", "--disable_tls",
                     "--event_loop", loop, "--transport", transport],
                    env={"SLOW_SECONDS": "1.5"})
    try:
        line = await asyncio.to_thread(read_until, process, "serving:")
        named = ", native transport" if transport == "native" else ""
        assert line.rstrip().endswith(f"({loop} loop{named})")
        grpc_port = int(line.split("grpc 127.0.0.1:")[1].split(",")[0])
        health_port = int(line.split("health http://127.0.0.1:")[1].split()[0])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stream = process_call(channel)()
            await stream.write(headers_request())
            await asyncio.sleep(0.3)  # the callback is now sleeping
            os.kill(process.pid, signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert await grpc_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            # A new connection is still answered while draining: health says NOT_SERVING,
            # the protocol refuses.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as fresh:
                assert await grpc_health(fresh) == health_pb2.HealthCheckResponse.NOT_SERVING
                refused = process_call(fresh)()
                assert await refused.code() == grpc.StatusCode.UNAVAILABLE
                assert await refused.details() == "server is draining"
            status = await asyncio.to_thread(http_status, f"http://127.0.0.1:{health_port}/")
            assert status == 503
            reply = await asyncio.wait_for(stream.read(), 10)
            assert reply.request_headers.response.header_mutation.set_headers[0].header.key == (
                "x-slow")
            # Answered, the stream would now wait for its next message: the drain ends it.
            assert await stream.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        stop_process(process)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_idle_server_exits_right_after_stopped(loop):
    process = spawn([sys.executable, "-m", "calloutkit", "serve", "examples/basic",
                     "--plaintext_address", "127.0.0.1:0", "--health_check_address",
                     "127.0.0.1:0", "--disable_tls", "--event_loop", loop])
    try:
        line = read_until(process, "serving:")
        port = int(line.split("grpc 127.0.0.1:")[1].split(",")[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # one stream, then idle
            call = channel.stream_stream(
                METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                response_deserializer=pb.ProcessingResponse.FromString)
            assert len(list(call(iter([headers_request()]), timeout=10))) == 1
            os.kill(process.pid, signal.SIGTERM)
            assert "0 stream(s) in flight" in read_until(process, "draining:")
            read_until(process, "stopped")
            stopped = time.monotonic()
            assert process.wait(10) == 0
            # Typically 0.03-0.15 s here; the bound is loose because the machine is shared.
            assert time.monotonic() - stopped < 1.0
    finally:
        stop_process(process)


def test_second_signal_exits_at_once():
    process = spawn([sys.executable, "-m", "calloutkit", "serve",
                     "tests/servers/slow_server.py", "--plaintext_address", "127.0.0.1:0",
                     "--combined_health_check", "--disable_tls", "--grace_period", "60"])
    try:
        line = read_until(process, "serving:")
        port = int(line.split("grpc 127.0.0.1:")[1].split(",")[0].split()[0])
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.stream_stream(METHOD,
                                     request_serializer=pb.ProcessingRequest.SerializeToString,
                                     response_deserializer=pb.ProcessingResponse.FromString)
        gate = threading.Event()

        def requests():
            yield headers_request()
            gate.wait(30)

        responses = call(requests())
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGTERM)
        read_until(process, "draining")
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(10) == 128 + signal.SIGTERM
        gate.set()
        responses.cancel()
        channel.close()
    finally:
        stop_process(process)


def test_a_taken_port_is_a_clear_error_not_a_shared_port():
    # gRPC's default SO_REUSEPORT would let two servers share a port silently.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = CalloutServer(plaintext_address=("127.0.0.1", port), disable_tls=True,
                               combined_health_check=True)
        with pytest.raises(ConfigError, match="cannot bind plaintext listener"):
            asyncio.run(server.start())


def test_drain_delay_reports_not_serving_but_still_serves_then_refuses():
    process = spawn([sys.executable, "-m", "calloutkit", "serve", "tests/servers/gate_server.py",
                     "--plaintext_address", "127.0.0.1:0", "--health_check_address",
                     "127.0.0.1:0", "--disable_tls", "--drain_delay", "1.5"],
                    env={"SLOW_SECONDS": "4"})
    try:
        line = read_until(process, "serving:")
        port = int(line.split("grpc 127.0.0.1:")[1].split(",")[0])
        health_port = int(line.split("health http://127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                METHOD, request_serializer=pb.ProcessingRequest.SerializeToString,
                response_deserializer=pb.ProcessingResponse.FromString)
            check = health_pb2_grpc.HealthStub(channel).Check
            # Mid-callback through the delay and into the drain: keeps the server in its grace.
            held = call(iter([headers_request("/slow")]), timeout=20)
            time.sleep(0.3)  # its callback has started
            os.kill(process.pid, signal.SIGTERM)
            read_until(process, "still served for 1.5s (drain_delay)")
            signalled = time.monotonic()
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == (
                health_pb2.HealthCheckResponse.NOT_SERVING)
            assert http_status(f"http://127.0.0.1:{health_port}/") == 503
            # A load balancer that has not checked health yet still gets answers.
            assert len(list(call(iter([headers_request()]), timeout=5))) == 1
            assert time.monotonic() - signalled < 1.5
            read_until(process, "draining:")
            assert time.monotonic() - signalled >= 1.0
            with pytest.raises(grpc.RpcError) as refused:
                list(call(iter([headers_request()]), timeout=5))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # The stream in flight gets its reply within the grace, then the drain ends it.
            assert next(held).HasField("request_headers")
            with pytest.raises(grpc.RpcError) as ended:
                next(held)
            assert (ended.value.code(), ended.value.details()) == (
                grpc.StatusCode.UNAVAILABLE, "server is draining")
        assert process.wait(10) == 0
    finally:
        stop_process(process)
