"""The runner's device path (decide="torch"), run on CPU: host syncs per window, the profitability check
of splits (a batch that goes on together keeps the answers of the exits the policy chose), CUDA-graph
bucketing (eager replays on CPU), and the device helpers. The same code runs on CUDA; the test that
needs CUDA is skipped where there is none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcee.calibration.scores import confidence
from pcee.inference.device import kept_positions, resolve_device
from pcee.inference.graphs import GraphedSegments, buckets
from pcee.inference.runner import EarlyExitRunner
from pcee.inference.splits import SplitCheck
from pcee.latency import LatencyProfile
from pcee.models.registry import build_model
from pcee.policies.registry import build_policy
from tests.inference.exactness import LogitsModel, assert_answers, reference_columns, spy_rows, tie_logits

torch.set_num_threads(1)


def profile(kind: str, num_exits: int, device: str = "cpu") -> LatencyProfile:
    """A profile whose batch time grows with the rows ("linear", a CPU) or does not ("flat", a GPU
    below its fill); exit l costs l + 1 units either way."""
    sizes = (1, 16, 64, 256)
    unit = np.arange(1.0, num_exits + 1)
    per_sample = [unit * 1e-4 if kind == "linear" else unit * 1e-2 / b for b in sizes]
    return LatencyProfile(sizes, np.array(per_sample), 1, 1, "test", device=device)


def threshold_at(logits: np.ndarray, quantile: float, flops: np.ndarray):
    return build_policy("threshold", tau=float(np.quantile(confidence(logits[:, 0]), quantile))).fit(
        logits, None, flops
    )


def test_one_sync_per_exit_of_a_window_and_one_at_its_end():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((512, 4, 10)) * rng.choice([0.5, 3.0], size=(512, 1, 1))).astype(np.float32)
    flops = np.array([1.0, 2.0, 3.0, 4.0])
    policy = build_policy("threshold", tau=0.6).fit(z, None, flops)
    ref = reference_columns(policy, z, "max_prob")
    for regroup in (4, 1):
        runner = EarlyExitRunner(LogitsModel(4), policy, flops, batch_size=64, regroup=regroup, decide="torch")
        assert_answers(runner.run(z), ref, flops)
        assert runner._device_path.decided_on_host == 0  # no score near the threshold: nothing left unsure
        # per window: one count read after each non-final exit it reaches, one transfer at its end
        width = 64 * regroup
        reached = [min(3, int(ref["exit"][s : s + width].max()) + 1) for s in range(0, 512, width)]
        assert runner.device_syncs == sum(reached) + len(reached)
        if regroup == 4:
            assert runner.device_syncs <= 8  # a window of 4 >= L batches: at most once per batch
        else:
            assert runner.device_syncs > 8  # a lone batch syncs at each exit it reaches


def test_a_split_that_does_not_pay_keeps_the_batch_together_with_the_same_answers(monkeypatch):
    """Flat profile (a GPU below its fill): the thinned batches go on whole, the samples that left riding
    along; a batch nobody needs stops. Linear profile: the survivors are compacted. Same answers."""
    torch.manual_seed(0)
    model = build_model("small-cnn", widths=(8, 8, 16), downsample=(False, True, False)).eval()
    with torch.no_grad():
        for p in model.exit_heads.parameters():
            p.mul_(30.0)
    x = np.random.default_rng(1).random((150, 1, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        full = torch.stack(model(torch.as_tensor(x[:64])), 1).numpy()
        full = np.concatenate(
            [full, *(torch.stack(model(torch.as_tensor(x[s : s + 64])), 1).numpy() for s in (64, 128))]
        )
    flops = np.arange(1.0, model.num_exits + 1)
    policy = threshold_at(full, 0.5, flops)
    ref = reference_columns(policy, full, "max_prob")
    seen = spy_rows(monkeypatch, model)
    calls = {}
    for kind in ("flat", "linear"):
        seen.clear()
        runner = EarlyExitRunner(
            model, policy, flops, batch_size=64, regroup=1, decide="torch", profile=profile(kind, model.num_exits)
        )
        assert_answers(runner.run(x), ref, flops)
        calls[kind] = list(seen)
    sizes, starts = [64, 64, 22], [0, 64, 128]
    # every segment on a whole batch, as long as one of its samples is undecided
    want = [
        (k, n)
        for n, s in zip(sizes, starts, strict=True)
        for k in range(model.num_exits)
        if (ref["exit"][s : s + n] >= k).any()
    ]
    assert calls["flat"] == want
    assert any(len(np.unique(ref["exit"][s : s + n])) > 1 for n, s in zip(sizes, starts, strict=True))  # riders
    assert any(n not in sizes for _, n in calls["linear"])  # compacted survivors
    assert sum(n for _, n in calls["linear"]) < sum(n for _, n in calls["flat"])


def test_split_check_reads_the_profile_of_the_device():
    flat, linear = SplitCheck(profile("flat", 3)), SplitCheck(profile("linear", 3))
    assert not flat.pays(0, 256, 128) and linear.pays(0, 256, 128)
    assert flat.pays(0, 256, 0) and linear.pays(0, 256, 0)  # nobody goes on: stop
    assert not linear.pays(0, 256, 250)  # under MIN_GAIN of the rest
    assert SplitCheck(None).pays(1, 64, 63)  # without a profile every split is made
    assert linear.rest_s(0, 512) == pytest.approx(2 * linear.rest_s(0, 256))  # per sample beyond the largest size
    policy = build_policy("threshold").fit(np.zeros((2, 2, 3)))
    for where, kept in (("cpu", True), ("cuda:0 NVIDIA H200", False)):  # a GPU's profile says nothing about a CPU
        runner = EarlyExitRunner(LogitsModel(2), policy, np.ones(2), decide="torch", profile=profile("flat", 2, where))
        assert (runner._device_path.splits.profile is not None) == kept
    with pytest.raises(ValueError, match="min_gain"):
        SplitCheck(None, min_gain=1.0)


def test_graphs_run_every_segment_at_a_bucket_and_capture_each_once(monkeypatch):
    """CUDA graphs per (segment, bucket), as eager replays on CPU: the logits model is row-independent, so
    the answers are those of the run without graphs bit for bit."""
    rng = np.random.default_rng(2)
    z, flops = tie_logits(rng, 300, 3, 5), np.array([1.0, 2.0, 3.0])
    policy = threshold_at(z, 0.4, flops)
    ref = reference_columns(policy, z, "max_prob")
    model = LogitsModel(3)
    seen = spy_rows(monkeypatch, model)
    runner = EarlyExitRunner(model, policy, flops, batch_size=100, decide="torch", graphs=True)
    assert not runner.bit_identical
    graphed = runner._segments[0].func  # type: ignore[attr-defined]
    assert_answers(runner.run(z), ref, flops)
    captured = dict(graphed.graphs)
    assert len({n for _, n in captured}) >= 2  # several buckets
    assert_answers(runner.run(z), ref, flops)
    assert graphed.graphs == captured  # the second run replays the graphs the first captured
    assert {n for _, n in seen} <= set(buckets(100)) and buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    with pytest.raises(ValueError, match="choose one"):
        EarlyExitRunner(model, policy, flops, graphs=True, compile=True)


def test_a_segment_that_cannot_be_captured_runs_eagerly(caplog):
    def segment(state):
        return state + 1, state.sum(1)

    def refuse(fn, static_in):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed = GraphedSegments([segment], 8, refuse)
    x = torch.arange(16.0).reshape(4, 4)
    for _ in range(2):
        state, z = graphed(0, x)
        assert torch.equal(state, x + 1) and torch.equal(z, x.sum(1))
    assert graphed.eager == {(0, 4)} and not graphed.graphs and "runs eagerly" in caplog.text


def test_kept_positions_and_devices():
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 100):
        go = torch.as_tensor(rng.random(n) < 0.4)
        want = go.nonzero().squeeze(1)
        assert torch.equal(kept_positions(go, int(want.numel())), want)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the CPU tests above run the same logic)"
)
def test_cuda_device_path_answers_what_the_rule_says_on_its_own_logits():
    """On CUDA every exit is the policy's decision on the scores of the logits the runner computed (the
    kernels a GPU library picks may depend on the row count, so the full forward's logits are only close)."""
    from pcee.policies.estimator import first_passing_exit

    torch.manual_seed(0)
    model = build_model("small-cnn", widths=(8, 8, 16), downsample=(False, True, False)).eval()
    x = np.random.default_rng(0).random((700, 1, 8, 8), dtype=np.float32)
    flops = np.arange(1.0, model.num_exits + 1)
    with torch.inference_mode():
        full = torch.stack(model(torch.as_tensor(x)), 1).numpy()
    policy = threshold_at(full, 0.5, flops)
    for graphs in (False, True):
        runner = EarlyExitRunner(model, policy, flops, batch_size=128, device="cuda", graphs=graphs)
        res = runner.run(x)
        passes = np.nan_to_num(res.confidences[:, :-1], nan=-1.0) >= policy.tau
        np.testing.assert_array_equal(res.exit, first_passing_exit(passes))
        np.testing.assert_allclose(res.logits, full[np.arange(len(x)), res.exit], rtol=1e-2, atol=1e-2)
        assert len(np.unique(res.exit)) >= 2
        assert runner.device_syncs <= 2 * model.num_exits  # two windows of at most four batches
