"""The runtime every server kind stands on; it imports no protocol.

- `_server`: `BaseServer`, listeners (plaintext, TLS, mTLS), gRPC health and reflection,
  graceful drain, `run()`; a server kind hands it its methods as `Handlers`.
- `_config`: every option, validated once into a frozen `ServerConfig`, from arguments or
  ``CALLOUTKIT_*`` variables.
- `_invoke`: calling a user's callback, sync or async, inline or in the pool.
- `_middleware`: `CallInfo` and the middleware chain around a callback. `_metrics`: the
  Prometheus metrics (prometheus-client is imported there only).
- `_health`: the HTTP health listener. `_workers`: ``--workers N`` processes.
- `_errors`: the error hierarchy, `StreamAbort` and `ErrorPolicy`.
- `_malformed`: the answer to a request that does not decode, and its rate-limited log line.
- `_tls`: TLS credentials, reloaded on SIGHUP, and an mTLS client's `PeerIdentity`.
- `_idle`: a stream waiting for its next message (`stream_idle_timeout`, drain).
- `_logging`: a stream's ids on log records, and the JSON log format.
- `_tracing`: OpenTelemetry spans, as a middleware (opentelemetry is imported there only).
- `_native`: the Python side of the native transport (``calloutkit_native``, the
  calloutkit-native distribution built from ``native/``).

Users import these names from `calloutkit`.
"""
