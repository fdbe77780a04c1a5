"""`python -m pcee.cli ...` is the same as the `pcee` command (used under torchrun)."""

import sys

from pcee.cli import main

sys.exit(main())
