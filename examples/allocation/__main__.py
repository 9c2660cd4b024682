"""``python -m allocation``: see :mod:`allocation.cli`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
