"""The research path as DVC stages (``dvc.yaml``): ``python -m pcee.dvc_stages <stage> ...``.

- ``prepare``: re-prepare the dataset from its source into a temporary dir and check that its
  md5 equals the tracked snapshot's (``data/``, versioned by ``data.dvc``): the snapshot is
  reproducible from code + params; writes the prepare metrics.
- ``calibrate``: choose the operating point with :func:`pcee.operating_point.choose_operating_point`
  on the validation outputs only (fit part: the maps; calibrate part: δ and its certificate);
  writes ``policy.json``, ``operating_point.json`` and metrics: the certificate, per-exit
  validation metrics (accuracy, ECE, failure AUROC, FLOPs) and ``test_accuracy_check`` (test
  accuracy as a check, not used for choosing).
- ``sweep``: sweep each policy (fit on val, evaluate on test) for the curves (``sweep.csv``, a DVC
  plot, and PNG plots); each policy's operating point is chosen the same way as ``calibrate``, on
  validation only, and written as metrics with its test accuracy as a check.

Every output is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from pcee.atomic import write_json_atomic
from pcee.data.datasets import load_dataset
from pcee.data.prepared import save_prepared
from pcee.dvc_repo import directory_md5
from pcee.metrics import per_exit_metrics_flat
from pcee.operating_point import (
    BOUNDS,
    DEFAULT_BOUND,
    DEFAULT_CALIBRATE_FRACTION,
    DEFAULT_RISK,
    MODES,
    choose_operating_point,
)
from pcee.outputs import read_outputs_dir
from pcee.policies.registry import policy_from_dict
from pcee.registry.plots import write_pipeline_plots
from pcee.sweep import sweep_policy


def _round(x: float | None) -> float | None:
    """6 significant digits (stable across platforms' last-bit noise); None where undefined."""
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.6g}") if np.isfinite(x) else None


def prepare(args) -> int:

    snapshot = Path(args.snapshot)
    with tempfile.TemporaryDirectory() as tmp:
        splits = load_dataset(args.data, seed=args.seed)
        fresh = directory_md5(save_prepared(splits, Path(tmp) / "data"))
    tracked = directory_md5(snapshot)
    write_json_atomic(
        Path(args.out),
        {
            "md5_matches": fresh == tracked,
            "n_train": len(splits.train),
            "n_val": len(splits.val),
            "n_test": len(splits.test),
            "num_classes": int(splits.num_classes),
        },
    )
    if fresh != tracked:
        print(
            f"prepare: {snapshot} (md5 {tracked}) is not what `pcee data prepare --data {args.data} --seed {args.seed}` "
            f"gives (md5 {fresh}); re-prepare it or update params.yaml",
            file=sys.stderr,
        )
        return 1
    print(f"prepare: {snapshot} md5 {tracked} reproduced from {args.data} (seed {args.seed})")
    return 0


def _outputs(path: str):

    splits, meta = read_outputs_dir(path)
    return splits["val"], splits["test"], meta


def _choose(name: str, val, test, args, require_certified: bool):

    # the choice sees val only; test is evaluated afterwards by the library, as a check
    return choose_operating_point(
        name,
        val,
        target_accuracy=args.target,
        risk=args.risk,
        bound=args.bound,
        mode=args.mode,
        calibrate_fraction=args.calibrate_fraction,
        seed=args.seed,
        test=test,
        require_certified=require_certified,
    )


def _certificate(op) -> dict:
    """The operating point as flat metrics; test figures under ``*_check`` keys."""
    return {
        "policy": op.policy_name,
        "mode": op.mode,
        "target_accuracy": op.target_accuracy,
        "risk": op.risk,
        "bound": op.bound,
        "calibrate_fraction": op.calibrate_fraction,
        "seed": op.seed,
        "param_name": op.param_name,
        "delta": _round(op.value),
        "served_threshold": _round(op.served_threshold),
        "certified": bool(op.certified),
        "n_fit": op.n_fit,
        "n_calibrate": op.n_calibrate,
        "calibrate_accuracy": _round(op.calibrate_accuracy),
        "accuracy_lower_bound": _round(op.accuracy_lower_bound),
        "calibrate_relative_cost": _round(op.relative_cost),
        "best_certifiable_accuracy": _round(op.best_certifiable_accuracy),
        "test_accuracy_check": _round(op.test_accuracy),
        "test_relative_cost_check": _round(op.test_relative_cost),
    }


def calibrate(args) -> int:

    val, test, _ = _outputs(args.outputs)
    op = _choose(args.policy, val, test, args, require_certified=args.mode == "certified")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "policy.json", op.policy.to_dict())
    write_json_atomic(out / "operating_point.json", op.to_dict())
    metrics = _certificate(op)
    metrics.update({k: _round(v) for k, v in per_exit_metrics_flat(val.logits, val.labels, val.flops).items()})
    write_json_atomic(Path(args.metrics), metrics)
    print(op.markdown())
    return 0


def sweep(args) -> int:

    val, test, _ = _outputs(args.outputs)
    sweeps, metrics = [], {}
    for name in args.policies:
        result = sweep_policy(name, val, test)  # the curve, on test: reporting only
        rows = result.to_rows()
        op = _choose(name, val, test, args, require_certified=False)
        sweeps.append({"policy": name, "rows": rows, "chosen": op.to_dict()})
        entry = {
            k: v
            for k, v in _certificate(op).items()
            if k not in ("policy", "mode", "target_accuracy", "risk", "bound", "calibrate_fraction", "seed")
        }
        entry["max_shortfall_test_curve"] = _round(max((r["shortfall"] for r in rows if r["achievable"]), default=0.0))
        metrics[name] = entry
    metrics = {
        "settings": {
            "target_accuracy": args.target,
            "risk": args.risk,
            "bound": args.bound,
            "mode": args.mode,
            "calibrate_fraction": args.calibrate_fraction,
            "seed": args.seed,
            "chosen_on": "validation only (calibrate part)",
            "test_figures": "check, not used for choosing",
        },
        **metrics,
    }
    policy = policy_from_dict(json.loads(Path(args.policy_json).read_text()))
    write_pipeline_plots(sweeps, policy, val, test, Path(args.out))
    write_json_atomic(Path(args.metrics), metrics)
    print(json.dumps(metrics, indent=1))
    return 0


def _choice_arguments(p) -> None:

    p.add_argument("--target", type=float, required=True, help="target accuracy α in (0, 1)")
    p.add_argument("--risk", type=float, default=DEFAULT_RISK, help="risk η in (0, 1)")
    p.add_argument("--bound", choices=BOUNDS, default=DEFAULT_BOUND)
    p.add_argument("--mode", choices=[m for m in MODES if m != "budget"], default="certified")
    p.add_argument("--calibrate-fraction", type=float, default=DEFAULT_CALIBRATE_FRACTION)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcee.dvc_stages", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot", default="data")
    p.add_argument("--out", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--outputs", required=True)
    c.add_argument("--policy", default="pcee")
    _choice_arguments(c)
    c.add_argument("--out", required=True)
    c.add_argument("--metrics", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--outputs", required=True)
    s.add_argument("--policies", nargs="+", default=["pcee", "pcee-ws", "threshold"])
    s.add_argument("--policy-json", required=True)
    _choice_arguments(s)
    s.add_argument("--out", required=True)
    s.add_argument("--metrics", required=True)
    args = parser.parse_args(argv)
    try:
        return {"prepare": prepare, "calibrate": calibrate, "sweep": sweep}[args.stage](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"pcee.dvc_stages {args.stage}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
