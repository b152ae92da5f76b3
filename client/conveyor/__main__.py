"""``python -m conveyor``: the ``conveyor`` command line (``conveyor.cli``)."""

from .cli import main

raise SystemExit(main())
