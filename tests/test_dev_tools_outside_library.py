"""The library ships no development tooling: nothing under ``src/pcee`` imports the launchers or the
service manager (``pcee_dev``), moto, supervisor or runs initdb, and the wheel's packages leave
``dev/`` out (issue: dev tooling out of the library)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("pcee_dev", "moto", "supervisor", "werkzeug")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_dev_tooling():
    offenders = {
        str(p.relative_to(REPO)): sorted(_imports(p) & set(FORBIDDEN)) for p in (REPO / "src" / "pcee").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    runs_initdb = [str(p) for p in (REPO / "src" / "pcee").rglob("*.py") if '"initdb"' in p.read_text()]
    assert runs_initdb == []


def test_wheel_packages_leave_dev_out():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = config["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert packages == ["src/pcee", "flows", "tasks", "monitoring"]
    assert "pcee-dev" in config["dependency-groups"]["dev"]  # a dev dependency only
    assert all("pcee-dev" not in d for d in config["project"]["dependencies"])
