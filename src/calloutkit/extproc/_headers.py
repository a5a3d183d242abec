"""`Headers`: one header block (request or response headers, or trailers) read as text."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb


def header_text(header: base_pb2.HeaderValue) -> str:
    """A header's value as text: ``raw_value`` (what Envoy sends), else ``value`` (other
    data planes)."""
    return str(header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value)


def header_values(headers: Any) -> Any:
    """The repeated `HeaderValue` field of `HttpHeaders`, `HttpTrailers` or a `HeaderMap`."""
    if isinstance(headers, pb.HttpHeaders):
        return headers.headers.headers
    if isinstance(headers, pb.HttpTrailers):
        return headers.trailers.headers
    return headers.headers


class Headers(Mapping[str, str]):
    """A read-only, case-insensitive view of one header block, values as text.

    ``context.request_headers_map`` (and ``response_headers_map``, ``request_trailers_map``,
    ``response_trailers_map``) give one; so does ``Headers(message)`` for an `HttpHeaders`,
    `HttpTrailers` or `HeaderMap`. Names are lower-case, pseudo-headers included
    (``:path``, ``:method``, ``:authority``, ``:status``). A name sent several times reads
    as its values joined by ``", "`` (how HTTP combines them); `get_all` gives them one by
    one, which is the only right way to read ``set-cookie``. Values are ``raw_value``
    decoded as UTF-8 (a bad byte becomes U+FFFD), or ``value`` where ``raw_value`` is empty.

    Example::

        headers = context.request_headers_map
        if headers.get("Content-Type", "").startswith("application/json"): ...
        cookies = context.response_headers_map.get_all("set-cookie")
    """

    __slots__ = ("_values",)

    def __init__(self, headers: pb.HttpHeaders | pb.HttpTrailers | base_pb2.HeaderMap | None
                 = None) -> None:
        # Built whole at once: a view exists only because a callback asked for one.
        values: dict[str, list[str]] = {}
        if headers is not None:
            for header in header_values(headers):
                name = header.key.lower()
                text = header_text(header)
                found = values.get(name)
                if found is None:
                    values[name] = [text]
                else:
                    found.append(text)
        self._values = values

    def __getitem__(self, name: str) -> str:
        found = self._values.get(name.lower()) if isinstance(name, str) else None
        if found is None:
            raise KeyError(name)
        return found[0] if len(found) == 1 else ", ".join(found)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in the order Envoy sent them; ``[]`` when absent."""
        return list(self._values.get(name.lower(), ()))

    def __repr__(self) -> str:
        return f"Headers({dict(self)!r})"
