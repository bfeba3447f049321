"""``python -m reclo_agent``: the same as the ``reclo-agent`` command."""

from .cli import main

raise SystemExit(main())
