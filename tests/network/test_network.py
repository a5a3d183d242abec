"""NetworkCalloutServer in process: replies, connection control, state, errors, options."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as npb

from calloutkit import ConfigError, ErrorPolicy, nonblocking
from calloutkit.network._server import NetworkCalloutServer, NetworkContext, ProcessingResult
from calloutkit.testing import NetworkCalloutClient, StreamEnded, data_request

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server

R = npb.ProcessingResponse


def client(server_class: type[NetworkCalloutServer], **options: Any) -> NetworkCalloutClient:
    return NetworkCalloutClient(server_class(**LOOPBACK, **options),
                                metadata=[("x-forwarded-for", "192.0.2.2")])


class Transform(NetworkCalloutServer):
    """Upper-cases client bytes (async), brackets upstream bytes (sync, thread pool)."""

    async def on_read_data(self, data, end_of_stream, context):
        if data == b"keep":
            return None
        return ProcessingResult(processed_data=data.upper(), modified=True)

    def on_write_data(self, data, end_of_stream, context):
        return (b"[" + data + b"]", True)  # the published SDK's tuple form


async def test_both_directions_are_answered_in_their_own_direction() -> None:
    async with client(Transform).stream() as connection:
        reply = await connection.read(b"hello")
        assert reply.HasField("read_data") and not reply.HasField("write_data")
        assert reply.read_data.data == b"HELLO"
        assert reply.data_processing_status == R.MODIFIED
        assert reply.connection_status == R.CONTINUE

        reply = await connection.write(b"world", end_of_stream=True)
        assert reply.HasField("write_data") and not reply.HasField("read_data")
        assert reply.write_data.data == b"[world]"
        assert reply.write_data.end_of_stream is True


async def test_none_forwards_the_original_bytes() -> None:
    async with client(Transform).stream() as connection:
        reply = await connection.read(b"keep")
        assert reply.read_data.data == b"keep"
        assert reply.data_processing_status == R.UNMODIFIED


async def test_default_server_passes_everything_through_including_half_close() -> None:
    class Plain(NetworkCalloutServer):
        pass

    async with client(Plain).stream() as connection:
        reply = await connection.read(b"\x00\xffbinary")
        assert reply.read_data.data == b"\x00\xffbinary"
        reply = await connection.read(b"", end_of_stream=True)
        assert reply.read_data.end_of_stream is True
        assert reply.read_data.data == b""


class Control(NetworkCalloutServer):
    """close / reset on request; should_close_connection on 'quit'."""

    @nonblocking
    def on_read_data(self, data, end_of_stream, context):
        if data == b"close":
            context.close_connection()
        elif data == b"reset":
            context.reset_connection()
        return None

    def should_close_connection(self, data, modified, context):
        return data == b"quit"


@pytest.mark.parametrize(("chunk", "status"), [
    (b"close", R.CLOSE), (b"reset", R.CLOSE_RST), (b"quit", R.CLOSE), (b"other", R.CONTINUE)])
async def test_connection_control(chunk: bytes, status: int) -> None:
    async with client(Control).stream() as connection:
        reply = await connection.read(chunk)
        assert reply.connection_status == status
        # the next chunk starts from CONTINUE again
        if status == R.CONTINUE:
            assert (await connection.read(b"x")).connection_status == R.CONTINUE


async def test_state_is_per_connection_and_counters_follow_each_side() -> None:
    class Count(NetworkCalloutServer):
        def new_state(self):
            return {"chunks": 0}

        async def on_read_data(self, data, end_of_stream, context):
            context.state["chunks"] += 1
            text = (f"{context.state['chunks']}:{context.bytes_read}:{context.bytes_written}:"
                    f"{context.read_closed}")
            return ProcessingResult(text.encode(), True)

        async def on_write_data(self, data, end_of_stream, context):
            return ProcessingResult(str(context.write_closed).encode(), True)

    test_client = client(Count)
    async with test_client.stream() as first, test_client.stream() as second:
        assert (await first.read(b"abc")).read_data.data == b"1:3:0:False"
        assert (await first.write(b"12345")).write_data.data == b"False"
        assert (await second.read(b"z")).read_data.data == b"1:1:0:False"
        assert (await first.read(b"", end_of_stream=True)).read_data.data == b"2:3:5:True"
        assert (await first.write(b"", end_of_stream=True)).write_data.data == b"True"


async def test_metadata_in_and_dynamic_metadata_out() -> None:
    class Meta(NetworkCalloutServer):
        async def on_read_data(self, data, end_of_stream, context):
            tenant = context.metadata.get("tenant", {}).get("name", "none")
            context.set_dynamic_metadata("calloutkit", {"seen": tenant})
            headers = dict(context.invocation_metadata())
            return ProcessingResult(f"{tenant} via {headers['x-forwarded-for']}".encode())

    async with client(Meta).stream() as connection:
        reply = await connection.read(b"x", metadata={"tenant": {"name": "acme"}})
        assert reply.read_data.data == b"acme via 192.0.2.2"
        assert dict(reply.dynamic_metadata["calloutkit"]) == {"seen": "acme"}
        # metadata sticks to the latest message that carried some; dynamic metadata is sent once
        reply = await connection.read(b"y")
        assert reply.read_data.data == b"acme via 192.0.2.2"


class WrongType(NetworkCalloutServer):
    def on_read_data(self, data, end_of_stream, context):
        if data == b"text":
            return "a str, not bytes"
        if data == b"bytes":
            return data
        if data == b"boom":
            raise RuntimeError("secret detail")
        return None

    def should_close_connection(self, data, modified, context):
        return "yes" if data == b"maybe" else False


@pytest.mark.parametrize(("chunk", "expected_log"), [
    (b"text", "on_read_data returned str; expected None or ProcessingResult"),
    (b"bytes", "on_read_data returned bytes; expected None or ProcessingResult"),
    (b"boom", "on_read_data failed"),
    (b"maybe", "should_close_connection returned str; expected bool"),
])
async def test_bad_callbacks_close_the_connection_by_default(
        chunk: bytes, expected_log: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "calloutkit")
    async with client(WrongType).stream() as connection:
        reply = await connection.read(chunk)
        assert reply.connection_status == R.CLOSE
        assert not reply.HasField("read_data")
    assert expected_log in caplog.text
    assert "Traceback" in caplog.text or caplog.records[-1].exc_info is not None


async def test_error_policy_continue_forwards_the_chunk_unchanged() -> None:
    async with client(WrongType, error_policy="continue").stream() as connection:
        reply = await connection.read(b"text")
        assert reply.connection_status == R.CONTINUE
        assert reply.read_data.data == b"text"
        assert reply.data_processing_status == R.UNMODIFIED
        # the stream is still healthy
        assert (await connection.read(b"fine")).read_data.data == b"fine"


async def test_error_policy_abort_ends_the_stream_with_internal() -> None:
    async with client(WrongType, error_policy=ErrorPolicy.ABORT).stream() as connection:
        with pytest.raises(StreamEnded) as ended:
            await connection.read(b"boom")
    assert ended.value.code == grpc.StatusCode.INTERNAL
    assert "secret" not in ended.value.details


async def test_context_abort_sends_the_status() -> None:
    class Deny(NetworkCalloutServer):
        async def on_read_data(self, data, end_of_stream, context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not from here")

    async with client(Deny).stream() as connection:
        with pytest.raises(StreamEnded) as ended:
            await connection.read(b"x")
    assert ended.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert ended.value.details == "not from here"


async def test_process_override_sees_raw_messages() -> None:
    class Raw(NetworkCalloutServer):
        def process(self, callout, context):
            if callout.HasField("write_data"):
                return None  # forwarded unchanged
            response = npb.ProcessingResponse(data_processing_status=R.MODIFIED)
            response.read_data.data = callout.read_data.data[::-1]
            return response

    async with client(Raw).stream() as connection:
        assert (await connection.read(b"abc")).read_data.data == b"cba"
        reply = await connection.write(b"abc")
        assert reply.write_data.data == b"abc"
        assert reply.data_processing_status == R.UNMODIFIED


async def test_sync_callbacks_run_off_the_event_loop_unless_nonblocking() -> None:
    seen: dict[str, bool] = {}

    class Threads(NetworkCalloutServer):
        def on_read_data(self, data, end_of_stream, context):
            seen["read"] = threading.current_thread() is threading.main_thread()

        @nonblocking
        def on_write_data(self, data, end_of_stream, context):
            seen["write"] = threading.current_thread() is threading.main_thread()

    async with client(Threads).stream() as connection:
        await connection.read(b"a")
        await connection.write(b"b")
    assert seen == {"read": False, "write": True}


async def test_chunks_of_one_connection_are_handled_in_order() -> None:
    class Slow(NetworkCalloutServer):
        async def on_read_data(self, data, end_of_stream, context):
            await asyncio.sleep(0.01 if data == b"0" else 0)
            return ProcessingResult(data + b"!", True)

    async with client(Slow).stream() as connection:
        replies = [await connection.read(str(i).encode()) for i in range(5)]
    assert [r.read_data.data for r in replies] == [b"0!", b"1!", b"2!", b"3!", b"4!"]


async def test_connection_control_applies_to_raw_process_answers_too() -> None:
    class RawClose(NetworkCalloutServer):
        async def process(self, callout, context):
            if callout.read_data.data == b"quit":
                context.reset_connection()
            return await super().process(callout, context)

    async with client(RawClose).stream() as connection:
        assert (await connection.read(b"stay")).connection_status == R.CONTINUE
        reply = await connection.read(b"quit")
        assert reply.connection_status == R.CLOSE_RST
        assert reply.read_data.data == b"quit"


def test_bad_error_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="error_policy: 'explode' is not one of"):
        NetworkCalloutServer(**LOOPBACK, error_policy="explode")


def test_drop_in_module_has_the_documented_names() -> None:
    from extproc.service import network_callout_server as documented

    assert documented.NetworkCalloutServer is NetworkCalloutServer
    assert documented.ProcessingResult(b"x", False) == (b"x", False)
    assert documented.ProcessingResponse is npb.ProcessingResponse
    assert documented.NetworkContext is NetworkContext


def test_data_request_builds_what_envoy_sends() -> None:
    request = data_request("write", "hi", end_of_stream=True, metadata={"ns": {"k": 1}})
    assert request.write_data.data == b"hi" and request.write_data.end_of_stream
    assert request.metadata.filter_metadata["ns"]["k"] == 1
    with pytest.raises(ValueError, match="direction"):
        data_request("sideways", b"")
