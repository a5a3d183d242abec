"""The ``calloutkit`` command and the documented ``add_command_line_args``.

Every server option is a flag (underscore spelling as documented, dash spelling as an alias)
and an environment variable ``CALLOUTKIT_<OPTION>`` (flags win). Bad input ends with a one-line
error and exit code 2.

Subcommands live in their own modules and register through `_COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, NoReturn

from ..runtime._config import (
    DEFAULT_TRANSPORT,
    ENV_PREFIX,
    NATIVE_INSTALL,
    NATIVE_MODULE,
    PATH_DEFAULTS,
    SERVER_OPTIONS,
    env_value,
    native_unavailable,
    parse_address,
)
from ..runtime._errors import CalloutKitError, ConfigError, TargetError
from ..runtime._logging import logging_context


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _address(value: str) -> tuple[str, int]:
    try:
        return parse_address(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("address: ")) from None


def _addr(value: str) -> tuple[str, int] | None:
    """The documented argparse type of an address flag: ``""`` is None (not given).

    A value without a port is an error here (one line, exit 2) where the documented helper
    returned None, which silently put the listener back on its default address.

    >>> _addr("127.0.0.1:9000"), _addr("")
    (('127.0.0.1', 9000), None)
    """
    return _address(value) if value else None


# Flags whose default is the server's to choose (None), so they take a --no- form too.
OPTIONAL_BOOLS = frozenset({"reflection", "require_client_auth", "metrics"})

_TYPES: dict[str, Callable[[str], Any]] = {"address": _address, "int": int, "float": float,
                                           "str": str, "path": str}


def add_server_arguments(parser: argparse.ArgumentParser, environ: Any = None) -> None:
    """Add every server option as a flag, with defaults from ``CALLOUTKIT_*`` variables."""
    group = parser.add_argument_group("server options (also CALLOUTKIT_<OPTION> variables)")
    for option, kind, text in SERVER_OPTIONS:
        flags = [f"--{option}"]
        if "_" in option:
            flags.append(f"--{option.replace('_', '-')}")
        default = env_value(option, kind, environ)
        if default is None:
            default = PATH_DEFAULTS.get(option)
        if kind == "bool":
            group.add_argument(*flags, dest=option, action=argparse.BooleanOptionalAction
                               if option in OPTIONAL_BOOLS else "store_true",
                               default=default if option in OPTIONAL_BOOLS else bool(default),
                               help=text)
        else:
            group.add_argument(*flags, dest=option, type=_TYPES[kind], default=default,
                               metavar=kind.upper(), help=text)


def add_command_line_args() -> argparse.ArgumentParser:
    """The documented parser: ``CalloutServer(**vars(add_command_line_args().parse_args()))``.

    Example::

        args = add_command_line_args().parse_args()
        MyServer(**vars(args)).run()
    """
    parser = ArgumentParser(description="Run a calloutkit server.")
    try:
        add_server_arguments(parser)
    except ConfigError as exc:
        parser.error(str(exc))
    return parser


def server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor keyword arguments held in parsed ``args``."""
    return {option: getattr(args, option) for option, _, _ in SERVER_OPTIONS
            if getattr(args, option, None) is not None}


def _serve(args: argparse.Namespace) -> int:
    from ._loader import load_target

    server_class = load_target(args.target)
    kwargs = server_kwargs(args)
    if args.error_policy is not None:
        kwargs["error_policy"] = args.error_policy
    try:
        server = server_class(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{server_class.__name__}: {exc}") from None
    server.run()
    return 0


def _add_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="run a server from a file, folder or module",
        description="Run the server class in TARGET: path/to/server.py, a folder with a "
                    "server.py, or package.module, optionally followed by :ClassName.")
    parser.add_argument("target", metavar="TARGET")
    parser.add_argument("--error_policy", "--error-policy", dest="error_policy",
                        default=os.environ.get(ENV_PREFIX + "ERROR_POLICY"),
                        choices=["fail_closed", "continue", "abort"],
                        help="what a raising callback answers (default fail_closed)")
    add_server_arguments(parser)
    parser.set_defaults(func=_serve)


