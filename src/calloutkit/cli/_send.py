"""``calloutkit send``: the command; the L7 and L4 senders do the work."""

from __future__ import annotations

import argparse
from typing import Any

from ..authz._send import run_authz_send
from ..client._play import metadata_pair
from ..extproc._send import run_send
from ..network._send import run_network_send


def _run(args: argparse.Namespace) -> int:
    """``calloutkit send``: the L4 sender with ``--l4``, ext_authz with ``--authz``, else
    the L7 one."""
    if args.authz:
        return run_authz_send(args)
    if args.l4:
        return run_network_send(args)
    return run_send(args)


def add_parser(subparsers: Any) -> None:
    """Register ``calloutkit send``."""
    parser = subparsers.add_parser(
        "send", help="send a described ext_proc stream to a server and print the replies",
        description="Send the stream described in FILE (JSON or YAML; - or nothing for "
                    "stdin) to an ext_proc server, one message per reply as Envoy does, and "
                    "print each reply as a line of JSON. Exit code 1 on a gRPC error, 2 on a "
                    "bad description.")
    parser.add_argument("file", metavar="FILE", nargs="?", default="-")
    parser.add_argument("--address", "--target", dest="address", default="127.0.0.1:8080",
                        metavar="HOST:PORT",
                        help="the server's gRPC address (default 127.0.0.1:8080)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-file", "--ca", dest="ca", metavar="PEM",
                        help="CA certificate that signed the server's (implies --tls)")
    parser.add_argument("--authority", metavar="NAME",
                        help="authority and TLS server name to present")
    parser.add_argument("--metadata", "-H", dest="metadata", action="append", default=[],
                        type=metadata_pair, metavar="KEY=VALUE",
                        help="gRPC metadata on the stream (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="deadline for the whole stream (default 10)")
    parser.add_argument("--pretty", action="store_true", help="indent each reply")
    parser.add_argument("--proto-json", action="store_true",
                        help="print the exact protobuf JSON (bytes in base64)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--authz", action="store_true",
                      help="FILE describes HTTP requests (method, path, headers, body, "
                           "source, ...) to check with an ext_authz server, one reply each")
    kind.add_argument("--l4", action="store_true",
                      help="FILE describes one TCP connection (read_data / write_data "
                           "messages) for a network (L4) callout server")
    parser.set_defaults(func=_run)
