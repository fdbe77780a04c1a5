"""monitoring/ and flows/ are top-level folders of the repository, not part of the installed
package: put the repository root (and this folder, for the synthetic-data helper) on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for path in (_HERE.parents[1], _HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
