"""Drift loop at library level: detection delay, false alarms, shortfall before/after recalibration.

For a trained multi-exit model (trained here and cached under the state dir, or read from an
outputs-contract directory) and each corruption at one severity:

* **false alarms**: 20 clean count-windows of ``--window`` test requests (drawn with replacement
  from the clean test split when it is smaller than 20 windows) against the validation
  reference, with the production monitor (:class:`monitoring.monitor.DriftMonitor`);
* **detection delay**: a stream of clean then corrupted requests; the monitor checks the last
  ``--window`` requests every ``--step`` requests (as the ``monitor`` flow does); the delay is the
  number of corrupted requests seen when the first alarm fires after the onset;
* **shortfall at δ**: two-fold cross-fitting over the corrupted test rows: up to ``--labels``
  labelled rows of one fold recalibrate the maps (:func:`pcee.recalibration.recalibrate`, gated
  on its own held-out part), the other fold measures achieved accuracy with the static and the
  recalibrated maps; averaged over the folds. ``floor`` = max(0, δ − final-exit accuracy) is the
  smallest shortfall any exit policy can reach on these rows.

Examples::

    uv run python benchmarks/drift_loop.py                       # digits, small-cnn, δ 0.9
    uv run python benchmarks/drift_loop.py --data imagefolder:../shared/data/cifar10 \\
        --preset cifar --train-size 10000 --epochs 8 --delta 0.7 --window 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from monitoring.monitor import DriftMonitor
from monitoring.reference import reference_from_logits
from pcee.data.corruptions import CORRUPTIONS, corrupt
from pcee.outputs import ExitOutputs

REPO = Path(__file__).resolve().parents[1]
from pcee.policies.pcee import PCEEPolicy  # noqa: E402
from pcee.recalibration import control_at_delta, recalibrate  # noqa: E402


def trained_outputs(args: argparse.Namespace) -> tuple[ExitOutputs, ExitOutputs, dict[str, ExitOutputs]]:
    """Validation, clean test and corrupted test outputs of a model trained (or cached) here."""
    import torch

    from pcee.data.datasets import load_dataset
    from pcee.models.flops import measure_exit_flops
    from pcee.models.registry import build_model
    from pcee.training.checkpoint import load_checkpoint, save_checkpoint
    from pcee.training.config import TrainConfig
    from pcee.training.evaluate import compute_outputs
    from pcee.training.trainer import seed_everything, train_model

    torch.set_num_threads(max(1, int(os.environ.get("PCEE_BENCH_THREADS", "2"))))
    splits = load_dataset(args.data, seed=args.seed, train_size=args.train_size, test_size=args.test_size)
    tag = f"{args.data.replace('/', '_').replace(':', '_')}-{args.model}-{args.preset}-{args.epochs}-{args.train_size}-{args.seed}"
    cache = Path(os.environ.get("PCEE_STATE_DIR", REPO / ".pcee")) / "bench" / "drift_loop" / tag
    if (cache / "model.json").exists():
        model = load_checkpoint(cache)
    else:
        seed_everything(args.seed)
        model = build_model(args.model, args.preset)
        t0 = time.time()
        train_model(model, splits, TrainConfig(regime="mixed", epochs=args.epochs, seed=args.seed), progress=False)
        print(
            f"trained {args.model} on {args.data} for {args.epochs} epochs in {time.time() - t0:.0f} s", file=sys.stderr
        )
        save_checkpoint(cache, model)
    model.eval()
    flops = measure_exit_flops(model, splits.input_shape)
    val = compute_outputs(model, splits.val, flops)
    test = compute_outputs(model, splits.test, flops)
    corrupted = {}
    for name in args.corruptions:
        x = corrupt(splits.test.x, name, args.severity, seed=args.seed)
        corrupted[name] = compute_outputs(model, type(splits.test)(x=x, y=splits.test.y), flops)
    return val, test, corrupted


def false_alarms(monitor: DriftMonitor, policy, test: ExitOutputs, window: int, n_windows: int, rng) -> int:
    replace = len(test) < window * n_windows
    order = rng.choice(len(test), size=window * n_windows, replace=replace)
    alarms = 0
    for w in range(n_windows):
        conf, exits = reference_from_logits(test.logits[order[w * window : (w + 1) * window]], policy)
        alarms += monitor.check(conf, exits).drifted
    return alarms


def detection_delay(
    monitor, policy, clean: ExitOutputs, shifted: ExitOutputs, window: int, step: int, rng
) -> int | None:
    pre = rng.choice(len(clean), size=window, replace=len(clean) < window)
    post = rng.permutation(len(shifted))
    logits = np.concatenate([clean.logits[pre], shifted.logits[post]])
    conf, exits = reference_from_logits(logits, policy)
    for end in range(window + step, len(logits) + 1, step):
        if monitor.check(conf[end - window : end], exits[end - window : end]).drifted:
            return end - window
    return None


def shortfalls(policy, shifted: ExitOutputs, delta: float, labels_cap: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(shifted))
    folds = np.array_split(order, 2)
    static, after, accepted, used = [], [], 0, []
    for k in range(2):
        fit_rows, eval_rows = folds[k][:labels_cap], folds[1 - k]
        result = recalibrate(policy, shifted.logits[fit_rows], shifted.labels[fit_rows], flops=shifted.flops, seed=seed)
        served = result.policy if result.improved else policy
        static.append(control_at_delta(policy, shifted.logits[eval_rows], shifted.labels[eval_rows], delta)[1])
        after.append(control_at_delta(served, shifted.logits[eval_rows], shifted.labels[eval_rows], delta)[1])
        accepted += result.improved
        used.append(len(fit_rows))
    final_acc = float((shifted.logits[:, -1].argmax(-1) == shifted.labels).mean())
    return {
        "static": float(np.mean(static)),
        "recal": float(np.mean(after)),
        "floor": max(0.0, delta - final_acc),
        "accepted": accepted,
        "labels": int(np.mean(used)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--preset", default=None, help="model preset (small-cnn: digits | cifar)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument(
        "--test-size",
        type=lambda v: float(v) if "." in v else int(v),
        default=None,
        help="test rows: a count, or a fraction of the test pool (e.g. 0.5)",
    )
    p.add_argument("--delta", type=float, default=0.9, help="served accuracy target δ")
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS)
    p.add_argument("--window", type=int, default=100, help="monitor window (requests)")
    p.add_argument("--step", type=int, default=25, help="requests between two monitor checks")
    p.add_argument("--labels", type=int, default=500, help="most labelled rows used to recalibrate")
    p.add_argument("--clean-windows", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    val, test, corrupted = trained_outputs(args)
    policy = PCEEPolicy(delta=args.delta).fit(val.logits, val.labels, val.flops)
    monitor = DriftMonitor(*reference_from_logits(val.logits, policy))
    rng = np.random.default_rng(args.seed)
    acc_clean, short_clean, _ = control_at_delta(policy, test.logits, test.labels, args.delta)
    fa = false_alarms(monitor, policy, test, args.window, args.clean_windows, rng)
    print(
        f"data={args.data} model={args.model} δ={args.delta} severity={args.severity} window={args.window} step={args.step}"
    )
    print(
        f"val n={len(val)}  test n={len(test)}  clean test accuracy at δ={acc_clean:.3f} (shortfall {short_clean:.3f})"
    )
    print(f"false alarms over {args.clean_windows} clean windows: {fa}")
    header = f"{'corruption':<16}{'final acc':>10}{'static':>9}{'recal':>9}{'floor':>8}{'labels':>8}{'gate ok':>8}{'delay':>8}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for name, shifted in corrupted.items():
        s = shortfalls(policy, shifted, args.delta, args.labels, args.seed)
        delay = detection_delay(monitor, policy, test, shifted, args.window, args.step, rng)
        final_acc = float((shifted.logits[:, -1].argmax(-1) == shifted.labels).mean())
        rows.append({"corruption": name, "final_accuracy": final_acc, "delay": delay, **s})
        print(
            f"{name:<16}{final_acc:>10.3f}{100 * s['static']:>8.1f}p{100 * s['recal']:>8.1f}p{100 * s['floor']:>7.1f}p"
            f"{s['labels']:>8d}{s['accepted']:>6d}/2{('never' if delay is None else str(delay)):>8}"
        )
    print("shortfall in points (p) at the served δ on held-out corrupted rows; delay in corrupted requests")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "false_alarms": fa, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
