#!/usr/bin/env python
"""``make up`` / ``make down`` / ``make status``, and ``stop NAME`` / ``restart NAME``: pcee's local
services under supervisord. The service manager is a development tool (``dev/``,
:mod:`pcee_dev.services.manager`, which documents it); this is its command line."""

from __future__ import annotations

import sys

from pcee_dev.services.manager import main

if __name__ == "__main__":
    sys.exit(main())