# Subcommands defined elsewhere: "module:function" that adds its parser to the subparsers.
_COMMANDS: tuple[str, ...] = (
    "calloutkit.cli._demo:add_parser",
    "calloutkit.cli._send:add_parser",
    "calloutkit.cli._tyk:add_parser",
    "calloutkit.cli._proxy:add_parser",
)


_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
_LOG_FORMATS = ["text", "json"]
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _env_choice(name: str, default: str, choices: list[str]) -> str:
    # argparse checks choices only for values given on the command line, not for defaults.
    raw = os.environ.get(ENV_PREFIX + name, default)
    if raw.lower() not in (choice.lower() for choice in choices):
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r}: expected "
                          f"{', '.join(choices[:-1])} or {choices[-1]}")
    return raw.upper() if default.isupper() else raw.lower()


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    """Accept ``--log-level`` and ``--log-format`` after every subcommand too, where people
    put options.

    The subcommands' copies default to SUPPRESS, so only a flag that is given overrides the
    value (or ``CALLOUTKIT_LOG_LEVEL`` / ``CALLOUTKIT_LOG_FORMAT``) set before the subcommand.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--log-level", default=argparse.SUPPRESS, choices=_LOG_LEVELS,
                                 type=str.upper, help="logging threshold (default INFO)")
                sub.add_argument("--log-format", default=argparse.SUPPRESS,
                                 choices=_LOG_FORMATS, type=str.lower,
                                 help="text (default) or json: one JSON object per line")
                _add_log_options(sub)


def _configure_logging(level: str, log_format: str) -> None:
    if log_format == "json":
        # Every line a JSON object, with the ids of the stream it was logged in; warnings
        # too, rather than as text on stderr.
        logging.basicConfig(level=level, handlers=[logging_context(json=True)])
        logging.captureWarnings(True)
    else:
        logging.basicConfig(level=level, format=_TEXT_FORMAT)


def _version() -> str:
    """calloutkit's version, and which transports this installation can serve on."""
    missing = native_unavailable()
    if missing is None:
        # The module's own version: it may be importable without installed metadata.
        native = sys.modules[NATIVE_MODULE].__version__
        transports = f"grpcio, native (calloutkit-native {native})"
    else:
        transports = f"grpcio; native unavailable: {missing} ({NATIVE_INSTALL})"
    default = DEFAULT_TRANSPORT
    if default == "auto":
        default += f" (here: {'grpcio' if missing else 'native'})"
    return (f"calloutkit {metadata.version('calloutkit')}\n"
            f"transports: {transports}; default: {default}")


class _VersionAction(argparse.Action):
    """``--version``, worked out only when asked: it loads the native module to tell."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(_version())
        parser.exit()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="calloutkit", description="Build, test and run API-gateway "
                            "callout servers.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version and the transports available here, and exit")
    parser.add_argument("--log-level", default=_env_choice("LOG_LEVEL", "INFO", _LOG_LEVELS),
                        choices=_LOG_LEVELS, type=str.upper,
                        help="logging threshold (default INFO); also after the subcommand")
    parser.add_argument("--log-format", default=_env_choice("LOG_FORMAT", "text", _LOG_FORMATS),
                        choices=_LOG_FORMATS, type=str.lower,
                        help="text (default) or json: one JSON object per line, with the "
                             "stream's ids; also after the subcommand")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=ArgumentParser)
    _add_serve(subparsers)
    for entry in _COMMANDS:
        module, _, func = entry.partition(":")
        getattr(importlib.import_module(module), func)(subparsers)
    _add_log_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``calloutkit`` console script."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except ConfigError as exc:  # a bad CALLOUTKIT_* variable
        print(f"calloutkit: error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except CalloutKitError as exc:
        traceback = exc.user_traceback if isinstance(exc, TargetError) else None
        if args.log_format == "json":  # a log collector reads stderr: keep it one JSON a line
            logging.getLogger("calloutkit.cli").error(
                "calloutkit: error: %s%s", exc, f"\n{traceback}" if traceback else "")
            return 2
        if traceback:
            print(traceback, end="", file=sys.stderr)
        print(f"calloutkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

