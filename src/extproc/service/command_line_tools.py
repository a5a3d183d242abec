"""Alias of calloutkit's documented command-line helpers."""

from calloutkit import add_command_line_args

__all__ = ["add_command_line_args"]
