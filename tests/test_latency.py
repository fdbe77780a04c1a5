"""Cost in time (issue 14, item 1): latency profiles measured per exit, stored in the bundle, and
operating points chosen with them (``cost=latency``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pcee.cli import main
from pcee.latency import LatencyProfile, cost_vector, measure_exit_latency
from pcee.models.registry import build_model
from pcee.operating_point import choose_operating_point
from pcee.outputs import ExitOutputs, write_outputs_dir
from tests.cli.outputs_helpers import synthetic


def test_measured_profile_is_cumulative_per_sample_and_round_trips():
    torch.manual_seed(0)
    model = build_model("small-cnn", "digits")
    # structure only: which batch size is cheaper per sample is a measurement (benchmarks/), not a test
    prof = measure_exit_latency(model, (1, 8, 8), batch_sizes=(1, 16), repeats=3, warmup=1)
    assert prof.batch_sizes == (1, 16) and prof.per_sample_s.shape == (2, model.num_exits)
    assert np.all(prof.per_sample_s > 0) and np.all(np.diff(prof.per_sample_s, axis=1) >= 0)
    assert np.array_equal(prof.cost(), prof.cost(16)) and np.array_equal(prof.cost(10), prof.cost(16))
    again = LatencyProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert np.array_equal(again.per_sample_s, prof.per_sample_s) and again.batch_sizes == prof.batch_sizes
    # the plain forward early exit is measured against, timed beside it at each batch size
    assert prof.plain_s is not None and prof.plain_s.shape == (2,) and np.all(prof.plain_s > 0)
    assert again.plain(16) == prof.plain(16)
    assert model.training  # left as it was found


def test_speedup_is_predicted_over_the_plain_forward():
    """plain_s / mean cost: answering at the last exit costs the runner more than a plain forward, and the
    prediction says so; a profile stored without a plain forward falls back to the last exit's cost."""
    prof = LatencyProfile(
        (8, 64), np.array([[2e-5, 5e-5, 1e-4], [1e-5, 4e-5, 8e-5]]), 1, 5, "x", plain_s=np.array([9e-5, 7e-5])
    )
    exits = np.array([0, 0, 2, 2])
    assert prof.speedup(prof.cost()[exits].mean()) == pytest.approx(7e-5 / 4.5e-5)  # the largest batch by default
    assert prof.speedup(prof.cost(8)[exits].mean(), batch_size=8) == pytest.approx(9e-5 / 6e-5)
    assert prof.speedup(prof.cost()[-1]) == pytest.approx(7e-5 / 8e-5)  # all at the last exit: slower than plain
    old = LatencyProfile.from_dict({k: v for k, v in prof.to_dict().items() if k != "plain_s"})
    assert old.plain() is None and old.speedup(4.5e-5) == pytest.approx(8e-5 / 4.5e-5)
    table = prof.markdown(flops=np.array([1.0, 2.0, 4.0]))
    assert "| plain forward (no early exit) | 0.0900 | 0.0700 | 0.875 | |" in table
    assert "+11.1 % at batch 8, +14.3 % at batch 64 over a plain forward" in table
    from pcee.latency import speedup_line

    assert speedup_line(prof, 3.5e-5).startswith("predicted speed-up over a plain forward (no early exit): 2.00x")
    assert "+14.3 % over a plain forward" in speedup_line(prof, 3.5e-5)
    assert speedup_line(old, 4e-5).startswith("predicted speed-up over answering at the last exit: 2.00x")
    assert "no plain forward" in speedup_line(old, 4e-5)
    with pytest.raises(ValueError, match="plain_s must be"):
        LatencyProfile((8, 64), prof.per_sample_s, 1, 5, "x", plain_s=np.array([1e-5]))
    with pytest.raises(ValueError, match="plain_s must be"):
        LatencyProfile((8, 64), prof.per_sample_s, 1, 5, "x", plain_s=np.array([1e-5, 0.0]))


