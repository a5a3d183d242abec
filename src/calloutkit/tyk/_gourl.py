"""Go's ``net/url`` rules, as Tyk Gateway applies them to what a plugin returns.

The gateway parses a returned ``request.url`` with ``url.ParseRequestURI`` (an error is a 500
"Middleware error" for the client), rebuilds the query with ``url.Values.Encode``, and parses
``coprocess_grpc_server`` with ``url.Parse``. Python's ``urllib`` accepts and rejects different
strings, so this module follows Go's own code, function by function (``getScheme``,
``parse``, ``parseAuthority``, ``parseHost``, ``unescape``, ``escape``, ``shouldEscape``,
``setPath``, ``EscapedPath``, ``ParseQuery``, ``Values.Encode``), on bytes as Go does.

The rules are those of Go 1.25 (Tyk Gateway 5.14), including the fix for CVE-2025-47912: only
an IPv6 address may stand in brackets (``netip.ParseAddr``), and the ``[`` must open the host.
Go 1.26 (Tyk 5.15) also rejects a second colon in an ``http``/``https`` host
(``http://a:1:2/``); that is the one difference.
"""

from __future__ import annotations

import dataclasses
import ipaddress

# Go's `encoding` modes.
_PATH, _PATH_SEGMENT, _HOST, _ZONE, _USER_PASSWORD, _QUERY_COMPONENT, _FRAGMENT = range(1, 8)

_HEX = b"0123456789ABCDEF"
_HOST_ALLOWED = frozenset(b"!$&'()*+,;=:[]<>\"")
_RESERVED = frozenset(b"$&+,/:;=?@")
_USERINFO_ALLOWED = frozenset(b"-._:~!$&'()*+,;=%@")
_VALID_ENCODED = frozenset(b"!$&'()*+,;=:@[]%")


class URLError(ValueError):
    """Go's ``*url.Error``: ``parse "<url>": <why>``."""

    def __init__(self, raw: bytes, why: str) -> None:
        super().__init__(f"parse {_quote(raw)}: {why}")
        self.why = why


def _quote(data: bytes) -> str:
    """Like Go's ``%q`` for the short strings in errors."""
    out = []
    for byte in data:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def _is_alnum(c: int) -> bool:
    return 0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A


def _ishex(c: int) -> bool:
    return 0x30 <= c <= 0x39 or 0x41 <= c <= 0x46 or 0x61 <= c <= 0x66


def _should_escape(c: int, mode: int) -> bool:
    if _is_alnum(c):
        return False
    if mode in (_HOST, _ZONE) and c in _HOST_ALLOWED:
        return False
    if c in b"-_.~":
        return False
    if c in _RESERVED:
        if mode == _PATH:
            return c == ord("?")
        if mode == _PATH_SEGMENT:
            return c in b"/;,?"
        if mode == _USER_PASSWORD:
            return c in b"@/?:"
        if mode == _QUERY_COMPONENT:
            return True
        if mode == _FRAGMENT:
            return False
    # The fragment leaves some sub-delims alone; everything else is escaped.
    return not (mode == _FRAGMENT and c in b"!()*")


class _Invalid(ValueError):
    pass


def _unescape(s: bytes, mode: int) -> bytes:
    n, has_plus, i = 0, False, 0
    while i < len(s):
        c = s[i]
        if c == 0x25:  # %
            n += 1
            if i + 2 >= len(s) or not _ishex(s[i + 1]) or not _ishex(s[i + 2]):
                raise _Invalid(f"invalid URL escape {_quote(s[i:i + 3])}")
            # In a host, %-encoding is only for non-ASCII bytes (and %25 before a zone).
            if mode == _HOST and int(chr(s[i + 1]), 16) < 8 and s[i:i + 3] != b"%25":
                raise _Invalid(f"invalid URL escape {_quote(s[i:i + 3])}")
            if mode == _ZONE:
                value = int(s[i + 1:i + 3], 16)
                if s[i:i + 3] != b"%25" and value != 0x20 and _should_escape(value, _HOST):
                    raise _Invalid(f"invalid URL escape {_quote(s[i:i + 3])}")
            i += 3
        elif c == 0x2B:  # +
            has_plus = mode == _QUERY_COMPONENT
            i += 1
        else:
            if mode in (_HOST, _ZONE) and c < 0x80 and _should_escape(c, mode):
                raise _Invalid(f"invalid character {_quote(s[i:i + 1])} in host name")
            i += 1
    if n == 0 and not has_plus:
        return s
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == 0x25:
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
            continue
        out.append(0x20 if c == 0x2B and mode == _QUERY_COMPONENT else c)
        i += 1
    return bytes(out)


def _escape(s: bytes, mode: int) -> bytes:
    out = bytearray()
    for c in s:
        if c == 0x20 and mode == _QUERY_COMPONENT:
            out.append(0x2B)
        elif _should_escape(c, mode):
            out += b"%" + _HEX[c >> 4:(c >> 4) + 1] + _HEX[c & 15:(c & 15) + 1]
        else:
            out.append(c)
    return bytes(out)


