"""Alias of calloutkit's documented command-line helpers."""

from calloutkit.cli._main import _addr, add_command_line_args

__all__ = ["_addr", "add_command_line_args"]
