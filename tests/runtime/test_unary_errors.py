"""A unary call (Tyk, ext_authz) that fails inside calloutkit after decoding ends with INTERNAL
and a fixed text: the exception's text, type and paths stay in the server's log."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from conftest import LOOPBACK, running
from envoy.service.auth.v3 import external_auth_pb2 as apb

from calloutkit import AuthzServer
from calloutkit.tyk import Object, TykPluginServer

SECRET = "secret detail at /srv/app/server.py"


class BrokenTyk(TykPluginServer):
    async def dispatch_bytes(self, data: bytes) -> bytes:
        raise RuntimeError(SECRET)


class BrokenAuthz(AuthzServer):
    async def check_bytes(self, data: bytes, grpc_context: Any = None) -> bytes:
        raise KeyError(SECRET)


@pytest.mark.parametrize(("server", "method", "request_bytes"), [
    (BrokenTyk, "/coprocess.Dispatcher/Dispatch", Object().SerializeToString()),
    (BrokenAuthz, "/envoy.service.auth.v3.Authorization/Check",
     apb.CheckRequest().SerializeToString()),
])
async def test_an_internal_failure_is_internal_with_a_fixed_text(
        server: Any, method: str, request_bytes: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async with running(server(**LOOPBACK)) as srv:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.plaintext_port}") as channel:
            call = channel.unary_unary(method)
            with caplog.at_level(logging.ERROR, "calloutkit"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(request_bytes, timeout=5)
                assert (info.value.code(), info.value.details()) == (
                    grpc.StatusCode.INTERNAL, "internal error")
                assert SECRET not in (info.value.debug_error_string() or "")
                assert SECRET in caplog.text  # the traceback is the operator's
                # and the server goes on serving: the same call fails the same way, cleanly
                with pytest.raises(grpc.aio.AioRpcError) as again:
                    await call(request_bytes, timeout=5)
                assert again.value.code() == grpc.StatusCode.INTERNAL
            assert srv.active_streams == 0
