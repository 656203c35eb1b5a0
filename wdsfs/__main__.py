"""``python -m wdsfs``: the ``wdsfs`` command (see :mod:`wdsfs.cli`)."""

from __future__ import annotations

import sys

from wdsfs.cli import main

sys.exit(main())
