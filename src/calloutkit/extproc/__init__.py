"""Envoy's L7 external processing (``envoy.service.ext_proc.v3``): `CalloutServer`.

- `_server`: the server, its stream loop and the fix-ups Envoy needs in replies.
- `_context`: `CalloutContext`, what a callback knows about its stream.
- `_headers`: `Headers`, a header block read as text, case-insensitively.
- `_tools`: the reply helpers (public as `calloutkit.tools`).
- `_client`: `CalloutClient`, the in-process test client (public in `calloutkit.testing`).
- `_send`: the L7 half of ``calloutkit send``.

Users import these names from `calloutkit`, `calloutkit.tools` and `calloutkit.testing`.
"""
