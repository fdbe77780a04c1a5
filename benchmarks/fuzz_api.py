#!/usr/bin/env python
"""The long API fuzzing run: schemathesis against a real ``pcee serve`` (digits small-cnn bundle, a
bearer token set), several seeds, many more examples than the suite's run (tests/serving/test_fuzz.py).

    uv run python benchmarks/fuzz_api.py [--max-examples 3000] [--seeds 1 2 3] [--workers 4]

Checks: no server error, documented status codes and content types, responses matching their schema,
and /feedback refusing requests without the token. Prints one row per seed (requests generated,
failures, errors, seconds, requests per second) and the medians; a failing seed prints schemathesis's
own account of the failure, with a curl line to reproduce it, and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serving_load import build_default_bundle, free_port, serve_command

TOKEN = "fuzz-benchmark-token-0123456789"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "ignored_auth",  # /feedback refuses requests without the token
)


def start(bundle: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PCEE_STATE_DIR": str(tmp / "state"), "PCEE_SERVE_TOKEN": TOKEN}
    cmd = [*serve_command(bundle, port, f"sqlite:///{tmp / 'traffic.db'}"), "--max-wait-ms", "0"]
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 (kept open for the server's life)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become healthy in 180 s")


def run_schemathesis(
    url: str,
    out: Path,
    max_examples: int,
    seed: int,
    workers: int = 4,
    token: str = TOKEN,
    timeout: float | None = None,
) -> tuple[dict, str]:
    """``schemathesis run`` against ``url``'s schema with ``CHECKS``, authenticated with ``token``; returns
    (its JSON run report, its console output). The suite's run (tests/serving/test_fuzz.py) uses it too."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        *("run", f"{url}/openapi.json", "--checks", ",".join(CHECKS), "-H", f"Authorization: Bearer {token}"),
        *("--max-examples", str(max_examples), "--seed", str(seed), "--workers", str(workers)),
        # (adding pytest here made the runs generate fewer requests; the console has a curl per failure)
        *("--generation-database", "none", "--report", "json", "--report-dir", str(out), "--no-color"),
    ]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=timeout)
    reports = sorted(out.glob("json-*.json"))
    if not reports:
        raise RuntimeError(
            f"schemathesis wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        )
    return json.loads(reports[-1].read_text()), proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=3000, help="examples per operation and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pcee-fuzz-") as d:
        tmp = Path(d)
        proc, url = start(build_default_bundle(tmp / "bundle"), tmp)
        rows, failed = [], False
        try:
            for seed in args.seeds:
                report, console = run_schemathesis(url, tmp / f"seed-{seed}", args.max_examples, seed, args.workers)
                cases = report["test_cases"]
                rows.append(
                    (seed, cases["generated"], cases["with_failures"], cases["errored"], report["running_time"])
                )
                if cases["with_failures"] or cases["errored"]:
                    failed = True
                    print(console[-6000:])
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    print(
        f"\nschemathesis against pcee serve (token set), checks: {', '.join(CHECKS)}; max examples {args.max_examples}/operation\n"
    )
    print("| seed | requests | with failures | errored | seconds | requests/s |")
    print("|---|---|---|---|---|---|")
    for seed, n, bad, err, secs in rows:
        print(f"| {seed} | {n} | {bad} | {err} | {secs:.1f} | {n / secs:.1f} |")
    n_med = statistics.median(r[1] for r in rows)
    s_med = statistics.median(r[4] for r in rows)
    print(f"| median | {n_med:g} | | | {s_med:.1f} | {statistics.median(r[1] / r[4] for r in rows):.1f} |")
    print(
        f"\ntotal: {sum(r[1] for r in rows)} requests, {sum(r[2] for r in rows)} with failures, {sum(r[3] for r in rows)} errored"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
