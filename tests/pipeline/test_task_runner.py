"""The sweep fan-out runs on the task runner chosen by setting: thread pool (default) or Dask
(prefect-dask, here a real local Dask cluster), with identical results."""

from __future__ import annotations

import numpy as np
import pytest

from pcee.params import OperatingPointParams

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def outputs(seed: int):
    from pcee.outputs import ExitOutputs

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 400)
    logits = rng.normal(size=(400, 3, 5)).astype(np.float32)
    logits[np.arange(400), :, labels] += np.array([0.5, 1.5, 3.0], dtype=np.float32)  # later exits better
    return ExitOutputs(logits, labels.astype(np.int64), np.array([1.0, 2.0, 3.0]))


def test_unknown_runner_is_refused(monkeypatch):
    from tasks.runner import make_task_runner

    monkeypatch.setenv("PCEE_TASK_RUNNER", "ray")
    with pytest.raises(ValueError, match="PCEE_TASK_RUNNER='ray'.*thread.*dask"):
        make_task_runner()


@pytest.mark.parametrize("kind", ["thread", "dask"])
def test_fan_out_matches_library(kind, stack, monkeypatch):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pcee.operating_point import choose_operating_point, split_fit_calibrate
    from pcee.sweep import sweep_policy
    from tasks import calibrate as C
    from tasks.runner import make_task_runner

    monkeypatch.setenv("PCEE_TASK_RUNNER", kind)
    monkeypatch.setenv("PCEE_DASK_PROCESSES", "false")  # a real local Dask cluster, worker threads (2 cores here)
    monkeypatch.setenv("PCEE_DASK_WORKERS", "2")
    runner = make_task_runner()
    assert type(runner).__name__ == {"thread": "ThreadPoolTaskRunner", "dask": "DaskTaskRunner"}[kind]
    val, test = outputs(0), outputs(1)

    @flow(name=f"fanout-{kind}", task_runner=runner)
    def fanout() -> list[dict]:
        settings = OperatingPointParams(target_accuracy=0.5, risk=0.1, bound="clopper-pearson", mode="certified")
        futures = [C.operating_point.submit(p, val, test, settings) for p in ("pcee", "threshold")]
        return [f.result() for f in futures]

    with temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        got = fanout()
    for res in got:
        fit_idx, _ = split_fit_calibrate(val.labels, 0.5, 0)
        assert res["rows"] == sweep_policy(res["policy"], val.subset(fit_idx), test).to_rows()
        want = choose_operating_point(res["policy"], val, target_accuracy=0.5, test=test)
        assert res["op"].to_dict() == want.to_dict() and res["op"].certified and res["op"].accuracy_lower_bound >= 0.5