def _valid_encoded(s: bytes, mode: int) -> bool:
    return all(c in _VALID_ENCODED or not _should_escape(c, mode) for c in s)


def _valid_optional_port(port: bytes) -> bool:
    if not port:
        return True
    return port[:1] == b":" and all(0x30 <= c <= 0x39 for c in port[1:])


def _valid_userinfo(s: bytes) -> bool:
    # Go ranges over runes: any non-ASCII rune is refused, as is any other ASCII byte.
    return all(_is_alnum(c) or c in _USERINFO_ALLOWED for c in s)


def _get_scheme(raw: bytes) -> tuple[bytes, bytes]:
    for i, c in enumerate(raw):
        if 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A:
            continue
        if 0x30 <= c <= 0x39 or c in b"+-.":
            if i == 0:
                return b"", raw
            continue
        if c == 0x3A:
            if i == 0:
                raise _Invalid("missing protocol scheme")
            return raw[:i], raw[i + 1:]
        return b"", raw
    return b"", raw


def _parse_ip(text: bytes) -> bool:
    """Go's ``netip.ParseAddr``: True for IPv4, False for IPv6; ValueError otherwise."""
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        raise _Invalid(f"invalid host: ParseAddr({_quote(text)}): unexpected character") from None
    for char in value:
        if char == ".":
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise _Invalid(f"invalid host: ParseAddr({_quote(text)}): bad IPv4") from None
            return True
        if char == ":":
            address, sep, zone = value.partition("%")
            if sep and not zone:
                raise _Invalid(f"invalid host: ParseAddr({_quote(text)}): zone must be a "
                               "non-empty string")
            try:
                ipaddress.IPv6Address(address)
            except ValueError:
                raise _Invalid(f"invalid host: ParseAddr({_quote(text)}): bad IPv6") from None
            return False
        if char == "%":
            raise _Invalid(f"invalid host: ParseAddr({_quote(text)}): missing IPv6 address")
    raise _Invalid(f"invalid host: ParseAddr({_quote(text)}): unable to parse IP")


def _parse_host(host: bytes) -> bytes:
    opening = host.rfind(b"[")
    if opening > 0:
        raise _Invalid("invalid IP-literal")
    if opening == 0:
        closing = host.rfind(b"]")
        if closing < 0:
            raise _Invalid("missing ']' in host")
        colon_port = host[closing + 1:]
        if not _valid_optional_port(colon_port):
            raise _Invalid(f"invalid port {_quote(colon_port)} after host")
        colon_port = _unescape(colon_port, _HOST)
        hostname = host[1:closing]
        zone = hostname.find(b"%25")
        if zone >= 0:
            name = _unescape(hostname[:zone], _HOST) + _unescape(hostname[zone:], _ZONE)
        else:
            name = _unescape(hostname, _HOST)
        if _parse_ip(name):
            raise _Invalid("invalid IP-literal")
        return b"[" + name + b"]" + colon_port
    colon = host.rfind(b":")
    if colon != -1 and not _valid_optional_port(host[colon:]):
        raise _Invalid(f"invalid port {_quote(host[colon:])} after host")
    return _unescape(host, _HOST)


def _parse_authority(authority: bytes) -> tuple[bytes | None, bytes]:
    at = authority.rfind(b"@")
    host = _parse_host(authority if at < 0 else authority[at + 1:])
    if at < 0:
        return None, host
    userinfo = authority[:at]
    if not _valid_userinfo(userinfo):
        raise _Invalid("net/url: invalid userinfo")
    username, _, password = userinfo.partition(b":")
    _unescape(username, _USER_PASSWORD)
    _unescape(password, _USER_PASSWORD)
    return userinfo, host


@dataclasses.dataclass
class URL:
    """The fields of Go's ``url.URL`` that the gateway uses (bytes, as Go's strings)."""

    scheme: bytes = b""
    opaque: bytes = b""
    userinfo: bytes | None = None
    host: bytes = b""
    path: bytes = b""
    raw_path: bytes = b""
    force_query: bool = False
    raw_query: bytes = b""
    fragment: bytes = b""

    def escaped_path(self) -> bytes:
        """``URL.EscapedPath``: the path as it goes on the wire."""
        if self.raw_path and _valid_encoded(self.raw_path, _PATH):
            try:
                if _unescape(self.raw_path, _PATH) == self.path:
                    return self.raw_path
            except _Invalid:
                pass
        if self.path == b"*":
            return b"*"
        return _escape(self.path, _PATH)

    def request_uri(self) -> str:
        """``URL.RequestURI``: path (or opaque) and query, as sent upstream."""
        result = self.opaque
        if not result:
            result = self.escaped_path() or b"/"
        elif result.startswith(b"//"):
            result = self.scheme + b":" + result
        if self.force_query or self.raw_query:
            result += b"?" + self.raw_query
        return result.decode("utf-8", "surrogateescape")

    def string(self) -> str:
        """``URL.String`` without a fragment (request URIs have none)."""
        out = b""
        if self.scheme:
            out += self.scheme + b":"
        if self.opaque:
            out += self.opaque
        else:
            if self.scheme or self.host or self.userinfo is not None:
                if self.host or self.path or self.userinfo is not None:
                    out += b"//"
                if self.userinfo is not None:
                    out += self.userinfo + b"@"
                out += _escape(self.host, _HOST)
            path = self.escaped_path()
            if path and not path.startswith(b"/") and self.host:
                out += b"/"
            out += path
        if self.force_query or self.raw_query:
            out += b"?" + self.raw_query
        return out.decode("utf-8", "surrogateescape")

    def query(self) -> dict[str, list[str]]:
        """``URL.Query``: the query parsed, malformed pairs dropped."""
        return parse_query(self.raw_query.decode("utf-8", "surrogateescape"))


