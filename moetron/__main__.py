"""``python -m moetron ...`` runs the ``moetron`` command (moetron/cli.py)."""

import sys

from .cli import main

sys.exit(main())
