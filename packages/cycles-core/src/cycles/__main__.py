"""``python -m cycles``: the ``cycles`` command."""

import sys

from cycles.cli import main

sys.exit(main())