def _parse(raw: bytes, via_request: bool) -> URL:
    if any(c < 0x20 or c == 0x7F for c in raw):
        raise _Invalid("net/url: invalid control character in URL")
    if not raw and via_request:
        raise _Invalid("empty url")
    url = URL()
    if raw == b"*":
        url.path = b"*"
        return url
    scheme, rest = _get_scheme(raw)
    url.scheme = scheme.lower()
    if rest.endswith(b"?") and rest.count(b"?") == 1:
        url.force_query, rest = True, rest[:-1]
    else:
        rest, _, url.raw_query = rest.partition(b"?")
    if not rest.startswith(b"/"):
        if url.scheme:
            url.opaque = rest  # a rootless path is opaque
            return url
        if via_request:
            raise _Invalid("invalid URI for request")
        if b":" in rest.partition(b"/")[0]:
            raise _Invalid("first path segment in URL cannot contain colon")
    if ((url.scheme or (not via_request and not rest.startswith(b"///")))
            and rest.startswith(b"//")):
        authority, slash, tail = rest[2:].partition(b"/")
        rest = slash + tail
        url.userinfo, url.host = _parse_authority(authority)
    url.path = _unescape(rest, _PATH)
    url.raw_path = b"" if _escape(url.path, _PATH) == rest else rest
    return url


def _bytes(raw: str) -> bytes:
    if not isinstance(raw, str):
        raise TypeError(f"expected a str, got {type(raw).__name__}")
    return raw.encode("utf-8", "surrogateescape")


def parse_request_uri(raw: str) -> URL:
    """Go's ``url.ParseRequestURI``: an absolute URI or an absolute path, no fragment split.

    Raises `URLError` (a ValueError) with Go's message where Go returns an error.

    >>> parse_request_uri("/a b?q=1").request_uri()
    '/a%20b?q=1'
    """
    data = _bytes(raw)
    try:
        return _parse(data, True)
    except _Invalid as exc:
        raise URLError(data, str(exc)) from None


def parse_url(raw: str) -> URL:
    """Go's ``url.Parse``: any URL reference; ``#`` starts the fragment."""
    data = _bytes(raw)
    head, sep, fragment = data.partition(b"#")
    try:
        url = _parse(head, False)
    except _Invalid as exc:
        raise URLError(head, str(exc)) from None
    if sep:
        try:
            url.fragment = _unescape(fragment, _FRAGMENT)
        except _Invalid as exc:
            raise URLError(data, str(exc)) from None
    return url


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The pairs Go's ``url.ParseQuery`` keeps, in order: a pair holding a ``;`` or a bad
    escape is dropped."""
    pairs = []
    for pair in _bytes(query).split(b"&"):
        if b";" in pair or not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            key, value = _unescape(key, _QUERY_COMPONENT), _unescape(value, _QUERY_COMPONENT)
        except _Invalid:
            continue
        pairs.append((key.decode("utf-8", "surrogateescape"),
                      value.decode("utf-8", "surrogateescape")))
    return pairs


def parse_query(query: str) -> dict[str, list[str]]:
    """Go's ``url.ParseQuery`` as ``URL.Query`` uses it: `query_pairs` by key, values in
    order."""
    values: dict[str, list[str]] = {}
    for key, value in query_pairs(query):
        values.setdefault(key, []).append(value)
    return values


def encode_query(values: dict[str, list[str]]) -> str:
    """Go's ``url.Values.Encode``: keys sorted (by bytes), each key's values in order.

    >>> encode_query({"b": ["2", "1"], "a": ["x y"]})
    'a=x+y&b=2&b=1'
    """
    parts: list[bytes] = []
    for key in sorted(values, key=_bytes):
        escaped = _escape(_bytes(key), _QUERY_COMPONENT)
        parts.extend(escaped + b"=" + _escape(_bytes(value), _QUERY_COMPONENT)
                     for value in values[key])
    return b"&".join(parts).decode("ascii")