def test_the_runner_profile_times_the_served_path_answering_at_each_exit():
    """method "runner" (what pcee profile stores) times, per exit l, the runner answering a whole batch at l
    through the same rule path a served library policy takes; "segments" times the segments alone."""
    from pcee.latency import _runner_calls

    torch.manual_seed(0)
    model = build_model("small-cnn", "digits").eval()
    x = torch.rand(20, 1, 8, 8)
    calls = _runner_calls(model, x, "entropy")
    assert len(calls) == model.num_exits
    for level, call in enumerate(calls):
        runner = call.runner
        assert len(call.compact) == level  # the survivors' state is copied at each exit before this one
        assert runner.policy.exit_rule().on_device("cpu") is not None  # a rule with a torch form, not asked
        assert runner.score == "entropy" and runner.batch_size == 20
        res = call()
        assert np.all(res.exit == level) and len(res) == 20
        assert np.all(np.isfinite(res.confidences[:, : level + 1])) and np.all(
            np.isnan(res.confidences[:, level + 1 :])
        )

    runner_prof = measure_exit_latency(model, (1, 8, 8), batch_sizes=(8,), repeats=3, warmup=1)
    segments = measure_exit_latency(model, (1, 8, 8), batch_sizes=(8,), repeats=3, warmup=1, method="segments")
    assert (runner_prof.method, segments.method) == ("runner", "segments")
    for prof in (runner_prof, segments):
        assert np.all(prof.per_sample_s > 0) and np.all(np.diff(prof.per_sample_s, axis=1) >= 0)
    assert LatencyProfile.from_dict(runner_prof.to_dict()).method == "runner"
    # a profile stored before "method" existed timed the segments alone, and says so when read back
    old = {k: v for k, v in segments.to_dict().items() if k != "method"}
    assert LatencyProfile.from_dict(old).method == "segments"
    with pytest.raises(ValueError, match="unknown method 'flops'"):
        measure_exit_latency(model, (1, 8, 8), batch_sizes=(1,), repeats=1, method="flops")
    with pytest.raises(ValueError, match="unknown confidence score"):
        measure_exit_latency(model, (1, 8, 8), batch_sizes=(1,), repeats=1, score="logit")
    with pytest.raises(ValueError, match="unknown latency profile method"):
        LatencyProfile((1,), np.array([[1e-4, 2e-4]]), 1, 1, "x", method="guess")
    assert model.training is False  # left as it was found (eval here)


@pytest.mark.parametrize(
    "values, match",
    [([[1e-3, 5e-4]], "cumulative"), ([[0.0, 1e-3]], "> 0"), ([[1e-3, float("nan")]], "finite"), ([1e-3], "shape")],
)
def test_bad_profiles_are_refused(values, match):
    with pytest.raises(ValueError, match=match):
        LatencyProfile((1,), np.asarray(values), 1, 1, "x")


def test_cost_vector_defaults_to_latency_where_a_profile_exists():
    flops = np.array([1e6, 2e6, 4e6])
    prof = LatencyProfile((1, 8), np.array([[1e-4, 3e-4, 4e-4], [2e-5, 7e-5, 9e-5]]), 2, 5, "x").to_dict()
    vec, name = cost_vector(flops, prof)
    assert name == "latency" and np.allclose(vec, [2e-5, 7e-5, 9e-5])
    assert cost_vector(flops, prof, "flops")[1] == "flops"
    assert cost_vector(flops, None)[1] == "flops"
    with pytest.raises(ValueError, match="needs a latency profile"):
        cost_vector(flops, None, "latency")
    with pytest.raises(ValueError, match="2 exits"):
        cost_vector(flops, LatencyProfile((1,), np.array([[1e-4, 2e-4]]), 1, 1, "x"))


