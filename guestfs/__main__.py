"""``python -m guestfs`` == the ``guestfs`` command."""

from __future__ import annotations

from guestfs.cli import main

raise SystemExit(main())
