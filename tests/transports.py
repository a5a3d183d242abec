"""The protocol suites (ext_proc L7, L4, Tyk, ext_authz) run on each gRPC transport.

Every test there that starts a server runs once per transport: ``CALLOUTKIT_TRANSPORT`` is
set while it runs (servers built in process read it when constructed, CLI subprocesses
inherit it), and its id names the transport, e.g. ``test_x[native]``. Left out:

- tests marked ``no_server`` (they start no server, so the transport changes nothing);
- tests that choose their transports themselves, through a ``transport`` argument or
  fixture, or marked ``own_transport`` (they name it where they build their servers), so
  that they do not run twice over.

The setting is module-scoped, so that a module-scoped fixture that starts a server can be
built once per transport: such a fixture names ``server_transport`` among its arguments,
which makes pytest rebuild it when the transport changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

TRANSPORTS = ("native", "grpcio")
SUITES = {"extproc", "network", "tyk", "authz", "runtime"}
VARIABLE = "CALLOUTKIT_TRANSPORT"


def parametrize(metafunc: pytest.Metafunc) -> None:
    """Run ``metafunc``'s test on each transport, if it is in a suite and not left out."""
    if "server_transport" not in metafunc.fixturenames:
        return
    if Path(metafunc.definition.path).parent.name not in SUITES:
        return
    definition = metafunc.definition
    if (definition.get_closest_marker("no_server") or definition.get_closest_marker(
            "own_transport") or "transport" in metafunc.fixturenames):
        return
    metafunc.parametrize("server_transport", TRANSPORTS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def server_transport(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The transport the servers of this test use (None: the test does not say)."""
    transport: str | None = getattr(request, "param", None)
    if transport is None:
        yield None
        return
    before = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = transport
    try:
        yield transport
    finally:
        if before is None:
            os.environ.pop(VARIABLE, None)
        else:
            os.environ[VARIABLE] = before
