"""One rule for header names across the Tyk package: Go's ``http.Header`` treats names that
differ only in case as one header, and so must every lookup calloutkit makes in an Object."""

from __future__ import annotations

import pytest

from calloutkit.tyk import Headers, Hook, Object, PluginCall
from calloutkit.tyk._headers import named
from calloutkit.tyk.testing import HttpResponse

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server


def test_named_matches_every_spelling_and_nothing_else() -> None:
    is_length = named("Content-Length")
    names = ["content-length", "CONTENT-LENGTH", "Content-Length", "Content-Type",
             "Content-Length-X", "X-Content-Length"]
    assert [n for n in names if is_length(n)] == names[:3]
    assert named("content-length")("Content-Length")
    # Headers and the model's lookups follow the same rule.
    headers = Headers((n, str(i)) for i, n in enumerate(names))
    assert headers.get_all("content-LENGTH") == ["0", "1", "2"]
    assert HttpResponse(headers=[(n, "v") for n in names]).header_values("CONTENT-length") == \
        ["v", "v", "v"]


def test_spellings_are_one_header_in_order_as_header_add_rebuilds_them() -> None:
    # The gateway rebuilds a Response hook's headers with Header.Add over multivalue_headers,
    # entry by entry: two spellings become one header, the first entry's values first.
    headers = Headers([("Set-Cookie", "a=1"), ("set-cookie", "b=2"), ("SET-COOKIE", "c=3")])
    assert headers["set-cookie"] == "a=1"
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2", "c=3"]
    assert list(headers) == ["Set-Cookie"] and len(headers) == 1


def _response_object() -> Object:
    obj = Object(hook_type=Hook.RESPONSE.value, hook_name="h")
    obj.request.return_overrides.response_code = -1
    res = obj.response
    res.status_code = 200
    res.headers["Set-Cookie"] = "a=1"
    res.headers["Content-Type"] = "text/plain"
    res.multivalue_headers.add(key="Set-Cookie", values=["a=1"])
    res.multivalue_headers.add(key="set-cookie", values=["b=2"])
    res.multivalue_headers.add(key="Content-Type", values=["text/plain"])
    return obj


def test_response_helpers_see_and_delete_every_spelling_of_a_header() -> None:
    obj = _response_object()
    call = PluginCall(obj)
    assert call.response.headers.get_all("SET-COOKIE") == ["a=1", "b=2"]
    call.response.delete_header("SET-COOKIE")
    assert dict(obj.response.headers) == {"Content-Type": "text/plain"}
    assert [(h.key, list(h.values)) for h in obj.response.multivalue_headers] == \
        [("Content-Type", ["text/plain"])]


def test_request_helpers_replace_every_spelling_of_a_header() -> None:
    obj = Object(hook_type=Hook.PRE.value, hook_name="h")
    call = PluginCall(obj)
    call.request.delete_header("x-tier")
    call.request.set_header("X-TIER", "gold")  # the last call wins, whatever the spelling
    assert list(obj.request.delete_headers) == []
    call.request.set_header("x-tier", "silver")
    assert dict(obj.request.set_headers) == {"x-tier": "silver"}
    call.request.delete_header("X-Tier")
    assert dict(obj.request.set_headers) == {} and list(obj.request.delete_headers) == ["X-Tier"]
