from __future__ import annotations

from blkback.cli import main

raise SystemExit(main())
