"""Reading a routing file: YAML that remembers lines, and checks that name what is wrong.

Every value is checked where it stands, so an error can say
``routes.yaml:14: routes[1].match.tyk.hook_type: 'Pree' is not one of ...``: the file, the line,
the key path and the problem, with a suggestion for a misspelt key or backend name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from ..runtime._config import SERVER_OPTIONS, parse_address
from ..runtime._errors import ConfigError
from ._config import (
    BALANCING,
    BackendConfig,
    HealthCheckConfig,
    MirroringConfig,
    RouteConfig,
    SecurityConfig,
    TlsConfig,
    TykMatch,
)
from ._handler import WELL_KNOWN_UNARY
from ._trust import UNIX, parse_networks
from ._tyk import DISPATCH, DISPATCH_EVENT, HOOK_TYPES, hook_type

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_METHOD = re.compile(r"^(\*|/[\w.]+/(\*|\w+))$")


def read(text: str, path: str) -> dict[str, Any]:
    """Parse and validate routing YAML into `RoutingConfig`'s fields; `ConfigError` names file,
    line and key."""
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(f"{path}:{line}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return _Reader(path).config(data)


# -- YAML with line numbers --------------------------------------------------------------------

class _Map(dict[Any, Any]):
    line = 0
    lines: dict[Any, int]


class _Seq(list[Any]):
    line = 0
    lines: list[int]


class _Loader(yaml.SafeLoader):
    """Safe YAML that remembers the line of every key and list item."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str | int | float | bool):
            raise yaml.constructor.ConstructorError(
                None, None, "keys must be plain scalars", key_node.start_mark)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {out.lines[key]})",
                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


# -- validation -------------------------------------------------------------------------------

_TOP = ("listeners", "unary_methods", "mirroring", "security", "backends", "routes", "default")
_BACKEND = ("targets", "balancing", "tls", "health_check", "eject_for")
_TLS = ("ca", "cert", "key", "server_name")
_HEALTH = ("interval", "timeout", "service", "unhealthy_threshold", "healthy_threshold")
_ROUTE = ("name", "match", "backend", "mirrors", "timeout")
_MATCH = ("method", "metadata", "tyk")
_TYK = ("api_id", "org_id", "hook_name", "hook_type", "request_method", "path_prefix",
        "handler_name")
_MIRRORING = ("timeout", "max_in_flight", "queue_size")
_SECURITY = ("expose_errors", "forward_reflection", "trusted_metadata")
_OPTION_KINDS = {name: kind for name, kind, _ in SERVER_OPTIONS}


