"""The ``calloutkit`` command: ``serve``, ``send``, ``demo``, ``tyk`` and ``proxy``.

Each subcommand is a module of its own here; the servers, clients and tools they drive live
in the protocol folders (`calloutkit.extproc`, `calloutkit.network`, `calloutkit.tyk`,
`calloutkit.proxy`), so the command is the only place that knows every protocol.
"""

from ._main import add_command_line_args, main

__all__ = ["add_command_line_args", "main"]
