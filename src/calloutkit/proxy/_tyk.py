"""Routing keys of a Tyk plugin call, read from the raw request without Tyk's generated code.

Tyk sends no per-API metadata: the gateway has one connection for every API and hook, so the
only way to route per API is to look inside the request. `object_view` reads a
``coprocess.Object`` (``Dispatch``): ``hook_type`` (1), ``hook_name`` (2), ``request`` (3:
``url`` 5, ``method`` 11) and ``spec`` (6, a ``map<string, string>`` with ``APIID`` and
``OrgID``). `event_view` reads a ``coprocess.Event`` (``DispatchEvent``), whose only field is
a JSON payload carrying ``spec.APIID`` and ``handler_name``. The frame itself is forwarded
unchanged, so fields this module does not know (newer session fields) survive.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from urllib.parse import urlsplit

from ._wire import fields, string_map_entry

logger = logging.getLogger(__name__)

DISPATCH = "/coprocess.Dispatcher/Dispatch"
DISPATCH_EVENT = "/coprocess.Dispatcher/DispatchEvent"

#: Tyk's ``HookType`` enum, by the names its API definitions use.
HOOK_TYPES = {"Pre": 1, "Post": 2, "PostKeyAuth": 3, "CustomKeyCheck": 4, "Response": 5}
# Spellings accepted in routing files: any case, with or without _ and -, and auth_check.
_HOOK_SPELLINGS = {**{name.lower(): n for name, n in HOOK_TYPES.items()}, "authcheck": 4}


def hook_type(value: object) -> int | None:
    """The ``HookType`` number for a name (``Pre``, ``post_key_auth``, ``auth_check``) or a
    number 1-5; None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 5 else None
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return hook_type(int(text))
        return _HOOK_SPELLINGS.get(text.lower().replace("_", "").replace("-", ""))
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class TykView:
    """What a route can match on in one Tyk call (empty strings when absent).

    Example::

        >>> object_view(bytes.fromhex("0801120470726532")).hook_name
        'pre2'
    """

    api_id: str = ""
    org_id: str = ""
    hook_name: str = ""
    hook_type: int = 0
    request_method: str = ""
    path: str = ""
    handler_name: str = ""
    is_event: bool = False


def _path(url: str) -> str:
    # Request hooks carry path + query (listen path included); Response hooks the full
    # upstream URL.
    if "://" in url:
        return urlsplit(url).path or "/"
    return url.split("?", 1)[0]


def object_view(frame: bytes) -> TykView:
    """The routing keys of a serialized ``coprocess.Object``; empty on malformed input."""
    hook_type, hook_name, url, method = 0, "", "", ""
    spec: dict[str, str] = {}
    try:
        for number, value in fields(frame, (1, 2, 3, 6)):
            if number == 1 and isinstance(value, int):
                hook_type = value
            elif not isinstance(value, bytes):
                continue
            elif number == 2:
                hook_name = value.decode("utf-8", "replace")
            elif number == 6:
                key, item = string_map_entry(value)
                spec[key] = item
            else:
                for inner, raw in fields(value, (5, 11)):
                    if isinstance(raw, bytes):
                        text = raw.decode("utf-8", "replace")
                        if inner == 5:
                            url = text
                        else:
                            method = text
    except Exception as exc:  # any unreadable Object is "no match", never a failed call
        logger.debug("not a coprocess.Object (%s); routing on nothing", exc)
        return TykView()
    return TykView(api_id=spec.get("APIID", ""), org_id=spec.get("OrgID", ""),
                   hook_name=hook_name, hook_type=hook_type, request_method=method,
                   path=_path(url))


def event_view(frame: bytes) -> TykView:
    """The routing keys of a serialized ``coprocess.Event``; empty on malformed input."""
    try:
        payload = next((v for n, v in fields(frame, (1,)) if isinstance(v, bytes)), b"")
        data = json.loads(payload or b"{}")
    except Exception as exc:
        # Any payload that does not decode matches no Tyk route, so the call takes the default
        # route: also JSON nested too deep for the decoder (RecursionError), which the client
        # controls.
        logger.debug("not a coprocess.Event with a JSON payload (%s: %s); routing on nothing",
                     type(exc).__name__, exc)
        return TykView(is_event=True)
    if not isinstance(data, dict):
        return TykView(is_event=True)
    spec = data.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    handler = data.get("handler_name")
    return TykView(api_id=str(spec.get("APIID") or ""), org_id=str(spec.get("OrgID") or ""),
                   handler_name=handler if isinstance(handler, str) else "", is_event=True)