def test_operating_point_counts_cost_in_the_given_unit():
    val = synthetic(1200, 0)
    # time where early exits are nearly as dear as the final one (FLOPs say 25% and 62.5%)
    latency = np.array([3e-4, 3.5e-4, 4e-4])
    by_flops = choose_operating_point("pcee", val, target_accuracy=0.8, mode="point")
    by_time = choose_operating_point("pcee", val.with_cost(latency), target_accuracy=0.8, mode="point", cost="latency")
    assert by_flops.value == by_time.value  # the accuracy target picks the same δ ...
    exits = by_time.policy.decide(val.logits)
    assert by_time.relative_cost is not None and by_flops.relative_cost is not None
    # ... but the promised saving is the one in time (calibrate rows only, so compare loosely)
    assert by_time.relative_cost > by_flops.relative_cost
    assert by_time.relative_cost == pytest.approx(float((latency[exits] / latency[-1]).mean()), abs=0.05)
    assert by_time.cost == "latency" and by_flops.cost == "flops"
    assert "relative cost on calibrate rows (latency)" in by_time.markdown()
    with pytest.raises(ValueError, match="unknown cost"):
        choose_operating_point("pcee", val, target_accuracy=0.8, mode="point", cost="watts")


def _four_exits(n: int, flops: np.ndarray) -> ExitOutputs:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    logits = rng.normal(0, 1, (n, 4, 10)).astype(np.float32)
    logits[np.arange(n), :, labels] += np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32)
    return ExitOutputs(logits, labels.astype(np.int64), np.asarray(flops, dtype=np.float64))


def test_profile_cli_stores_the_profile_and_calibrate_uses_it(tmp_path, capsys):
    from pcee.bundle import ModelBundle
    from pcee.models.flops import measure_exit_flops
    from pcee.policies.registry import build_policy

    torch.manual_seed(0)
    model = build_model("small-cnn", "digits").eval()
    flops = measure_exit_flops(model, (1, 8, 8))
    val = _four_exits(800, flops)
    policy = build_policy("pcee", delta=0.8).fit(val.logits, val.labels, flops)
    bundle = tmp_path / "bundle"
    ModelBundle(model, policy, flops, {"input_shape": [1, 8, 8]}).save(bundle)

    assert (
        main(
            [
                "profile",
                "--bundle",
                str(bundle),
                "--batch-sizes",
                "1,4",
                "--repeats",
                "2",
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ms/sample @ batch 4" in out and "FLOPs share" in out
    assert "runner method" in out
    assert "| plain forward (no early exit) |" in out and "over a plain forward" in out
    stored = json.loads((bundle / "meta.json").read_text())["latency_profile"]
    assert stored == json.loads((tmp_path / "p.json").read_text()) and stored["batch_sizes"] == [1, 4]
    assert stored["method"] == "runner" and len(stored["plain_s"]) == 2

    outputs = tmp_path / "outputs"
    write_outputs_dir(outputs, {"val": val, "test": val}, {"dataset": "synthetic"})
    cert = tmp_path / "c.operating_point.json"

    def calibrate(*extra: str) -> int:
        return main(
            ["calibrate", "--outputs", str(outputs), "--policy", "pcee", "--out", str(tmp_path / "c.json"), *extra]
        )

    point = ("--target", "0.8", "--mode", "point", "--latency-profile", str(bundle))
    capsys.readouterr()
    assert calibrate(*point) == 0
    chosen = json.loads(cert.read_text())
    assert chosen["cost"] == "latency"
    # the promised speed-up over serving without early exit: the profile's plain forward over the point's mean cost
    want = stored["plain_s"][-1] / chosen["mean_flops"]
    assert (
        f"predicted speed-up over a plain forward (no early exit): {want:.2f}x (point estimate"
        in capsys.readouterr().out
    )
    assert calibrate(*point, "--cost", "flops") == 0
    assert json.loads(cert.read_text())["cost"] == "flops"
    assert "predicted speed-up" not in capsys.readouterr().out
    assert calibrate("--delta", "0.8", "--cost", "latency") == 2
    assert "--cost" in capsys.readouterr().err
    assert main(["profile", "--bundle", str(tmp_path / "missing")]) == 2

    # the sweep counts relative cost in time too, and says so
    assert (
        main(
            [
                "sweep",
                "--outputs",
                str(outputs),
                "--policy",
                "pcee",
                "--latency-profile",
                str(bundle),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["cost"] == "latency" and metrics["cost_per_exit"] == stored["per_sample_s"][-1]
    assert metrics["flops"] == [float(f) for f in flops]
