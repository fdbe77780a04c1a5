"""Load and crash safety: 8 clients x 2,000 requests -> 0 errors and exactly 16,000 rows;
``kill -9`` under load -> every request answered 200 is in the store."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from pcee.traffic.loadgen import run_load

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: requests per client; the issue asks for 2,000 (16,000 in all). Lower it only on a starved machine.
PER_CLIENT = int(os.environ.get("PCEE_LOAD_TEST_PER_CLIENT", "2000"))


@pytest.mark.timeout(600)
def test_eight_clients_no_errors_and_one_row_per_request(server_factory, bundle_dir, digits_test):
    x, y = digits_test
    srv = server_factory("--bundle", str(bundle_dir), "--poll-interval", "0")
    n = 8 * PER_CLIENT
    t0 = time.perf_counter()
    res = asyncio.run(run_load(srv.url, x, y, n=n, concurrency=8, feedback_rate=0.0, keep_ids=True))
    took = time.perf_counter() - t0
    print(f"\n{n} requests in {took:.1f} s: {res.format()}")
    assert res.errors == 0, res.error_kinds
    assert res.ok == n
    store = srv.store()
    assert store.count_requests() == n  # exactly one row per answered request
    assert store.request_ids() == set(res.request_ids)
    store.dispose()


@pytest.mark.timeout(300)
def test_kill_9_under_load_loses_no_answered_request(server_factory, bundle_dir, digits_test):
    x, y = digits_test
    srv = server_factory("--bundle", str(bundle_dir), "--poll-interval", "0")
    box: dict = {}

    def load() -> None:
        box["res"] = asyncio.run(
            run_load(srv.url, x, y, n=100_000, concurrency=8, keep_ids=True, timeout_s=5, max_errors=20)
        )

    t = threading.Thread(target=load)
    t.start()
    deadline = time.monotonic() + 60
    store = srv.store()
    while store.count_requests() < 300 and time.monotonic() < deadline:  # well under load
        time.sleep(0.05)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    t.join(120)
    res = box["res"]
    assert res.ok >= 200 and res.errors > 0  # the load really was cut off mid-flight (rows can lead answers)
    answered = set(res.request_ids)
    logged = store.request_ids()
    missing = answered - logged
    assert not missing, f"{len(missing)} of {len(answered)} answered requests are not in the store"
    # rows committed whose answer never reached the client are allowed (answer lost in flight)
    assert len(logged) - len(answered) <= 64 * 8
    store.dispose()
