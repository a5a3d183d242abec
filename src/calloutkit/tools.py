"""Helpers that build ext_proc replies: the documented ``callout_tools`` module.

The helpers live with the L7 server in `calloutkit.extproc`; this module is their public
path (``from calloutkit.tools import add_header_mutation``), and the documented
``extproc.service.callout_tools`` re-exports it.
"""

from .extproc._tools import *  # noqa: F403
from .extproc._tools import __all__ as __all__
