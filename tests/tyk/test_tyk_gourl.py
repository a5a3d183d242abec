"""`check_request_uri` and the Go ``net/url`` port behind it, case by case.

Each verdict is Go's, derived from the source of ``net/url`` in Go 1.25 (the Go of Tyk Gateway
5.14): ``ParseRequestURI`` -> ``parse(rawURL, viaRequest=true)``.
"""

from __future__ import annotations

import pytest

from calloutkit.tyk._call import check_request_uri
from calloutkit.tyk._gourl import encode_query, parse_query, parse_request_uri, parse_url

OK = None

# (url, None when Go accepts it, else the text of Go's error; for accepted ones, what
# URL.RequestURI() gives, which is what goes upstream)
REQUEST_URIS: list[tuple[str, str | None, str]] = [
    ("/", OK, "/"),
    ("/pets", OK, "/pets"),
    ("/pets?limit=1", OK, "/pets?limit=1"),
    ("/a b", OK, "/a%20b"),                    # a space is escaped, not refused
    ("/a#b", OK, "/a%23b"),                    # no fragment split via a request
    ("/p?q=a b", OK, "/p?q=a b"),              # the raw query is kept as it is
    ("/a?b?c", OK, "/a?b?c"),                  # the first ? starts the query
    ("/a?", OK, "/a?"),                        # ForceQuery
    ("/%41", OK, "/%41"),                      # RawPath kept when it is a valid escaping
    ("/a%2Fb", OK, "/a%2Fb"),
    ("/é", OK, "/%C3%A9"),
    ("/a;b,c:d@e", OK, "/a;b,c:d@e"),
    ("*", OK, "*"),
    ("//host/p", OK, "//host/p"),              # no scheme: all path, no authority
    ("http://h/p", OK, "/p"),
    ("HTTP://H/p", OK, "/p"),
    ("tyk://other-api/new/path", OK, "/new/path"),
    ("http://[::1]:80/x", OK, "/x"),
    ("http://[fe80::1%25en0]/", OK, "/"),
    ("http://[::ffff:1.2.3.4]/", OK, "/"),
    ("http://h:/", OK, "/"),                   # an empty port is a valid optional port
    ("http://u:p@h/", OK, "/"),
    ("http://h%c3%a9/", OK, "/"),              # %-encoded non-ASCII bytes in a host
    ("mailto:someone", OK, "someone"),         # a rootless path is opaque
    ("http:x", OK, "x"),
    ("", "empty url", ""),
    ("a/b", "invalid URI for request", ""),
    ("pets", "invalid URI for request", ""),
    ("1a:/x", "invalid URI for request", ""),  # a digit cannot start a scheme
    ("://x", "missing protocol scheme", ""),
    ("/a%zz", 'invalid URL escape "%zz"', ""),
    ("/a%2", 'invalid URL escape "%2"', ""),
    ("/a%", 'invalid URL escape "%"', ""),
    ("/a?q=%zz", OK, "/a?q=%zz"),              # the query is not validated by the parser
    ("/a\x7f", "net/url: invalid control character in URL", ""),
    ("/a\tb", "net/url: invalid control character in URL", ""),
    ("/a\x00", "net/url: invalid control character in URL", ""),
    ("/a\nb", "net/url: invalid control character in URL", ""),
    ("http://[::1/x", "missing ']' in host", ""),
    ("http://[1.2.3.4]/", "invalid IP-literal", ""),
    ("http://a[::1]/", "invalid IP-literal", ""),
    ("http://[v1.x]/", "invalid host: ParseAddr", ""),
    ("http://[::1%25]/", "zone must be a non-empty string", ""),
    ("http://[::1]x/", 'invalid port "x" after host', ""),
    ("http://h:x/", 'invalid port ":x" after host', ""),
    ("http://h%20/", 'invalid URL escape "%20"', ""),
    ("http://h%2f/", 'invalid URL escape "%2f"', ""),
    ("http://h{/", 'invalid character "{" in host name', ""),
    ("http://u%zz@h/", 'invalid URL escape "%zz"', ""),
    ("http://u é@h/", "net/url: invalid userinfo", ""),
]


@pytest.mark.no_server
@pytest.mark.parametrize(("url", "error", "request_uri"), REQUEST_URIS,
                         ids=[repr(case[0]) for case in REQUEST_URIS])
def test_check_request_uri_gives_go_verdicts(url: str, error: str | None,
                                              request_uri: str) -> None:
    if error is None:
        check_request_uri(url)
        assert parse_request_uri(url).request_uri() == request_uri
    else:
        with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("(", r"\(")):
            check_request_uri(url)


@pytest.mark.parametrize(("target", "error"), [
    ("127.0.0.1:5555", "first path segment in URL cannot contain colon"),
    ("[::1]:5555", "first path segment in URL cannot contain colon"),
    ("://invalid", "missing protocol scheme"),
    ("localhost:9000", None),                  # scheme "localhost", opaque "9000"
    ("tcp://127.0.0.1:5555", None),
    ("unix:///var/run/plugin.sock", None),
    ("dns:///plugins:5555", None),
])
def test_parse_url_reads_gateway_targets_as_go_does(target: str, error: str | None) -> None:
    if error is None:
        parse_url(target)
    else:
        with pytest.raises(ValueError, match=error):
            parse_url(target)


@pytest.mark.no_server
def test_query_parse_and_encode_follow_url_values() -> None:
    # `;` pairs and bad escapes are dropped; values keep their order; keys sort on encode.
    values = parse_query("b=2&a=1;x=9&b=1&c=%zz&d&e=x+y")
    assert values == {"b": ["2", "1"], "d": [""], "e": ["x y"]}
    assert encode_query(values) == "b=2&b=1&d=&e=x+y"
    assert encode_query({"z": ["1"], "a b": ["é&"]}) == "a+b=%C3%A9%26&z=1"
