"""Smoke test of benchmarks/serve_vs_mlflow.py: ``--quick`` end to end (a real ``mlflow models serve``
and a real pcee service on one registered champion; SQLite tracking URI to save the tracking
server's start-up), plus the process-group clean-up the script relies on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.benchmarks.bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "serve_vs_mlflow.py"


def _load():
    return load_script(SCRIPT, "serve_vs_mlflow")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_both_servers_answer_identically_and_report_is_complete(tmp_path, capsys):
    svm = _load()
    argv = ["--quick", "--tracking", "sqlite", "--breakdown-iters", "5", "--report-dir", str(tmp_path)]
    assert svm.main(argv) == 0  # 1 would mean the two servers answered differently
    printed = capsys.readouterr().out

    md = (tmp_path / "serve_vs_mlflow.md").read_text()
    assert md.strip() in printed  # what is printed is the report
    assert "uv run --locked python benchmarks/serve_vs_mlflow.py --quick" in md.splitlines()[2]
    assert "| server | concurrency | p50 ms | p99 ms | req/s | errors |" in md
    assert "| concurrency | req/s pcee/mlflow | p50 pcee/mlflow | client ceiling req/s |" in md
    for server in ("mlflow", "pcee"):
        for conc in (1, 8):
            assert f"\n| {server} | {conc} |" in md, (server, conc)
    goal_lines = [line for line in md.splitlines() if "× mlflow's" in line]
    assert len(goal_lines) == 2 and all(line.startswith(("- PASS", "- FAIL")) for line in goal_lines)

    data = json.loads((tmp_path / "serve_vs_mlflow.json").read_text())
    assert data["scale"] == "quick" and data["all_identical"] is True
    assert data["machine"]["cpu_count"] == os.cpu_count() and data["concurrency"] == [1, 8] and data["reps"] == 1
    assert "--quick" in data["command"] and data["client"] == "aiohttp"
    (res,) = data["models"]
    assert res["model"] == "digits" and res["input_shape"] == [1, 8, 8]
    ident = res["identity"]
    assert res["identical"] is True and ident["identical"] == ident["samples"] == res["fixed_inputs"] > 0
    assert ident["mismatch_count"] == 0 and ident["mismatches"] == []
    assert res["load_prediction_mismatches"] == {"mlflow": 0, "pcee": 0}
    assert {(c["server"], c["concurrency"]) for c in res["cells"]} == {
        (s, c) for s in ("mlflow", "pcee") for c in (1, 8)
    }
    for cell in res["cells"]:
        assert cell["errors"] == 0, cell["error_kinds"]
        for key in ("p50_ms", "p99_ms", "req_per_s"):
            assert _finite(cell[key]) and cell[key] > 0, (cell["server"], cell["concurrency"], key, cell[key])
        assert cell["p99_ms"] >= cell["p50_ms"]
        assert len(cell["reps"]) == 1
    assert [r["concurrency"] for r in res["ratios"]] == [1, 8]
    for r in res["ratios"]:
        assert _finite(r["rps_ratio"]) and r["rps_ratio"] > 0 and _finite(r["p50_ratio"]) and r["p50_ratio"] > 0
        assert _finite(r["client_ceiling_rps"]) and r["client_ceiling_rps"] > 0 and isinstance(r["client_bound"], bool)
        side = r["pcee_server_side"]
        assert _finite(side["mean_batch"]) and side["mean_batch"] >= 1.0
        assert _finite(side["batcher_ms"]) and _finite(side["commit_ms"])  # logging is on by default
    b = res["breakdown"]
    for key in ("invocations_total_ms", "pyfunc_predict_ms", "runner_ms_mlflow_threads", "runner_ms_1_thread"):
        assert _finite(b[key]) and b[key] > 0, (key, b)
    goals = data["goals"]
    assert [(g["metric"], g["concurrency"]) for g in goals] == [("rps_ratio", 8), ("p50_ratio", 1)]
    for g in goals:
        assert _finite(g["measured"]) and isinstance(g["met"], bool) and isinstance(g["client_bound"], bool)
        assert g["quick"] is True and g["reps"] == 1 and g["reps_met"] == int(g["met"])

    # --render rebuilds the same report from the JSON without measuring anything
    again = tmp_path / "again"
    assert svm.main(["--render", str(tmp_path / "serve_vs_mlflow.json"), "--report-dir", str(again)]) == 0
    assert (again / "serve_vs_mlflow.md").read_text() == md


def test_stop_ends_the_whole_process_group(tmp_path):
    """``mlflow models serve`` runs uvicorn as a child: stopping the server must stop that child too."""
    svm = _load()
    procs = svm.Processes(tmp_path, dict(os.environ))
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)"
    )
    proc = procs.start("parent", [sys.executable, "-c", code], "http://127.0.0.1:9")
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _alive(child)
    procs.stop_all()
    assert proc.popen.poll() is not None and procs.procs == []
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_both_clients_count_answers_and_errors_alike(tmp_path, client):
    """``--client``: either load generator sends the same bytes to the trivial server and counts its
    answers; a closed port is counted as errors, not raised."""
    import asyncio

    svm = _load()
    procs = svm.Processes(tmp_path, dict(os.environ))
    port = svm.free_port()
    echo = procs.start("echo", [sys.executable, "-c", svm.ECHO_SERVER, str(port)], f"http://127.0.0.1:{port}")
    try:
        procs.wait_healthy([echo], timeout=30)
        bodies = [b'{"inputs": [[[0.5]]]}', b'{"inputs": [[[0.25]]]}']
        cell = asyncio.run(
            svm.run_cell(svm.Server("echo", echo.url, "/predict", "results"), bodies, 7, 3, client=client)
        )
        assert (cell.ok, cell.errors, len(cell.latencies_s)) == (7, 0, 7)
        assert sorted(cell.predictions) == sorted([(i % 2, 0) for i in range(7)])
        assert cell.rps > 0
    finally:
        procs.stop_all()
    closed = svm.Server("gone", f"http://127.0.0.1:{svm.free_port()}", "/predict", "results")
    cell = asyncio.run(svm.run_cell(closed, [b"{}"], 4, 2, client=client))
    assert (cell.ok, cell.errors) == (0, 4) and sum(cell.error_kinds.values()) == 4


def test_bad_flags_are_refused():
    svm = _load()
    with pytest.raises(SystemExit):
        svm.main(["--reps", "0"])
    with pytest.raises(SystemExit):
        svm.main(["--models", "imagenet"])
    with pytest.raises(subprocess.CalledProcessError):  # the same through the command line
        subprocess.run([sys.executable, str(SCRIPT), "--concurrency", "0"], check=True, capture_output=True)
