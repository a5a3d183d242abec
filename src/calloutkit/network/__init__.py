"""Envoy's network (L4) external processing: `NetworkCalloutServer`.

- `_server`: the server, `NetworkContext` and `ProcessingResult`.
- `_client`: `NetworkCalloutClient`, the in-process test client (public in
  `calloutkit.testing`).
- `_send`: ``calloutkit send --l4``.

Users import these names from `calloutkit` and `calloutkit.testing`.
"""
