"""CalloutServer's reply shaping and error policy, driven in process with CalloutClient."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import LOOPBACK
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from calloutkit import (
    CalloutServer,
    ErrorPolicy,
    add_body_mutation,
    add_header_mutation,
    override_mode,
)
from calloutkit.testing import CalloutClient, StreamEnded, header_changes, header_removals

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server

REQUEST = {":path": "/", ":method": "POST", "content-length": "5"}
RESPONSE = {":status": "200", "content-length": "5"}


class Replacer(CalloutServer):
    def on_request_body(self, body, context):
        return add_body_mutation(body=b"a much longer body")

    def on_response_body(self, body, context):
        return add_body_mutation(body=body.body)  # same length: nothing to fix


class Raiser(CalloutServer):
    def on_request_headers(self, headers, context):
        raise ValueError("database password is hunter2")

    def on_response_headers(self, headers, context):
        return "not a reply"


def client(server_class: type[CalloutServer], **options) -> CalloutClient:
    policy = options.pop("error_policy", ErrorPolicy.FAIL_CLOSED)
    return CalloutClient(server_class(error_policy=policy, **LOOPBACK), **options)


@pytest.mark.parametrize("phase", ["request_headers", "response_headers", "request_body",
                                   "response_body", "request_trailers", "response_trailers"])
async def test_default_reply_is_typed_for_every_phase(phase):
    async with client(CalloutServer).stream() as stream:
        method = getattr(stream, phase)
        argument = {"x": "1"} if "body" not in phase else b"data"
        reply = await method(argument)
        assert reply.WhichOneof("response") == phase


async def test_buffered_length_change_sets_content_length():
    async with client(Replacer, request_body_mode="BUFFERED",
                      response_body_mode="BUFFERED").stream() as stream:
        await stream.request_headers(REQUEST)
        reply = await stream.request_body(b"hello")
        assert header_changes(reply) == {"content-length": str(len(b"a much longer body"))}
        await stream.response_headers(RESPONSE)
        reply = await stream.response_body(b"hello")
        assert header_changes(reply) == {}


async def test_no_content_length_when_the_request_had_none():
    async with client(Replacer, request_body_mode="BUFFERED").stream() as stream:
        await stream.request_headers({":path": "/", "transfer-encoding": "chunked"})
        assert header_changes(await stream.request_body(b"hello")) == {}


async def test_full_duplex_replies_use_streamed_response():
    async with client(Replacer, request_body_mode="FULL_DUPLEX_STREAMED",
                      response_body_mode="FULL_DUPLEX_STREAMED").stream() as stream:
        await stream.request_headers(REQUEST)
        reply = await stream.request_body(b"hello", end_of_stream=False)
        streamed = reply.request_body.response.body_mutation.streamed_response
        assert (streamed.body, streamed.end_of_stream) == (b"a much longer body", False)
        await stream.response_headers(RESPONSE)
        reply = await stream.response_body(b"bye", end_of_stream=True)
        streamed = reply.response_body.response.body_mutation.streamed_response
        assert (streamed.body, streamed.end_of_stream) == (b"bye", True)


async def test_mode_override_to_streamed_is_tracked_and_strips_content_length():
    class Overrider(Replacer):
        def on_request_headers(self, headers, context):
            return override_mode(context, add_header_mutation(add=[("x", "1")]),
                                 request_body_mode="STREAMED")

    async with client(Overrider, request_body_mode="BUFFERED").stream() as stream:
        reply = await stream.request_headers(REQUEST)
        assert reply.mode_override.request_body_mode == 1
        assert header_removals(reply) == ["content-length"]
        reply = await stream.request_body(b"hello")
        assert header_changes(reply) == {}  # STREAMED now: no content-length to fix


async def test_fail_closed_answers_500_without_the_exception_text(caplog):
    async with client(Raiser).stream() as stream:
        reply = await stream.request_headers(REQUEST)
        assert reply.immediate_response.status.code == 500
        assert b"hunter2" not in reply.SerializeToString()
        assert "hunter2" in caplog.text  # but the operator sees the traceback
        reply = await stream.response_headers(RESPONSE)  # wrong return type: same policy
        assert reply.immediate_response.status.code == 500
        assert "returned str" in caplog.text


async def test_continue_policy_sends_the_empty_reply():
    async with client(Raiser, error_policy="continue").stream() as stream:
        reply = await stream.request_headers(REQUEST)
        assert reply.WhichOneof("response") == "request_headers"
        assert not reply.request_headers.response.header_mutation.set_headers


async def test_abort_policy_ends_the_stream_with_a_generic_status():
    async with client(Raiser, error_policy=ErrorPolicy.ABORT).stream() as stream:
        with pytest.raises(StreamEnded) as ended:
            await stream.request_headers(REQUEST)
        assert ended.value.code == grpc.StatusCode.INTERNAL
        assert "hunter2" not in ended.value.details


async def test_value_only_headers_are_moved_to_raw_value():
    class ValueOnly(CalloutServer):
        def on_request_headers(self, headers, context):
            reply = pb.HeadersResponse()
            option = reply.response.header_mutation.set_headers.add()
            option.header.key, option.header.value = "x-value", "kept"
            return reply

    async with client(ValueOnly).stream() as stream:
        assert header_changes(await stream.request_headers(REQUEST)) == {"x-value": "kept"}


async def test_value_only_headers_are_found_among_removals_and_appends():
    class Mixed(CalloutServer):
        def on_response_headers(self, headers, context):
            reply = add_header_mutation(add=[("x-raw", "1")], remove=["server"],
                                        append_action=1)  # APPEND_IF_EXISTS_OR_ADD
            option = reply.response.header_mutation.set_headers.add()
            option.header.key, option.header.value = "x-value", "kept"
            return reply

    async with client(Mixed).stream() as stream:
        await stream.request_headers(REQUEST)
        reply = await stream.response_headers(RESPONSE)
        assert header_changes(reply) == {"x-raw": "1", "x-value": "kept"}
        assert header_removals(reply) == ["server"]


async def test_state_lives_for_the_whole_stream_and_process_can_be_overridden():
    class Stateful(CalloutServer):
        def new_state(self):
            return {"phases": []}

        async def process(self, callout, context):
            context.state["phases"].append(callout.WhichOneof("request"))
            reply = await super().process(callout, context)
            if callout.HasField("response_headers"):
                reply.response_headers.response.header_mutation.CopyFrom(
                    add_header_mutation(add=[("x-phases", ",".join(context.state["phases"]))])
                    .response.header_mutation)
            return reply

    async with client(Stateful).stream() as stream:
        await stream.request_headers(REQUEST)
        reply = await stream.response_headers(RESPONSE)
        assert header_changes(reply) == {"x-phases": "request_headers,response_headers"}


async def test_observability_mode_runs_callbacks_and_replies_as_usual():
    seen = []

    class Watcher(CalloutServer):
        async def on_request_headers(self, headers, context):
            seen.append(context.request.observability_mode)
            return add_header_mutation(add=[("ignored", "1")])

    # Envoy ignores these replies; a client written for the documented server waits for them
    async with client(Watcher, observability_mode=True).stream() as stream:
        reply = await stream.request_headers(REQUEST)
        assert header_changes(reply) == {"ignored": "1"}
        assert (await stream.response_body(b"x")).WhichOneof("response") == "response_body"
    assert seen == [True]


async def test_a_process_override_returning_none_gets_no_reply_in_process():
    class Silent(CalloutServer):
        async def process(self, callout, context):
            return None

    async with client(Silent, observability_mode=True).stream() as stream:
        assert await stream.request_headers(REQUEST) is None


async def test_a_request_without_a_phase_gets_an_empty_reply():
    async with client(CalloutServer).stream() as stream:
        assert await stream.send(pb.ProcessingRequest()) == pb.ProcessingResponse()
        # the stream goes on
        assert (await stream.request_headers(REQUEST)).HasField("request_headers")


class SyncOverride(CalloutServer):
    """A documented-API override: a plain def that uses the message super().process gives."""

    def process(self, callout, context):
        reply = super().process(callout, context)
        assert isinstance(reply, pb.ProcessingResponse)
        if reply.HasField("immediate_response"):
            return reply
        if callout.HasField("response_headers"):
            option = reply.response_headers.response.header_mutation.set_headers.add()
            option.header.key, option.header.raw_value = "x-from-process", b"1"
        return reply

    def on_request_headers(self, headers, context):  # called in process's own thread
        return add_header_mutation(add=[("x-def", "1")])

    async def on_response_headers(self, headers, context):  # run on the loop, waited for
        await asyncio.sleep(0)
        return add_header_mutation(add=[("x-async", "1")])


async def test_a_def_process_override_gets_a_message_from_super():
    async with client(SyncOverride).stream() as stream:
        assert header_changes(await stream.request_headers(REQUEST)) == {"x-def": "1"}
        reply = await stream.response_headers(RESPONSE)
        assert header_changes(reply) == {"x-async": "1", "x-from-process": "1"}
        assert await stream.send(pb.ProcessingRequest()) == pb.ProcessingResponse()


async def test_an_inline_def_process_cannot_wait_for_an_async_callback(caplog):
    from calloutkit import nonblocking

    class Inline(SyncOverride):
        process = nonblocking(SyncOverride.process)

    async with client(Inline).stream() as stream:
        assert header_changes(await stream.request_headers(REQUEST)) == {"x-def": "1"}
        reply = await stream.response_headers(RESPONSE)  # would deadlock the loop: fails closed
        assert reply.immediate_response.status.code == 500
    assert "make process async def" in caplog.text


async def test_a_def_process_override_fails_closed_when_a_callback_raises():
    class SyncOverride(CalloutServer):
        def process(self, callout, context):
            return super().process(callout, context)

        def on_request_headers(self, headers, context):
            raise ValueError("secret detail")

    async with client(SyncOverride).stream() as stream:
        reply = await stream.request_headers(REQUEST)
        assert reply.immediate_response.status.code == 500
        assert b"secret" not in reply.immediate_response.body


async def test_the_context_takes_attributes_of_its_own_for_the_stream():
    class Remembers(CalloutServer):
        def on_request_headers(self, headers, context):
            assert getattr(context, "_mine", None) is None
            context._mine = ["request"]
            return None

        def on_response_headers(self, headers, context):
            context._mine.append("response")
            return add_header_mutation(add=[("x-mine", ",".join(context._mine))])

    for _ in range(2):  # each stream starts without it
        async with client(Remembers).stream() as stream:
            await stream.request_headers(REQUEST)
            reply = await stream.response_headers(RESPONSE)
            assert header_changes(reply) == {"x-mine": "request,response"}


def test_unknown_error_policy_is_a_config_error():
    from calloutkit import ConfigError

    with pytest.raises(ConfigError, match="error_policy"):
        CalloutServer(error_policy="explode", **LOOPBACK)


# -- reply framing and async callbacks on the hot path ---------------------------------------

async def test_a_reply_object_returned_again_is_never_changed_by_a_fix_up():
    kept = add_body_mutation(body=b"kept body")
    original = kept.SerializeToString()

    class Cached(CalloutServer):
        def on_request_body(self, body, context):
            return kept

    async with client(Cached, request_body_mode="FULL_DUPLEX_STREAMED").stream() as stream:
        await stream.request_headers(REQUEST)
        for end in (False, True):
            reply = await stream.request_body(b"chunk", end_of_stream=end)
            streamed = reply.request_body.response.body_mutation.streamed_response
            assert (streamed.body, streamed.end_of_stream) == (b"kept body", end)
    async with client(Cached, request_body_mode="BUFFERED").stream() as stream:
        await stream.request_headers(REQUEST)
        assert header_changes(await stream.request_body(b"hello")) == {"content-length": "9"}
    assert kept.SerializeToString() == original


@pytest.mark.parametrize("size", [0, 100, 127, 128, 16_383, 16_384, 3_000_000])
async def test_replies_of_every_length_arrive_whole(size):
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    class Sized(CalloutServer):
        async def on_response_body(self, http_body, context):
            return add_body_mutation(body=body)

    async with client(Sized).stream() as stream:
        reply = await stream.response_body(b"")
        assert reply.WhichOneof("response") == "response_body"
        assert reply.response_body.response.body_mutation.body == body


async def test_an_async_callback_may_suspend_and_still_answer_or_fail():
    class Slow(CalloutServer):
        async def on_request_headers(self, headers, context):
            await asyncio.sleep(0.01)
            await asyncio.get_running_loop().run_in_executor(None, lambda: None)
            return add_header_mutation(add=[("x-slow", "1")])

        async def on_response_headers(self, headers, context):
            await asyncio.sleep(0)
            raise ValueError("after suspending")

    async with client(Slow).stream() as stream:
        assert header_changes(await stream.request_headers(REQUEST)) == {"x-slow": "1"}
        reply = await stream.response_headers(RESPONSE)
        assert reply.immediate_response.status.code == 500
