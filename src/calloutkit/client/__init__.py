"""What the L7 and L4 clients share, below both protocols.

- `_inprocess`: one stream against an in-process server (no sockets), under `CalloutClient`
  and `NetworkCalloutClient`.
- `_play`: reading a described stream and playing it on one gRPC stream, one message per
  reply, under ``calloutkit send`` and ``calloutkit send --l4``.
"""
