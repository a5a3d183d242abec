"""The routing layer: the YAML file and its errors, Tyk routing keys, balancing, health,
`ProxyServer` on the shared runtime (health, drain, reload) and ``calloutkit proxy``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port, read_until, spawn, stop_process
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxy_testservice import (
    BIG,
    SERVER,
    EchoBackend,
    early_end_outcomes,
    no_leftovers,  # noqa: F401 (autouse: no task left behind)
    parse_routes,
    protos,
)

from calloutkit import ConfigError
from calloutkit.proxy import (
    ProxyServer,
    RoutingConfig,
    StreamParameters,
    event_view,
    object_view,
)
from calloutkit.tyk import Hook
from calloutkit.tyk.testing import (
    HttpRequest,
    HttpResponse,
    event_payload,
    request_object,
    response_object,
)

pb, pb_grpc = protos()
Code = grpc.StatusCode







def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_routes(text)
    return str(info.value)


# -- the routing file ----------------------------------------------------------------------------

FULL = """\
    listeners:
      plaintext_address: 127.0.0.1:5555
      combined_health_check: true
      grace_period: 10s
    unary_methods: [/coprocess.Dispatcher/Dispatch]
    mirroring: {timeout: 2s, max_in_flight: 10, queue_size: 4}
    backends:
      team-a:
        targets: [127.0.0.1:7001, 127.0.0.1:7002]
        balancing: least_outstanding
        health_check: {interval: 500ms, timeout: 1s, unhealthy_threshold: 2}
        eject_for: 0
      team-a-next: {targets: 127.0.0.1:7003}
      everyone: {targets: ["[::1]:7004"]}
    routes:
      - name: team-a
        match:
          tyk: {api_id: [api-1, api-2], hook_type: [Pre, Response], path_prefix: /a/}
        backend: team-a
        mirrors: team-a-next
        timeout: 1.5
      - match:
          method: [/envoy.service.ext_proc.v3.ExternalProcessor/Process, /echo.Admin/*]
          metadata: {x-callout: [images, video]}
        backend: everyone
    default: everyone
"""


def test_full_file_parses() -> None:
    config = parse_routes(FULL)
    assert config.listeners == {"plaintext_address": ("127.0.0.1", 5555),
                                "combined_health_check": True, "grace_period": 10.0}
    assert config.unary_methods == {"/coprocess.Dispatcher/Dispatch"}
    assert (config.mirroring.timeout, config.mirroring.max_in_flight,
            config.mirroring.queue_size) == (2.0, 10, 4)
    a = config.backends["team-a"]
    assert a.targets == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert a.balancing == "least_outstanding" and a.eject_for == 0
    assert a.health_check is not None and a.health_check.interval == 0.5
    assert a.health_check.unhealthy_threshold == 2
    first, second = config.routes
    assert (first.name, first.backend, first.mirrors, first.timeout) == (
        "team-a", "team-a", ("team-a-next",), 1.5)
    assert first.tyk is not None and first.tyk.hook_type == {1, 5}
    assert first.applies_to("/coprocess.Dispatcher/Dispatch")
    assert not first.applies_to("/coprocess.Dispatcher/DispatchEvent")  # hook_type: Object only
    assert second.name == "routes[1]" and second.metadata == (
        ("x-callout", frozenset({"images", "video"})),)
    assert second.applies_to("/echo.Admin/Stats") and not second.applies_to("/echo.Echo/Unary")
    assert config.default is not None and config.default.backend == "everyone"


@pytest.mark.parametrize(("text", "expected"), [
    ("backends: {a: {targets: [x:1]}}\nroutez: []\n",
     "routes.yaml:2: routez: unknown key (did you mean 'routes'?)"),
    ("backends: {a: {targets: [x:1]}}\ndefault: b\n",
     "routes.yaml:2: default.backend: no backend named 'b' (backends: a)"),
    ("backends:\n  a: {targets: [x:1]}\nroutes:\n  - match: {tyk: {hook_type: Pree}}\n"
     "    backend: a\n",
     "routes.yaml:4: routes[0].match.tyk.hook_type: 'Pree' is not one of Pre, Post, "
     "PostKeyAuth, CustomKeyCheck, Response (or 1-5)"),
    ("backends:\n  a:\n    targets: [x:1]\n    eject_for: soon\n",
     "routes.yaml:4: backends.a.eject_for: 'soon' is not a duration (e.g. 500ms, 5s, 1m)"),
    ("backends:\n  a:\n    targets:\n      - localhost\ndefault: a\n",
     "routes.yaml:4: backends.a.targets[0]: address 'localhost' has no port (expected "
     "HOST:PORT)"),
    ("backends:\n  a: {balancing: random}\n",
     "routes.yaml:2: backends.a.targets: missing: list HOST:PORT targets"),
    ("backends:\n  a: {targets: x:1, balancing: random}\ndefault: a\n",
     "routes.yaml:2: backends.a.balancing: 'random' is not one of round_robin, "
     "least_outstanding"),
    ("backends: {a: {targets: x:1}}\nroutes:\n  - backend: a\n    match: {method: Process}\n",
     "routes.yaml:4: routes[0].match.method: 'Process' is not a method name like "
     "'/package.Service/Method', '/package.Service/*' or '*'"),
    ("backends: {a: {targets: x:1}}\nroutes:\n  - backend: a\n",
     "routes.yaml:3: routes[0].match: missing: a route needs conditions (use `default:` for a "
     "catch-all)"),
    ("backends: {a: {targets: x:1}}\nroutes:\n  - backend: a\n    match:\n"
     "      metadata: {X-Team: a}\n",
     "routes.yaml:5: routes[0].match.metadata.X-Team: metadata keys are lower-case"),
    ("backends: {a: {targets: x:1}}\n", "routes.yaml:1: routes: no routes and no default"),
    ("", "routes.yaml:1: the file is empty"),
    ("backends: {a: {targets: x:1}\n", "routes.yaml:2: not valid YAML"),
    ("backends: {a: {targets: x:1}}\ndefault: a\ndefault: a\n",
     "routes.yaml:3: not valid YAML: duplicate key 'default' (first on line 2)"),
    ("backends:\n  a:\n    targets: x:1\n    tls: {ca: nope.pem}\ndefault: a\n",
     "routes.yaml:4: backends.a.tls.ca: cannot read"),
    ("listeners: {plaintext_adress: 1.2.3.4:5}\nbackends: {a: {targets: x:1}}\ndefault: a\n",
     "routes.yaml:1: listeners.plaintext_adress: unknown key (did you mean "
     "'plaintext_address'?)"),
    ("unary_methods: [/x.Y/*]\nbackends: {a: {targets: x:1}}\ndefault: a\n",
     "routes.yaml:1: unary_methods[0]: '/x.Y/*' is not a method name like "
     "'/package.Service/Method'"),
    ("backends: {a: {targets: x:1}}\nroutes:\n  - backend: a\n    match:\n      tyk:\n"
     "        handler_name: audit\n        hook_name: Pre\n",
     "routes.yaml:5: routes[0].match.tyk: handler_name (events) cannot be combined"),
    ("security:\n  trusted_metadata: [10.0.0.0/33]\nbackends: {a: {targets: x:1}}\ndefault: a\n",
     "routes.yaml:2: security.trusted_metadata: '10.0.0.0/33' is not an IP address or CIDR"),
    ("security: {expose_errors: yes please}\nbackends: {a: {targets: x:1}}\ndefault: a\n",
     "routes.yaml:1: security.expose_errors: expected true or false"),
    ("security: {forward_reflections: true}\nbackends: {a: {targets: x:1}}\ndefault: a\n",
     "routes.yaml:1: security.forward_reflections: unknown key (did you mean "
     "'forward_reflection'?)"),
])
def test_errors_name_file_line_and_key(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


def test_hook_type_spellings() -> None:
    config = parse_routes("""\
        backends: {a: {targets: x:1}}
        routes:
          - match: {tyk: {hook_type: [pre, post_key_auth, auth_check, CustomKeyCheck, 5]}}
            backend: a
        """)
    assert config.routes[0].tyk is not None
    assert config.routes[0].tyk.hook_type == {1, 3, 4, 5}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read routing file .*nope\.yaml.*No such file"):
        RoutingConfig.load(tmp_path / "nope.yaml")


def test_tls_files_relative_to_the_routing_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "routes.yaml"
    path.write_text("backends:\n  a:\n    targets: x:1\n    tls: {ca: ca.pem, server_name: n}\n"
                    "default: a\n")
    tls = RoutingConfig.load(path).backends["a"].tls
    assert tls is not None and tls.ca == b"-----BEGIN CERTIFICATE-----\n"
    assert tls.server_name == "n"


# -- Tyk routing keys from raw bytes -------------------------------------------------------------

def test_object_view_reads_a_real_dispatch() -> None:
    obj = request_object(Hook.PRE, "MyPre", HttpRequest("POST", "/a/pets?limit=1",
                                                        body=b"x" * 100_000),
                         api_id="api-1", org_id="org-9")
    view = object_view(obj.SerializeToString())
    assert (view.api_id, view.org_id, view.hook_name, view.hook_type, view.request_method,
            view.path, view.is_event) == ("api-1", "org-9", "MyPre", 1, "POST", "/a/pets", False)
    response = response_object("MyResponse", HttpRequest("GET", "/a/pets"), HttpResponse(200),
                               api_id="api-2")
    view = object_view(response.SerializeToString())
    assert (view.api_id, view.hook_type, view.path) == ("api-2", 5, "/a/pets")


def test_event_view_reads_a_real_event() -> None:
    from calloutkit.tyk import Event

    payload = event_payload("AuthFailure", {"Path": "/a"}, handler_name="audit", api_id="api-1")
    view = event_view(Event(payload=payload).SerializeToString())
    assert (view.api_id, view.handler_name, view.is_event) == ("api-1", "audit", True)


@pytest.mark.parametrize("frame", [b"\xff", b"\x0a\x05ab", b"\x0a\x03{x}", b""])
def test_views_of_garbage_match_nothing(frame: bytes) -> None:
    assert object_view(frame).api_id == ""
    assert event_view(frame).api_id == ""


# -- the server ------------------------------------------------------------------------------------

@pytest.fixture
async def echo() -> AsyncIterator[dict[str, EchoBackend]]:
    started: dict[str, EchoBackend] = {}
    yield started
    for backend in started.values():
        backend.release.set()
        await backend.stop()


async def backends(pool: dict[str, EchoBackend], *names: str, health: bool = False) -> list[Any]:
    for name in names:
        pool[name] = await EchoBackend(name, health=health).start()
    return [pool[n] for n in names]


class Client:
    def __init__(self, server: ProxyServer) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.plaintext_port}",
                                                 options=BIG)
        self.echo = pb_grpc.EchoStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def raw_unary(self, method: str) -> Any:
        return self.channel.unary_unary(method, None, None)


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    running: list[tuple[ProxyServer, Client]] = []

    async def start(config: str | Path | RoutingConfig, **options: Any) -> tuple[ProxyServer,
                                                                             Client]:
        if isinstance(config, str):
            config = parse_routes(config)
        server = ProxyServer(config, **{**SERVER, **options})
        await server.start()
        client = Client(server)
        running.append((server, client))
        return server, client

    yield start
    for server, client in running:
        await client.channel.close()
        await server.stop(0)


async def test_routes_by_method_metadata_and_default(echo: Any, serve: Any) -> None:
    a, b, c = await backends(echo, "a", "b", "c")
    _, client = await serve(f"""
        backends:
          a: {{targets: {a.target}}}
          b: {{targets: {b.target}}}
          c: {{targets: {c.target}}}
        routes:
          - match: {{method: /echo.Admin/*}}
            backend: a
          - match: {{metadata: {{x-team: [blue, green]}}}}
            backend: b
        default: c
        """)
    assert (await client.admin.Stats(pb.Ping())).backend == "a"
    assert (await client.echo.Unary(pb.Ping(), metadata=[("x-team", "green")])).backend == "b"
    assert (await client.echo.Unary(pb.Ping(), metadata=[("x-team", "red")])).backend == "c"
    assert (await client.echo.Unary(pb.Ping())).backend == "c"


async def test_no_route_is_unimplemented(echo: Any, serve: Any) -> None:
    (a,) = await backends(echo, "a")
    _, client = await serve(f"""
        backends: {{a: {{targets: {a.target}}}}}
        routes:
          - match: {{metadata: {{x-team: blue}}}}
            backend: a
        """)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.echo.Unary(pb.Ping())
    assert (info.value.code(), info.value.details()) == (Code.UNIMPLEMENTED,
                                                          "no route for /echo.Echo/Unary")


async def test_routes_tyk_calls_by_peeked_object(echo: Any, serve: Any) -> None:
    """Which backend received a Dispatch shows the routing (these backends then answer
    UNIMPLEMENTED: the Tyk end-to-end test has real plugin servers)."""
    from calloutkit.tyk import Event

    a, b, c = await backends(echo, "a", "b", "c")
    _, client = await serve(f"""
        backends:
          a: {{targets: {a.target}}}
          b: {{targets: {b.target}}}
          c: {{targets: {c.target}}}
        routes:
          - match: {{tyk: {{api_id: api-1, hook_name: MyPre, request_method: post}}}}
            backend: a
          - match: {{tyk: {{api_id: api-1, path_prefix: [/b/, /bee/]}}}}
            backend: b
          - match: {{tyk: {{handler_name: audit}}}}
            backend: b
          - match: {{tyk: {{api_id: api-1}}}}
            backend: c
        """)
    dispatch = client.raw_unary("/coprocess.Dispatcher/Dispatch")
    event = client.raw_unary("/coprocess.Dispatcher/DispatchEvent")

    async def where(call: Any, data: bytes) -> str:
        before = {n: len(x.received) for n, x in echo.items()}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(data)
        assert info.value.code() == Code.UNIMPLEMENTED
        [name] = [n for n, x in echo.items() if len(x.received) > before[n]]
        return name

    def obj(method: str, path: str, name: str = "MyPre", api: str = "api-1") -> bytes:
        return request_object(Hook.PRE, name, HttpRequest(method, path),
                              api_id=api).SerializeToString()

    assert await where(dispatch, obj("POST", "/x")) == "a"
    assert await where(dispatch, obj("GET", "/b/1")) == "b"
    assert await where(dispatch, obj("GET", "/bee")) == "c"   # "/bee" lacks the slash
    assert await where(dispatch, obj("GET", "/x", name="Other")) == "c"
    events = [event_payload("AuthFailure", handler_name=h, api_id="api-1") for h in ("audit", "x")]
    assert await where(event, Event(payload=events[0]).SerializeToString()) == "b"
    assert await where(event, Event(payload=events[1]).SerializeToString()) == "c"
    with pytest.raises(grpc.aio.AioRpcError) as info:  # api-2: no route, no default
        await dispatch(obj("GET", "/x", api="api-2"))
    assert info.value.code() == Code.UNIMPLEMENTED
    assert info.value.details() == "no route for /coprocess.Dispatcher/Dispatch"


@pytest.mark.parametrize("depth", [1_000, 20_000])
@pytest.mark.parametrize("shape", ["lists", "objects"])
async def test_deeply_nested_event_payload_takes_the_default_route(echo: Any, serve: Any,
                                                                   depth: int,
                                                                   shape: str) -> None:
    """A DispatchEvent whose JSON payload nests too deep to decode matches no Tyk route: the
    call takes the default route instead of failing in the proxy."""
    from calloutkit.tyk import Event

    a, c = await backends(echo, "a", "c")
    _, client = await serve(f"""
        backends:
          a: {{targets: {a.target}}}
          c: {{targets: {c.target}}}
        routes:
          - match: {{tyk: {{handler_name: audit}}}}
            backend: a
        default: c
        """)
    opening, closing = ("[", "]") if shape == "lists" else ('{"spec":', "}")
    payload = (opening * depth + "1" + closing * depth).encode()
    event = client.raw_unary("/coprocess.Dispatcher/DispatchEvent")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await event(Event(payload=payload).SerializeToString())
    # The echo backends do not serve coprocess: reaching "c" shows the route.
    assert info.value.code() == Code.UNIMPLEMENTED, info.value.details()
    assert [len(echo["a"].received), len(echo["c"].received)] == [0, 1]


async def test_round_robin_and_least_outstanding(echo: Any, serve: Any) -> None:
    a, b = await backends(echo, "a", "b")
    _, client = await serve(f"""
        backends:
          rr: {{targets: [{a.target}, {b.target}]}}
          lo: {{targets: [{a.target}, {b.target}], balancing: least_outstanding}}
        routes:
          - match: {{metadata: {{x-pool: lo}}}}
            backend: lo
        default: rr
        """)
    served = [(await client.echo.Unary(pb.Ping())).backend for _ in range(6)]
    assert sorted(served) == ["a"] * 3 + ["b"] * 3 and served[0] != served[1]
    # a blocked call holds one target; least-outstanding sends the rest to the other
    md = [("x-pool", "lo")]
    held = client.echo.Unary(pb.Ping(), metadata=[*md, ("x-block", "1")])
    for _ in range(300):
        if a.active or b.active:
            break
        await asyncio.sleep(0.01)
    busy = "a" if a.active else "b"
    free = {"a": "b", "b": "a"}[busy]
    assert [(await client.echo.Unary(pb.Ping(), metadata=md)).backend
            for _ in range(4)] == [free] * 4
    echo[busy].release.set()
    assert (await held).backend == busy


@pytest.mark.parametrize("expose", [False, True])
async def test_passive_ejection(echo: Any, serve: Any, expose: bool) -> None:
    a, b = await backends(echo, "a", "b")
    server, client = await serve(f"""
        security: {{expose_errors: {str(expose).lower()}}}
        backends:
          pool: {{targets: [{a.target}, {b.target}], eject_for: 30s}}
        default: pool
        """)
    port = b.port
    await b.stop()
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append((await client.echo.Unary(pb.Ping())).backend)
        except grpc.aio.AioRpcError as exc:
            outcomes.append(exc.code().name)
            if expose:
                assert re.match(r"backend 'pool' \(127\.0\.0\.1:\d+\) unavailable: ",
                                exc.details())
            else:  # the backend's name, address and the transport's error stay in the log
                assert exc.details() == "backend unavailable"
    # at most one call hits the dead target; after that it is ejected
    assert outcomes.count("UNAVAILABLE") <= 1 and outcomes[-2:] == ["a", "a"]
    assert server.router is not None
    [target] = [t for t in server.router.backends["pool"].targets if t.address.endswith(
        f":{port}")]
    assert not target.healthy(time.monotonic())


async def test_unreachable_backend_error_names_no_address(echo: Any, serve: Any) -> None:
    (a,) = await backends(echo, "a")
    address = a.target
    _, client = await serve(f"""
        backends: {{lone: {{targets: {address}}}}}
        default: lone
        """)
    await a.stop()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.echo.Unary(pb.Ping())
    assert (info.value.code(), info.value.details()) == (Code.UNAVAILABLE,
                                                          "backend unavailable")
    assert address.rsplit(":", 1)[1] not in info.value.debug_error_string()


@pytest.mark.parametrize("forward", [None, False, True])
async def test_reflection_is_forwarded_only_when_switched_on(echo: Any, serve: Any,
                                                             forward: bool | None) -> None:
    """grpc.reflection.* through the proxy would describe the default backend to any caller."""
    (a,) = await backends(echo, "a")
    section = "" if forward is None else f"security: {{forward_reflection: {str(forward).lower()}}}"
    _, client = await serve(f"""
        {section}
        backends: {{a: {{targets: {a.target}}}}}
        default: a
        """)
    for method in ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        # One message and the half-close in one go: a separate write could race the status
        # and turn it into grpc.aio's INTERNAL on this client.
        call = client.channel.unary_stream(method, None, None)(b"")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == Code.UNIMPLEMENTED  # the echo backend has no reflection
    forwarded = [m for m in a.received if m.startswith("/grpc.reflection.")]
    assert len(forwarded) == (2 if forward else 0)
    assert (await client.echo.Unary(pb.Ping())).backend == "a"  # everything else is routed


@pytest.mark.parametrize(("trusted", "option", "expected"), [
    (None, None, "b"),                  # default: every peer's metadata routes
    ("[127.0.0.0/8]", None, "b"),       # the caller is a trusted gateway
    ('[10.0.0.0/8, "::1"]', None, "c"),  # an untrusted caller: metadata routes skipped
    ("none", None, "c"),                # metadata routing off
    ("none", "127.0.0.1", "b"),         # the option overrides the file
    ("[127.0.0.1]", "none", "c"),
])
async def test_trusted_metadata_limits_metadata_routing(echo: Any, serve: Any,
                                                        trusted: str | None, option: str | None,
                                                        expected: str) -> None:
    b, c = await backends(echo, "b", "c")
    section = "" if trusted is None else f"security: {{trusted_metadata: {trusted}}}"
    extra = {} if option is None else {"trusted_metadata": option}
    _, client = await serve(f"""
        {section}
        backends:
          b: {{targets: {b.target}}}
          c: {{targets: {c.target}}}
        routes:
          - match: {{metadata: {{x-team: blue}}}}
            backend: b
        default: c
        """, **extra)
    got = await client.echo.Unary(pb.Ping(), metadata=[("x-team", "blue")])
    assert got.backend == expected


@pytest.mark.parametrize(("peer", "trusted", "ok"), [
    ("ipv4:10.1.2.7:51234", ["10.1.2.0/24"], True),
    ("ipv4:10.1.3.7:51234", ["10.1.2.0/24"], False),
    ("ipv6:%5B::1%5D:4242", ["::1"], True),
    ("ipv6:[::ffff:10.1.2.7]:4242", ["10.1.2.0/24"], True),
    ("unix:/run/proxy.sock", ["10.0.0.0/8"], False),
    ("unix:/run/proxy.sock", ["unix"], True),
    ("garbage", ["0.0.0.0/0"], False),
    ("", ["0.0.0.0/0"], False),
])
def test_metadata_trust_reads_grpc_peers(peer: str, trusted: list[str], ok: bool) -> None:
    from calloutkit.proxy._trust import MetadataTrust

    assert MetadataTrust(trusted).trusts(peer) is ok
    assert MetadataTrust(None).trusts(peer) is True
    assert MetadataTrust([]).trusts(peer) is False


async def test_active_health_checks(echo: Any, serve: Any) -> None:
    a, b = await backends(echo, "a", "b", health=True)
    server, client = await serve(f"""
        backends:
          pool:
            targets: [{a.target}, {b.target}]
            health_check: {{interval: 50ms, timeout: 1s}}
        default: pool
        """)
    await b.set_serving(False)
    assert server.router is not None
    targets = server.router.backends["pool"].targets
    for _ in range(300):
        if not targets[1].check_ok:
            break
        await asyncio.sleep(0.01)
    assert [t.check_ok for t in targets] == [True, False]
    assert {(await client.echo.Unary(pb.Ping())).backend for _ in range(4)} == {"a"}
    await b.set_serving(True)
    for _ in range(300):
        if targets[1].check_ok:
            break
        await asyncio.sleep(0.01)
    assert {(await client.echo.Unary(pb.Ping())).backend for _ in range(4)} == {"a", "b"}


async def test_mirrors_from_the_file(echo: Any, serve: Any) -> None:
    a, m = await backends(echo, "a", "m")
    server, client = await serve(f"""
        backends:
          a: {{targets: {a.target}}}
          m: {{targets: {m.target}}}
        default: {{backend: a, mirrors: [m], timeout: 5s}}
        """)
    assert (await client.echo.Unary(pb.Ping(value="shadow"))).backend == "a"
    await server.mirror.wait_idle()
    assert [r.value for r in m.calls[0].requests] == ["shadow"]
    remaining = a.calls[0].time_remaining
    assert remaining is not None and 0 < remaining <= 5.05  # the route's timeout


async def test_proxy_health_is_its_own(echo: Any, serve: Any) -> None:
    (a,) = await backends(echo, "a")
    _, client = await serve(f"""
        backends: {{a: {{targets: {a.target}}}}}
        routes:
          - match: {{tyk: {{api_id: x}}}}
            backend: a
          - match: {{method: /envoy.service.ext_proc.v3.ExternalProcessor/*}}
            backend: a
        default: a
        """)
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "coprocess.Dispatcher", "envoy.service.ext_proc.v3.ExternalProcessor"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert a.received == []  # answered by the proxy, never proxied


async def test_drain_finishes_calls_in_flight_and_refuses_new(echo: Any, serve: Any) -> None:
    (a,) = await backends(echo, "a")
    server, client = await serve(f"backends: {{a: {{targets: {a.target}}}}}\ndefault: a\n")
    held = client.echo.Bidi(metadata=[("x-block", "1")])
    await held.write(pb.Ping(value="in flight"))
    for _ in range(300):
        if a.active:
            break
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(server.stop(5))
    for _ in range(300):
        if not server.serving:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.echo.Unary(pb.Ping())
    assert (info.value.code(), info.value.details()) == (Code.UNAVAILABLE, "server is draining")
    a.release.set()
    assert (await held.read()).value == "in flight"
    await held.done_writing()
    assert await held.read() is grpc.aio.EOF
    await stopping


async def test_reload_keeps_calls_in_flight(echo: Any, serve: Any, tmp_path: Path) -> None:
    a, b = await backends(echo, "a", "b")
    path = tmp_path / "routes.yaml"
    path.write_text(f"backends: {{a: {{targets: {a.target}}}}}\ndefault: a\n")
    server, client = await serve(RoutingConfig.load(path))
    held = client.echo.Bidi(metadata=[("x-block", "1")])
    await held.write(pb.Ping(value="before"))
    for _ in range(300):
        if a.active:
            break
        await asyncio.sleep(0.01)

    path.write_text(f"backends: {{b: {{targets: {b.target}}}}}\ndefault: b\n")
    assert await server.reload()
    assert (await client.echo.Unary(pb.Ping())).backend == "b"
    a.release.set()  # the stream opened before the reload still reaches a
    assert (await held.read()).backend == "a"
    await held.write(pb.Ping(value="after"))
    assert (await held.read()).value == "after"
    await held.done_writing()
    assert await held.read() is grpc.aio.EOF

    path.write_text("backends: {b: {targets: nope}}\ndefault: b\n")
    assert not await server.reload()  # logged; the previous routes stay
    assert (await client.echo.Unary(pb.Ping())).backend == "b"


async def test_reload_applies_the_security_section(echo: Any, serve: Any,
                                                   tmp_path: Path) -> None:
    b, c = await backends(echo, "b", "c")
    path = tmp_path / "routes.yaml"
    routes = (f"backends: {{b: {{targets: {b.target}}}, c: {{targets: {c.target}}}}}\n"
              "routes:\n  - {match: {metadata: {x-team: blue}}, backend: b}\ndefault: c\n")
    path.write_text(routes)
    server, client = await serve(RoutingConfig.load(path), expose_errors=True)
    blue = [("x-team", "blue")]
    assert (await client.echo.Unary(pb.Ping(), metadata=blue)).backend == "b"
    path.write_text("security: {trusted_metadata: none, expose_errors: false}\n" + routes)
    assert await server.reload()
    assert (await client.echo.Unary(pb.Ping(), metadata=blue)).backend == "c"
    assert server.security.expose_errors is True  # an argument beats the file, also on reload
    assert server.handler.expose_errors is True


def test_listener_precedence(tmp_path: Path) -> None:
    """Arguments, then CALLOUTKIT_* variables, then the file's listeners."""
    config = parse_routes("""\
        listeners: {plaintext_address: 127.0.0.1:5001, grace_period: 7}
        backends: {a: {targets: x:1}}
        default: a
        """)
    options = {"disable_tls": True, "combined_health_check": True}
    assert ProxyServer(config, **options).config.plaintext_address == ("127.0.0.1", 5001)
    env = {"CALLOUTKIT_PLAINTEXT_ADDRESS": "127.0.0.1:5002"}
    server = ProxyServer(config, environ=env, **options)
    assert server.config.plaintext_address == ("127.0.0.1", 5002)
    assert server.config.grace_period == 7
    server = ProxyServer(config, environ=env, plaintext_address="127.0.0.1:5003", **options)
    assert server.config.plaintext_address == ("127.0.0.1", 5003)


def test_proxy_server_needs_routes() -> None:
    with pytest.raises(ConfigError, match="needs a routing file"):
        ProxyServer(**SERVER)


async def test_subclass_directs_in_code(echo: Any) -> None:
    from calloutkit.proxy import Destination

    (a,) = await backends(echo, "a")

    class MyProxy(ProxyServer):
        async def direct(self, method: str, context: Any, peeker: Any) -> StreamParameters:
            return StreamParameters(Destination(self.channels.get(a.target)))

    server = MyProxy(**SERVER)
    await server.start()
    client = Client(server)
    try:
        assert (await client.echo.Unary(pb.Ping(value="code"))).value == "code"
    finally:
        await client.channel.close()
        await server.stop(0)


# -- the command -----------------------------------------------------------------------------------

def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calloutkit", *args], capture_output=True,
                          text=True, timeout=60, start_new_session=True, **kw)


def test_cli_check(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(FULL))
    done = _cli("proxy", "--config", str(path), "--check")
    assert done.returncode == 0, done.stderr
    assert f"{path}: OK" in done.stdout
    assert "1. team-a: tyk api_id in ['api-1', 'api-2'] and tyk hook_type in ['Pre', " \
           "'Response'] and tyk " \
           "path_prefix in ['/a/'] -> team-a (mirrors: team-a-next) (timeout 1.5s)" in done.stdout
    assert "default: everyone" in done.stdout
    assert "listeners: plaintext_address=127.0.0.1:5555, combined_health_check=True" \
        in done.stdout


def test_cli_security_flags(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(FULL))
    done = _cli("proxy", "--config", str(path), "--check")
    assert "security: expose_errors=False, forward_reflection=False, trusted_metadata=any" \
        in done.stdout
    done = _cli("proxy", "--config", str(path), "--trusted-metadata", "10.0.0.0/99")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "calloutkit: error: trusted_metadata: '10.0.0.0/99' is not an IP address or CIDR "
        "(e.g. 10.0.0.0/8, ::1, or 'unix')"]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("backends: {a: {targets: x:1}}\ndefault: b\n")
    done = _cli("proxy", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr == (f"calloutkit: error: {path}:2: default.backend: no backend named 'b' "
                           "(backends: a)\n")
    done = _cli("proxy", env={k: v for k, v in os.environ.items()
                              if k != "CALLOUTKIT_PROXY_CONFIG"})
    assert done.returncode == 2 and "--config ROUTES.YAML is required" in done.stderr


def test_the_errors_docs_proxy_md_shows_are_the_ones_printed(tmp_path: Path) -> None:
    """docs/proxy.md's broken routes.yaml, fixed one error at a time, prints its lines exactly."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "proxy.md").read_text()
    section = page[page.index("before anything starts."):]
    broken = re.search(r"```yaml\n# routes.yaml\n(.*?)```", section, re.S)
    printed = re.search(r"```\n(calloutkit: error:.*?)```", section, re.S)
    assert broken and printed
    texts = [broken.group(1)]
    texts.append(texts[-1].replace("routez: []\n", ""))
    texts.append(texts[-1].replace("backend: team-c", "backend: team-b"))
    for text, line in zip(texts, printed.group(1).splitlines(), strict=True):
        (tmp_path / "routes.yaml").write_text("# routes.yaml\n" + text)
        done = _cli("proxy", "--config", "routes.yaml", "--check", cwd=tmp_path)
        assert (done.returncode, done.stderr) == (2, line + "\n")


async def test_cli_serves_and_reloads_on_sighup(echo: Any, tmp_path: Path) -> None:
    a, b = await backends(echo, "a", "b")
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(f"""\
        listeners: {{plaintext_address: 127.0.0.1:0, combined_health_check: true}}
        backends: {{a: {{targets: {a.target}}}, b: {{targets: {b.target}}}}}
        default: a
        """))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "calloutkit", "proxy", "--config", str(path), "--disable_tls",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    assert process.stderr is not None
    lines: list[str] = []

    async def until(pattern: str) -> re.Match[str]:
        while True:
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            assert line, "proxy exited: " + "".join(lines)
            lines.append(line)
            if found := re.search(pattern, line):
                return found

    channel = None
    try:
        port = int((await until(r"ProxyServer serving: grpc 127\.0\.0\.1:(\d+)")).group(1))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.EchoStub(channel)
        assert (await stub.Unary(pb.Ping())).backend == "a"
        path.write_text(path.read_text().replace("default: a", "default: b"))
        os.kill(process.pid, signal.SIGHUP)
        await until(r"reloaded .*routes\.yaml: 0 route\(s\), 2 backend\(s\)")
        assert (await stub.Unary(pb.Ping())).backend == "b"
        os.kill(process.pid, signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if channel is not None:
            await channel.close()
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def test_cli_with_plaintext_listeners_only_does_not_warn_about_tls(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(f"""\
        listeners: {{plaintext_address: 127.0.0.1:0, health_check_address: 127.0.0.1:0}}
        backends: {{a: {{targets: 127.0.0.1:{free_port()}}}}}
        default: a
        """))
    # No certificate at the default path under tmp_path: the runtime used to warn about it.
    process = spawn([sys.executable, "-m", "calloutkit", "proxy", "--config", str(path)],
                    cwd=str(tmp_path), env={"CALLOUTKIT_PROXY_CONFIG": ""})
    assert process.stdout is not None
    try:
        lines = []
        while not lines or "serving:" not in lines[-1]:
            lines.append(process.stdout.readline())
            assert lines[-1], "proxy exited: " + "".join(lines)
        assert "grpc+tls" not in lines[-1] and "grpc 127.0.0.1:" in lines[-1]
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(30) == 0
        output = "".join(lines) + process.stdout.read()
        assert "stopped" in output
        assert not re.search("tls|certificate", output.replace("grpc+tls", ""), re.IGNORECASE), \
            output
    finally:
        stop_process(process)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
async def test_cli_passes_on_the_status_of_a_backend_that_ends_before_reading(
        echo: Any, tmp_path: Path, loop_name: str) -> None:
    """``calloutkit proxy`` used to turn most of these statuses into INTERNAL "Internal error
    from Core": its write of the client's next message raced the backend's status."""
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    (a,) = await backends(echo, "a")
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(f"""\
        listeners: {{plaintext_address: 127.0.0.1:0, combined_health_check: true}}
        backends: {{a: {{targets: {a.target}}}}}
        default: a
        """))
    process = spawn([sys.executable, "-m", "calloutkit", "proxy", "--config", str(path),
                     "--event_loop", loop_name], env={"CALLOUTKIT_PROXY_CONFIG": ""})
    try:
        line = await asyncio.to_thread(read_until, process, "serving:")
        found = re.search(r"grpc 127\.0\.0\.1:(\d+)", line)
        assert found, line
        outcomes = await asyncio.to_thread(early_end_outcomes, f"127.0.0.1:{found.group(1)}")
        for expected, got in outcomes:
            assert got == {expected: 150}, got
    finally:
        stop_process(process)
