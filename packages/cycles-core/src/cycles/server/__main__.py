"""``python -m cycles.server serve|keys ...``: the server's commands without the full CLI."""

import sys

from cycles.server.cli import main

sys.exit(main())
