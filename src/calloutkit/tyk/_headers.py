"""Header names in Tyk's coprocess Objects: one rule for "is this the same header?".

The gateway keeps headers in Go's ``http.Header``, which canonicalises a name before every get,
set and delete (``x-api-key`` is ``X-Api-Key``), and rebuilds a Response hook's headers with
``Header.Add`` from ``multivalue_headers``, so two entries whose names differ only in case are
one header with both entries' values, in order. The Object itself is plain protobuf: its maps
(``headers``, ``set_headers``, ``return_overrides.headers``) and lists (``delete_headers``,
``multivalue_headers``) compare names exactly. Every lookup calloutkit makes in them, and in
(name, value) pairs, goes through `named` or `Headers` so that all of them agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping

#: An HTTP token (RFC 9110): a valid header name or method.
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _fold(name: str) -> str:
    return name.lower()


def named(name: str) -> Callable[[str], bool]:
    """A test for "is this name the header ``name``?", whatever the case of either.

    >>> is_length = named("Content-Length")
    >>> [k for k in ("content-length", "Content-Type", "CONTENT-LENGTH") if is_length(k)]
    ['content-length', 'CONTENT-LENGTH']
    """
    key = _fold(name)
    return lambda candidate: _fold(candidate) == key


def canonical_header_key(key: str) -> str:
    """Go's ``textproto.CanonicalMIMEHeaderKey``: ``x-api-key`` -> ``X-Api-Key``."""
    if not TOKEN.match(key):
        return key
    return "-".join(part[:1].upper() + part[1:].lower() for part in key.split("-"))


class Headers(Mapping[str, str]):
    """A read-only, case-insensitive view of headers: ``headers["content-type"]`` is the first
    value, ``headers.get_all("set-cookie")`` every value.

    Example::

        call.request.headers.get("authorization", "")
        call.response.headers.get_all("Set-Cookie")
    """

    __slots__ = ("_names", "_values")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._names: dict[str, str] = {}
        self._values: dict[str, list[str]] = {}
        for name, value in items:
            key = _fold(name)
            self._names.setdefault(key, name)
            self._values.setdefault(key, []).append(value)

    def __getitem__(self, name: str) -> str:
        return self._values[_fold(name)][0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _fold(name) in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._names.values())

    def __len__(self) -> int:
        return len(self._names)

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order; empty when absent."""
        return list(self._values.get(_fold(name), ()))

    def __repr__(self) -> str:
        pairs = ", ".join(f"{self._names[k]!r}: {v!r}" for k, v in self._values.items())
        return f"Headers({{{pairs}}})"
