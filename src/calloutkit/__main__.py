"""``python -m calloutkit``: the ``calloutkit`` command."""

import sys

from .cli import main

sys.exit(main())
