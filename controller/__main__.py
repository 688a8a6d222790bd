"""`python -m controller` is the `reconcile` command."""

from __future__ import annotations

import sys

from controller.cli import main

sys.exit(main())
