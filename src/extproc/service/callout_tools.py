"""Alias of `calloutkit.tools` under the documented path."""

from calloutkit.tools import *  # noqa: F403
from calloutkit.tools import __all__ as __all__
