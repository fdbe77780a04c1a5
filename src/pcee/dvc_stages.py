"""The research path as DVC stages (``dvc.yaml``): ``python -m pcee.dvc_stages <stage> ...``.

- ``prepare``: re-prepare the dataset from its source into a temporary dir and check that its
  md5 equals the tracked snapshot's (``data/``, versioned by ``data.dvc``): the snapshot is
  reproducible from code + params; writes the prepare metrics.
- ``calibrate``: fit the policy on the validation outputs at the δ chosen for the accuracy target;
  writes ``policy.json`` and per-exit validation metrics (accuracy, ECE, failure AUROC, FLOPs).
- ``sweep``: sweep each policy (fit on val, evaluate on test); writes ``sweep.csv`` (DVC plot),
  PNG plots and the chosen operating point per policy as metrics.

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


def _round(x: float) -> float | None:
    """6 significant digits (stable across platforms' last-bit noise); None where undefined."""
    x = float(x)
    return float(f"{x:.6g}") if np.isfinite(x) else None


def prepare(args) -> int:
    from pcee.data.datasets import load_dataset
    from pcee.data.prepared import save_prepared
    from pcee.dvc_repo import directory_md5

    snapshot = Path(args.snapshot)
    with tempfile.TemporaryDirectory() as tmp:
        splits = load_dataset(args.data, seed=args.seed)
        fresh = directory_md5(save_prepared(splits, Path(tmp) / "data"))
    tracked = directory_md5(snapshot)
    write_json_atomic(Path(args.out), {"md5_matches": fresh == tracked, "n_train": len(splits.train), "n_val": len(splits.val),
                                 "n_test": len(splits.test), "num_classes": int(splits.num_classes)})
    if fresh != tracked:
        print(f"prepare: {snapshot} (md5 {tracked}) is not what `pcee data prepare --data {args.data} --seed {args.seed}` "
              f"gives (md5 {fresh}); re-prepare it or update params.yaml", file=sys.stderr)
        return 1
    print(f"prepare: {snapshot} md5 {tracked} reproduced from {args.data} (seed {args.seed})")
    return 0


def _outputs(path: str):
    from pcee.outputs import read_outputs_dir

    splits, meta = read_outputs_dir(path)
    return splits["val"], splits["test"], meta


def calibrate(args) -> int:
    from pcee.metrics import per_exit_metrics
    from pcee.policies.registry import build_policy, get_policy_class
    from pcee.sweep import select_delta, sweep_policy

    val, test, _ = _outputs(args.outputs)
    chosen = select_delta(sweep_policy(args.policy, val, val), target_accuracy=args.target)  # δ chosen on val only
    policy = build_policy(args.policy, **{get_policy_class(args.policy).param_name: chosen["delta"]}).fit(val.logits, val.labels, val.flops)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "policy.json", policy.to_dict())
    metrics = {"policy": args.policy, "delta": _round(chosen["delta"]), "target_accuracy": args.target, "val_accuracy": _round(chosen["accuracy"]),
               "val_relative_cost": _round(chosen["relative_cost"])}
    for level, m in enumerate(per_exit_metrics(val.logits, val.labels)):
        for k, v in m.items():
            if k != "exit":
                metrics[f"exit{level + 1}_{k}"] = _round(v)
        metrics[f"exit{level + 1}_flops"] = _round(val.flops[level])
    write_json_atomic(Path(args.metrics), metrics)
    print(json.dumps(metrics, indent=1))
    return 0


def sweep(args) -> int:
    from pcee.policies.registry import policy_from_dict
    from pcee.registry.plots import write_pipeline_plots
    from pcee.sweep import select_delta, sweep_policy

    val, test, _ = _outputs(args.outputs)
    sweeps, metrics = [], {}
    for name in args.policies:
        result = sweep_policy(name, val, test)
        chosen = select_delta(result, target_accuracy=args.target)
        sweeps.append({"policy": name, "rows": result.to_rows(), "chosen": chosen})
        metrics[name] = {"delta": _round(chosen["delta"]), "accuracy": _round(chosen["accuracy"]), "relative_cost": _round(chosen["relative_cost"]),
                         "shortfall": _round(chosen["shortfall"]), "met": bool(chosen["met"]),
                         "max_shortfall": _round(max(r["shortfall"] for r in result.to_rows() if r["achievable"]) if any(r["achievable"] for r in result.to_rows()) else 0.0)}
    policy = policy_from_dict(json.loads(Path(args.policy_json).read_text()))
    write_pipeline_plots(sweeps, policy, val, test, Path(args.out))
    write_json_atomic(Path(args.metrics), metrics)
    print(json.dumps(metrics, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcee.dvc_stages", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot", default="data")
    p.add_argument("--out", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--outputs", required=True)
    c.add_argument("--policy", default="pcee")
    c.add_argument("--target", type=float, required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--metrics", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--outputs", required=True)
    s.add_argument("--policies", nargs="+", default=["pcee", "pcee-ws", "threshold"])
    s.add_argument("--policy-json", required=True)
    s.add_argument("--target", type=float, required=True)
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
