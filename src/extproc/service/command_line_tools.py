"""Alias of calloutkit's documented command-line helpers."""

from calloutkit import add_command_line_args
from calloutkit.cli._main import _addr

__all__ = ["_addr", "add_command_line_args"]