class _Reader:
    """Walks the parsed YAML, checking each value where it stands."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))

    def fail(self, line: int, where: str, message: str) -> ConfigError:
        location = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{location}: {where}: {message}" if where else
                           f"{location}: {message}")

    def mapping(self, value: Any, line: int, where: str, allowed: tuple[str, ...]) -> _Map:
        if not isinstance(value, _Map):
            raise self.fail(line, where, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else (
                    f" (expected one of: {', '.join(allowed)})")
                raise self.fail(value.lines[key], f"{where}.{key}" if where else str(key),
                                f"unknown key{hint}")
        return value

    def seq(self, value: Any, line: int, where: str, *, one_ok: bool = True) -> _Seq:
        if isinstance(value, _Seq):
            if not value:
                raise self.fail(line, where, "must not be empty")
            return value
        if one_ok and isinstance(value, str | int | float) and not isinstance(value, bool):
            out = _Seq([value])
            out.line, out.lines = line, [line]
            return out
        raise self.fail(line, where, f"expected a list, got {_kind(value)}")

    def text(self, value: Any, line: int, where: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(line, where, f"expected a string, got {_kind(value)}")
        return str(value)

    def texts(self, value: Any, line: int, where: str) -> tuple[str, ...]:
        items = self.seq(value, line, where)
        return tuple(self.text(v, items.lines[i], f"{where}[{i}]") for i, v in enumerate(items))

    def duration(self, value: Any, line: int, where: str, *, zero_ok: bool = False) -> float:
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (found := _DURATION.match(value)):
            number, unit = float(found.group(1)), found.group(2) or "s"
            seconds = number / 1000 if unit == "ms" else number * (60 if unit == "m" else 1)
        if seconds is None:
            raise self.fail(line, where, f"{value!r} is not a duration (e.g. 500ms, 5s, 1m)")
        if seconds < 0 or (seconds == 0 and not zero_ok):
            raise self.fail(line, where, f"must be {'>=' if zero_ok else '>'} 0, got {value!r}")
        return seconds

    def integer(self, value: Any, line: int, where: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(line, where, f"expected an integer, got {_kind(value)}")
        if value < minimum:
            raise self.fail(line, where, f"must be >= {minimum}, got {value}")
        return value

    def file(self, value: Any, line: int, where: str) -> bytes:
        name = os.path.join(self.folder, self.text(value, line, where))
        try:
            with open(name, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise self.fail(line, where, f"cannot read {name!r}: {exc.strerror or exc}") from None

    # -- sections -------------------------------------------------------------------------------

    def config(self, data: Any) -> dict[str, Any]:
        if data is None:
            raise self.fail(1, "", "the file is empty; it needs at least backends and a route "
                                   "or a default")
        top = self.mapping(data, 1, "", _TOP)
        if "backends" not in top:
            raise self.fail(top.line, "backends", "missing: name at least one backend")
        backends = self.backends(top["backends"], top.lines["backends"])
        routes: list[RouteConfig] = []
        if "routes" in top:
            items = self.seq(top["routes"], top.lines["routes"], "routes", one_ok=False)
            routes = [self.route(item, items.lines[i], f"routes[{i}]", backends)
                      for i, item in enumerate(items)]
        default = None
        if "default" in top:
            default = self.route(top["default"], top.lines["default"], "default", backends,
                                 is_default=True)
        if not routes and default is None:
            raise self.fail(top.line, "routes", "no routes and no default: nothing would be "
                                                "proxied")
        unary = WELL_KNOWN_UNARY
        if "unary_methods" in top:
            line = top.lines["unary_methods"]
            unary = frozenset(self.methods(top["unary_methods"], line, "unary_methods",
                                           exact=True))
        mirroring = MirroringConfig()
        if "mirroring" in top:
            mirroring = self.mirroring(top["mirroring"], top.lines["mirroring"])
        security = SecurityConfig()
        if "security" in top:
            security = self.security(top["security"], top.lines["security"])
        listeners = {}
        if "listeners" in top:
            listeners = self.listeners(top["listeners"], top.lines["listeners"])
        return {"path": self.path, "listeners": listeners, "backends": backends,
                "routes": tuple(routes), "default": default, "unary_methods": unary,
                "mirroring": mirroring, "security": security}

    def listeners(self, value: Any, line: int) -> dict[str, Any]:
        section = self.mapping(value, line, "listeners", tuple(_OPTION_KINDS))
        out: dict[str, Any] = {}
        for key, item in section.items():
            kind, where, at = _OPTION_KINDS[key], f"listeners.{key}", section.lines[key]
            if kind == "bool":
                if not isinstance(item, bool):
                    raise self.fail(at, where, f"expected true or false, got {_kind(item)}")
                out[key] = item
            elif kind == "address":
                try:
                    out[key] = parse_address(self.text(item, at, where), where)
                except ConfigError as exc:
                    raise self.fail(at, "", str(exc)) from None
            elif kind == "int":
                out[key] = self.integer(item, at, where, minimum=0)
            elif kind == "float":
                out[key] = self.duration(item, at, where, zero_ok=True)
            elif kind == "path":
                out[key] = os.path.join(self.folder, self.text(item, at, where))
            else:
                out[key] = self.text(item, at, where)
        return out

    def mirroring(self, value: Any, line: int) -> MirroringConfig:
        section = self.mapping(value, line, "mirroring", _MIRRORING)
        out = MirroringConfig()
        if "timeout" in section:
            out = dataclasses.replace(out, timeout=self.duration(
                section["timeout"], section.lines["timeout"], "mirroring.timeout"))
        for key in ("max_in_flight", "queue_size"):
            if key in section:
                out = dataclasses.replace(out, **{key: self.integer(
                    section[key], section.lines[key], f"mirroring.{key}")})
        return out

    def security(self, value: Any, line: int) -> SecurityConfig:
        section = self.mapping(value, line, "security", _SECURITY)
        out: dict[str, Any] = {}
        for key in ("expose_errors", "forward_reflection"):
            if key in section:
                if not isinstance(section[key], bool):
                    raise self.fail(section.lines[key], f"security.{key}",
                                    f"expected true or false, got {_kind(section[key])}")
                out[key] = section[key]
        if "trusted_metadata" in section:
            at = section.lines["trusted_metadata"]
            try:
                out["trusted_metadata"] = trusted_metadata(section["trusted_metadata"])
            except ValueError as exc:
                raise self.fail(at, "security.trusted_metadata", str(exc)) from None
        return SecurityConfig(**out)

    def backends(self, value: Any, line: int) -> dict[str, BackendConfig]:
        if not isinstance(value, _Map) or not value:
            raise self.fail(line, "backends", "expected a mapping of backend names to backends")
        return {str(name): self.backend(str(name), spec, value.lines[name])
                for name, spec in value.items()}

    def backend(self, name: str, value: Any, line: int) -> BackendConfig:
        where = f"backends.{name}"
        spec = self.mapping(value, line, where, _BACKEND)
        if "targets" not in spec:
            raise self.fail(spec.line, f"{where}.targets", "missing: list HOST:PORT targets")
        targets = self.texts(spec["targets"], spec.lines["targets"], f"{where}.targets")
        for i, target in enumerate(targets):
            at = spec["targets"].lines[i] if isinstance(spec["targets"], _Seq) else (
                spec.lines["targets"])
            try:
                parse_address(target, f"{where}.targets[{i}]")
            except ConfigError as exc:
                raise self.fail(at, "", str(exc)) from None
        if len(set(targets)) != len(targets):
            raise self.fail(spec.lines["targets"], f"{where}.targets", "lists a target twice")
        out = BackendConfig(name, targets)
        if "balancing" in spec:
            at = spec.lines["balancing"]
            balancing = self.text(spec["balancing"], at, f"{where}.balancing")
            if balancing not in BALANCING:
                raise self.fail(at, f"{where}.balancing",
                                f"{balancing!r} is not one of {', '.join(BALANCING)}")
            out = dataclasses.replace(out, balancing=balancing)
        if "tls" in spec:
            out = dataclasses.replace(out, tls=self.tls(spec["tls"], spec.lines["tls"],
                                                         f"{where}.tls"))
        if "health_check" in spec:
            out = dataclasses.replace(out, health_check=self.health(
                spec["health_check"], spec.lines["health_check"], f"{where}.health_check"))
        if "eject_for" in spec:
            out = dataclasses.replace(out, eject_for=self.duration(
                spec["eject_for"], spec.lines["eject_for"], f"{where}.eject_for", zero_ok=True))
        return out

    def tls(self, value: Any, line: int, where: str) -> TlsConfig | None:
        if value is False:
            return None
        if value is True:
            return TlsConfig()
        spec = self.mapping(value, line, where, _TLS)
        files = {key: self.file(spec[key], spec.lines[key], f"{where}.{key}")
                 for key in ("ca", "cert", "key") if key in spec}
        if ("cert" in files) != ("key" in files):
            raise self.fail(spec.line, where, "a client certificate needs both cert and key")
        name = None
        if "server_name" in spec:
            name = self.text(spec["server_name"], spec.lines["server_name"],
                             f"{where}.server_name")
        return TlsConfig(files.get("ca"), files.get("cert"), files.get("key"), name)

    def health(self, value: Any, line: int, where: str) -> HealthCheckConfig:
        if value is True:
            return HealthCheckConfig()
        spec = self.mapping(value, line, where, _HEALTH)
        durations = {key: self.duration(spec[key], spec.lines[key], f"{where}.{key}")
                     for key in ("interval", "timeout") if key in spec}
        counts = {key: self.integer(spec[key], spec.lines[key], f"{where}.{key}")
                  for key in ("unhealthy_threshold", "healthy_threshold") if key in spec}
        service = ""
        if spec.get("service") is not None:
            service = self.text(spec["service"], spec.lines["service"], f"{where}.service")
        return HealthCheckConfig(
            interval=durations.get("interval", 5.0), timeout=durations.get("timeout", 1.0),
            service=service, unhealthy_threshold=counts.get("unhealthy_threshold", 1),
            healthy_threshold=counts.get("healthy_threshold", 1))

    def methods(self, value: Any, line: int, where: str, *, exact: bool = False) -> tuple[str, ...]:
        items = self.texts(value, line, where)
        for i, method in enumerate(items):
            ok = _METHOD.match(method) and not (exact and method.endswith("*"))
            if not ok:
                wanted = "'/package.Service/Method'" if exact else (
                    "'/package.Service/Method', '/package.Service/*' or '*'")
                at = value.lines[i] if isinstance(value, _Seq) else line
                raise self.fail(at, f"{where}[{i}]" if isinstance(value, _Seq) else where,
                                f"{method!r} is not a method name like {wanted}")
        return items

    def route(self, value: Any, line: int, where: str, backends: Mapping[str, BackendConfig],
              *, is_default: bool = False) -> RouteConfig:
        if is_default and isinstance(value, str):
            value = _Map(backend=value)
            value.line, value.lines = line, {"backend": line}
        allowed = tuple(k for k in _ROUTE if k != "match") if is_default else _ROUTE
        spec = self.mapping(value, line, where, allowed)
        name = where
        if "name" in spec:
            name = self.text(spec["name"], spec.lines["name"], f"{where}.name")
        if "backend" not in spec:
            raise self.fail(spec.line, f"{where}.backend", "missing: which backend serves it")
        backend = self.backend_name(spec["backend"], spec.lines["backend"], f"{where}.backend",
                                    backends)
        route = RouteConfig(name=name, backend=backend, line=line)
        if "mirrors" in spec:
            items = self.seq(spec["mirrors"], spec.lines["mirrors"], f"{where}.mirrors")
            mirrors = tuple(self.backend_name(m, items.lines[i], f"{where}.mirrors[{i}]",
                                              backends) for i, m in enumerate(items))
            route = dataclasses.replace(route, mirrors=mirrors)
        if "timeout" in spec:
            route = dataclasses.replace(route, timeout=self.duration(
                spec["timeout"], spec.lines["timeout"], f"{where}.timeout"))
        if not is_default:
            if "match" not in spec:
                raise self.fail(spec.line, f"{where}.match",
                                "missing: a route needs conditions (use `default:` for a "
                                "catch-all)")
            route = self.match(route, spec["match"], spec.lines["match"], f"{where}.match")
        return route

    def backend_name(self, value: Any, line: int, where: str,
                     backends: Mapping[str, BackendConfig]) -> str:
        name = self.text(value, line, where)
        if name not in backends:
            close = difflib.get_close_matches(name, list(backends), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f" (backends: {', '.join(backends)})")
            raise self.fail(line, where, f"no backend named {name!r}{hint}")
        return name

    def match(self, route: RouteConfig, value: Any, line: int, where: str) -> RouteConfig:
        spec = self.mapping(value, line, where, _MATCH)
        if not spec:
            raise self.fail(line, where, "is empty; give method, metadata or tyk")
        if "method" in spec:
            route = dataclasses.replace(route, methods=self.methods(
                spec["method"], spec.lines["method"], f"{where}.method"))
        if "metadata" in spec:
            at = spec.lines["metadata"]
            section = spec["metadata"]
            if not isinstance(section, _Map) or not section:
                raise self.fail(at, f"{where}.metadata", "expected a mapping of keys to values")
            pairs = []
            for key, allowed in section.items():
                k_where, k_line = f"{where}.metadata.{key}", section.lines[key]
                text_key = self.text(key, k_line, k_where)
                if text_key != text_key.lower() or text_key.startswith(":"):
                    raise self.fail(k_line, k_where, "metadata keys are lower-case and never "
                                                     "pseudo-headers (':authority' is not "
                                                     "visible to the proxy)")
                pairs.append((text_key, frozenset(self.texts(allowed, k_line, k_where))))
            route = dataclasses.replace(route, metadata=tuple(pairs))
        if "tyk" in spec:
            route = dataclasses.replace(route, tyk=self.tyk(spec["tyk"], spec.lines["tyk"],
                                                            f"{where}.tyk"))
            if route.methods is not None and not any(
                    route.applies_to(m) for m in (DISPATCH, DISPATCH_EVENT)):
                raise self.fail(spec.lines["method"], f"{where}.method",
                                "tyk conditions only apply to /coprocess.Dispatcher methods")
        return route

    def tyk(self, value: Any, line: int, where: str) -> TykMatch:
        spec = self.mapping(value, line, where, _TYK)
        if not spec:
            raise self.fail(line, where, f"is empty; give one of {', '.join(_TYK)}")
        out: dict[str, Any] = {}
        for key, item in spec.items():
            at, k_where = spec.lines[key], f"{where}.{key}"
            values = self.texts(item, at, k_where)
            if key == "hook_type":
                types = set()
                for name in values:
                    number = hook_type(name)
                    if number is None:
                        raise self.fail(at, k_where, f"{name!r} is not one of "
                                                     f"{', '.join(HOOK_TYPES)} (or 1-5)")
                    types.add(number)
                out[key] = frozenset(types)
            elif key == "path_prefix":
                if any(not v.startswith("/") for v in values):
                    raise self.fail(at, k_where, "path prefixes start with '/'")
                out[key] = values
            elif key == "request_method":
                out[key] = frozenset(v.upper() for v in values)
            else:
                out[key] = frozenset(values)
        match = TykMatch(**out)
        if match.handler_name is not None and any(
                getattr(match, k) is not None
                for k in ("hook_name", "hook_type", "request_method", "path_prefix")):
            raise self.fail(line, where, "handler_name (events) cannot be combined with "
                                         "hook_name, hook_type, request_method or path_prefix "
                                         "(Dispatch calls): use two routes")
        return match


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, _Map):
        return "a mapping"
    if isinstance(value, _Seq):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def trusted_metadata(value: Any) -> tuple[str, ...] | None:
    """``trusted_metadata`` as a file or flag gives it: ``any`` (None), ``none``/false (an
    empty tuple), or networks (a list, or one string with commas). ValueError if bad."""
    if value is False or (isinstance(value, str) and value.strip().lower() == "none"):
        return ()
    if isinstance(value, str) and value.strip().lower() == "any":
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError("expected any, none, or a list of IP addresses or CIDRs "
                         f"(or {UNIX!r})")
    items = tuple(v.strip() for v in value)
    parse_networks(v for v in items if v != UNIX)
    return items
