"""One configuration path: pcee reads its environment in ``pcee.settings`` alone (docs/architecture.md,
"Settings"). Elsewhere the environment is only handed to a child process or set for a third-party
library; the allowed exceptions are listed here, each with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("src/pcee", "flows", "tasks", "monitoring", "scripts")
#: files that may read the environment, and why
ALLOWED = {
    "src/pcee/settings.py": "the settings model",
    "src/pcee/training/distributed.py": "torchrun's own protocol variables (RANK, WORLD_SIZE, LOCAL_RANK)",
    "src/pcee/dvc_repo.py": "the DVC child process inherits this process's environment",
    "src/pcee/stack/s3.py": "the caller's own AWS_* variables pass through to the S3 clients it configures",
}


def _reads(tree: ast.AST) -> list[int]:
    """Lines that read ``os.environ`` (a subscript, ``.get``, a copy) or call ``os.getenv``; writes
    (``os.environ[k] = v``, ``setdefault``) configure a third-party library and are not reads."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func
            if target.attr == "getenv" and isinstance(target.value, ast.Name) and target.value.id == "os":
                lines.append(node.lineno)
            elif target.attr in ("get", "copy", "items", "keys", "values") and _is_environ(target.value):
                lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            lines += [node.lineno for a in node.args if _is_environ(a)]
        elif isinstance(node, ast.Dict):
            lines += [node.lineno for k, v in zip(node.keys, node.values) if k is None and _is_environ(v)]
    return sorted(set(lines))


def _is_environ(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def test_the_environment_is_read_in_settings_only():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ALLOWED:
                continue
            found += [f"{rel}:{line}" for line in _reads(ast.parse(path.read_text(), rel))]
    assert not found, f"environment read outside pcee.settings (add a Settings field instead): {found}"


def test_the_scan_sees_every_kind_of_read():
    code = """
import os
a = os.environ["A"]
b = os.environ.get("B")
c = os.getenv("C")
d = dict(os.environ)
e = {**os.environ, "X": "1"}
os.environ["F"] = "1"
os.environ.setdefault("G", "1")
"""
    assert _reads(ast.parse(code)) == [3, 4, 5, 6, 7]


def test_every_allowed_file_exists():
    assert all((REPO / rel).is_file() for rel in ALLOWED), [rel for rel in ALLOWED if not (REPO / rel).is_file()]
