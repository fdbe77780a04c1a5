"""Shared test setup: quiet, self-contained runs with all state under a temporary directory.

Parallel runs (pytest-xdist, ``make test``): each worker gets its own state directory and Prefect
home, and tests that share a service-starting fixture run on one worker (see the hooks below).

Nothing a test does, nor any command it runs, writes into the checkout: the session fails when a file
of it appeared, changed or vanished during the run (:func:`checkout_files`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# "gw0", "gw1", ... in a pytest-xdist worker (set before this file is imported); None in a serial run
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_STATE = Path(tempfile.mkdtemp(prefix=f"pcee-test-state-{_WORKER}-" if _WORKER else "pcee-test-state-"))
# The evidence model cache is the run's one shared directory: the controller makes it (a serial run
# too), the workers inherit its path, and the tests that train into it share one worker (the
# ``evidence_cache`` fixture). PCEE_TEST_EVIDENCE_CACHE keeps it between runs; by default a run starts
# with none, as a fresh clone does, and never writes it into the checkout.
if not os.environ.get("PCEE_TEST_EVIDENCE_CACHE"):
    os.environ["PCEE_TEST_EVIDENCE_CACHE"] = str(Path(tempfile.mkdtemp(prefix="pcee-test-evidence-")))
_shared_evidence = Path(os.environ["PCEE_TEST_EVIDENCE_CACHE"]).resolve()
_shared_evidence.mkdir(parents=True, exist_ok=True)
(_STATE / "evidence").mkdir()
(_STATE / "evidence" / "outputs").symlink_to(_shared_evidence, target_is_directory=True)
# Each process of the run (the controller, each worker) has its own state dir and Prefect home (the
# ephemeral Prefect server's SQLite database), whatever the caller's (the Makefile's PCEE_STATE_DIR=.pcee).
# So do the caches the Makefile would put under it (matplotlib's, DVC's site cache).
os.environ["PCEE_STATE_DIR"] = str(_STATE)
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["MPLCONFIGDIR"] = str(_STATE / "matplotlib")
os.environ["DVC_SITE_CACHE_DIR"] = str(_STATE / "dvc-site-cache")
# Hypothesis keeps its example database and constants cache in ./.hypothesis by default: the checkout
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(_STATE / "hypothesis")
if _WORKER:
    # one intra-op thread per worker and per process it starts (several workers share the cores);
    # in-process torch is at one thread anyway (test modules set it on import)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(key, value)
# no Prefect or MLflow server unless a test names one (not a developer's `make up` ones, from env.sh)
os.environ["PREFECT_API_URL"] = ""
for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(key, None)

REPO_ROOT = Path(__file__).resolve().parents[1]


import pytest  # noqa: E402

# --- the checkout stays as it was ---------------------------------------------------------------
# Not compared: git's own files, the environment, bytecode and pytest's cache (written by the test
# runner itself), and the state directory of a developer's own `make up` (the suite never uses it).
_UNCOMPARED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
_UNCOMPARED_TOP = {".pcee"}


def checkout_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of the checkout under ``root`` (relative path -> size, mtime in ns), but the uncompared ones."""
    files: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = [d for d in dirnames if d not in _UNCOMPARED_DIRS and not (top and d in _UNCOMPARED_TOP)]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:  # removed while walking
                continue
            files[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return files


def checkout_changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """``git status``-style lines for what differs: ``A`` new, ``M`` changed (size or mtime), ``D`` gone."""
    lines = [f"A {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"M {p}" for p in sorted(p for p in after.keys() & before.keys() if after[p] != before[p])]
    lines += [f"D {p}" for p in sorted(before.keys() - after.keys())]
    return lines


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _WORKER:  # the controller (or a serial run) watches the checkout for the whole run
        session.config.stash[_CHECKOUT_KEY] = checkout_files(REPO_ROOT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_CHECKOUT_KEY, None)
    if before is None:
        return
    changes = checkout_changes(before, checkout_files(REPO_ROOT))
    session.config.stash[_CHANGES_KEY] = changes
    if changes and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """What a green count alone would hide: files the run wrote into the checkout, and any test that
    needed more than one attempt (the suite retries nothing; a rerun plugin's reruns would show here)."""
    reruns = sorted({r.nodeid for r in terminalreporter.stats.get("rerun", [])})
    terminalreporter.write_sep("=", "tests that needed more than one attempt")
    terminalreporter.write_line("\n".join(reruns) if reruns else "none")
    for key in ("passed", "failed"):  # what the API fuzzer tried (tests/serving/test_fuzz.py)
        for report in terminalreporter.stats.get(key, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "schemathesis" and report.when == "call":
                    terminalreporter.write_sep("=", "schemathesis: what the fuzzer tried")
                    terminalreporter.write_line(str(value))
    changes = config.stash.get(_CHANGES_KEY, None)
    if changes is None:
        return
    terminalreporter.write_sep(
        "=", "checkout unchanged by the run" if not changes else "FAILED: the run changed the checkout"
    )
    for line in changes[:50]:
        terminalreporter.write_line(line)
    if len(changes) > 50:
        terminalreporter.write_line(f"... and {len(changes) - 50} more")


_CHECKOUT_KEY = pytest.StashKey[dict[str, tuple[int, int]]]()
_CHANGES_KEY = pytest.StashKey[list[str]]()

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _fresh_prefect_services():
    """Prefect keeps one events worker and one API log worker per process, each with a client bound to the
    API URL of the moment it started (its cache key holds no URL). A test that emits against its own server
    would otherwise leave them to a later test in the same worker process, whose events then go to the first,
    stopped server and are lost (an automation test failed this way). Drained after every test that used
    them: the next emit starts them on the current URL."""
    yield
    import sys

    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        EventsWorker.drain_all(timeout=10)
        APILogWorker.drain_all(timeout=10)


@pytest.fixture(autouse=True)
def _isolate_mlflow_uris():
    """MLflow keeps the tracking/registry URI in module globals and copies it into os.environ
    (``set_tracking_uri``/``set_registry_uri``); a test that points MLflow at its own store must
    not send a later test's ``models:/`` lookups there."""
    saved = {key: os.environ.get(key) for key in _MLFLOW_ENV}
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils

        tracking_utils._tracking_uri = None
        registry_utils._registry_uri = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# --- pytest-xdist (make test: -n N --dist loadgroup --no-loadscope-reorder) -------------------------
# Session fixtures that start services or train into a shared cache: each xdist worker would run its
# own copy, so the tests that use one are sent to one worker together.
SHARED_FIXTURES = ("stack", "prefect_server", "evidence_cache", "postgres_server")


def _xdist_groups(items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """Each item's xdist group: tests that share a SHARED_FIXTURES fixture or a module-scoped fixture
    of their module (e.g. a module's server, or the pipeline's trained champion) are kept together,
    and so, transitively, are groups that share a test."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    needs: dict[pytest.Item, list[str]] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs if info is not None else {}
        keys = [f"fixture:{name}" for name in SHARED_FIXTURES if name in defs]
        if any(fixturedefs[-1].scope == "module" for fixturedefs in defs.values()):
            keys.append(f"module:{item.nodeid.split('::')[0]}")
        keys += [
            f"group:{mark.args[0] if mark.args else mark.kwargs.get('name', 'default')}"
            for mark in item.iter_markers("xdist_group")
        ]
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        if keys:
            needs[item] = keys
    names: dict[str, str] = {}  # a group is named by its first key (an explicit xdist_group mark: its name)
    for keys in needs.values():
        names.setdefault(find(keys[0]), keys[0].split(":", 1)[1])
    for keys in needs.values():
        for key in keys:
            if key.startswith("group:"):
                names[find(key)] = key.split(":", 1)[1]
    return {item: names[find(keys[0])] for item, keys in needs.items()}


def _expected_seconds(item: pytest.Item) -> float:
    """The test's own bound on its duration: its pytest-timeout mark (0 when it has none)."""
    mark = item.get_closest_marker("timeout")
    return float(mark.args[0] if mark and mark.args else (mark.kwargs.get("timeout", 0) if mark else 0))


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns a bare -n into --dist load
def pytest_cmdline_main(config: pytest.Config) -> None:
    """``pytest -n N`` with no --dist distributes as ``make test`` does (the grouping below needs it)."""
    opt = config.option
    if (
        getattr(opt, "numprocesses", None)
        and getattr(opt, "dist", "no") == "no"
        and not getattr(opt, "distload", False)
    ):
        opt.dist = "loadgroup"
        opt.loadscopereorder = False


@pytest.hookimpl(wrapper=True)  # around the other hooks, xdist's included
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    if not _WORKER:  # a serial run: nothing to schedule, the collection order stays
        return (yield)
    groups = _xdist_groups(items)
    for item, name in groups.items():
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(name))
    _longest_first(items, groups)
    result = yield
    _mark_group_in_nodeid(items)  # whatever --dist: a worker is not told which (a bare -n is loadgroup, above)
    return result


def _longest_first(items: list[pytest.Item], groups: dict[pytest.Item, str]) -> None:
    """Order the scheduling units (a group, or one test) for xdist's --no-loadscope-reorder, which
    hands them out in this order: long units first (those whose tests declare the longest timeouts,
    then the other tests that start services: integration, slow), each unit whole and in collection
    order inside; the short tests fill the workers at the end.

    A worker starts a test only once it holds the next one, so every unit waits on its worker behind
    the one handed out before it: one long unit per worker, then one short unit per worker, then long
    and short alternate, so that no long unit waits behind another long one."""
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(groups.get(item) or item.nodeid, []).append(item)

    def cost(unit: list[pytest.Item]) -> tuple[float, bool]:
        return (
            max(_expected_seconds(i) for i in unit),
            any(i.get_closest_marker("integration") or i.get_closest_marker("slow") for i in unit),
        )

    longs = sorted((u for u in units.values() if cost(u) != (0, False)), key=cost, reverse=True)  # stable
    shorts = [u for u in units.values() if cost(u) == (0, False)]
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    order = longs[:workers] + shorts[:workers]
    longs, shorts = longs[workers:], shorts[workers:]
    while longs or shorts:
        order += longs[:1] + shorts[:1]
        longs, shorts = longs[1:], shorts[1:]
    items[:] = [item for unit in order for item in unit]


def _mark_group_in_nodeid(items: list[pytest.Item]) -> None:
    """pytest-xdist 3.8 tells the controller an item's group by appending ``@group`` to
    ``item._nodeid``, which pytest 9.2 no longer reads (node ids are structured, ``item._id``), so
    ``--dist loadgroup`` would silently send a group's tests to different workers
    (pytest-dev/pytest-xdist#1386). Append the suffix where it is missing; a no-op once xdist does."""
    from _pytest.nodeid import NodeId

    for item in items:
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)
            if not item.nodeid.endswith(suffix):
                raise pytest.UsageError(f"cannot mark {item.nodeid} with its xdist group {suffix}")
