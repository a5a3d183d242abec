"""Alias of calloutkit's documented command-line helpers."""

from calloutkit._cli import add_command_line_args

__all__ = ["add_command_line_args"]
