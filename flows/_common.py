"""Shared pieces of the pipeline flows: import path, run directories, report markdown, the gate step."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tasks` is a top-level package beside `flows`
    sys.path.insert(0, str(REPO))


def run_dir(kind: str) -> Path:
    """A fresh directory for this flow run's files (bundle, plots) under the state dir."""
    from prefect.runtime import flow_run

    state = Path(os.environ.get("PCEE_STATE_DIR", REPO / ".pcee")).resolve()
    path = state / "flow-runs" / f"{kind}-{flow_run.id or 'local'}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_target_accuracy() -> float:
    """The accuracy target of ``params.yaml`` (``calibrate.target_accuracy``) in the project, else 0.95."""
    import yaml

    from pcee.dvc_repo import project_dir

    path = project_dir() / "params.yaml"
    if not path.is_file():
        path = REPO / "params.yaml"
    try:
        return float(yaml.safe_load(path.read_text())["calibrate"]["target_accuracy"])
    except (OSError, KeyError, TypeError, ValueError):
        return 0.95


def sweep_markdown(sweeps: list[dict], max_rows: int = 12) -> str:
    """Each policy's chosen row, then the main policy's sweep thinned to ``max_rows`` rows."""
    lines = ["| policy | parameter | accuracy | mean FLOPs | relative cost | shortfall |", "|---|---|---|---|---|---|"]
    for s in sweeps:
        c = s["chosen"]
        lines.append(f"| {s['policy']} | {c['delta']:.4g} | {c['accuracy']:.4f} | {c['mean_flops']:,.0f} | {c['relative_cost']:.3f} | {c['shortfall']:.4f} |")
    main = sweeps[0]
    rows = main["rows"]
    step = max(1, len(rows) // max_rows)
    table = ["| δ | accuracy | mean FLOPs | relative cost | shortfall |", "|---|---|---|---|---|"]
    for r in rows[::step]:
        table.append(f"| {r['delta']:.3f} | {r['accuracy']:.4f} | {r['mean_flops']:,.0f} | {r['relative_cost']:.3f} | {r['shortfall']:.4f} |")
    return "### Chosen operating point per policy\n\n" + "\n".join(lines) + f"\n\n### Sweep of `{main['policy']}` (test)\n\n" + "\n".join(table)


def gate_and_promote(name: str, version: str, bundle_dir: str, eval_split, target: float) -> dict:
    """Evaluate challenger and champion on the same rows, apply the gate, move aliases."""
    from pcee.registry.gate import gate
    from tasks import registry as R

    champion = R.read_aliases(name)["champion"]
    champion = None if champion == version else champion
    ev_new = R.evaluate_bundle(bundle_dir, eval_split.x, eval_split.y, version)
    ev_old = None
    if champion is not None:
        old_dir = R.fetch_bundle(name, champion, str(Path(bundle_dir).parent / "champion"))
        ev_old = R.evaluate_bundle(old_dir, eval_split.x, eval_split.y, champion)
    decision = gate(ev_new, ev_old, target)
    R.tag_decision(name, version, decision.to_dict())
    aliases = R.promote(name, version) if decision.promote else R.read_aliases(name)
    return {"decision": decision, "aliases": aliases}


def operating_point_tags(chosen: dict, target: float, policy: str, data_md5: str, flow: str) -> dict[str, str]:
    """The registry tags every registering flow sets on a new version: data, code and the chosen δ."""
    from pcee.registry.tracking import git_commit

    return {"data_md5": data_md5, "git_commit": git_commit(REPO), "policy": policy, "delta": f"{chosen['delta']:.6g}",
            "target_accuracy": f"{target:.6g}", "test_accuracy": f"{chosen['accuracy']:.6g}",
            "test_relative_cost": f"{chosen['relative_cost']:.6g}", "flow": flow}


def operating_point_metrics(exit_metrics: dict, chosen: dict, validation: dict) -> dict[str, float]:
    """The run metrics every registering flow logs: per-exit metrics plus the chosen operating point."""
    return {**exit_metrics, "test_accuracy": chosen["accuracy"], "test_mean_flops": chosen["mean_flops"],
            "test_relative_cost": chosen["relative_cost"], "gx_expectations": len(validation["results"])}


def run_report(title: str, data_md5: str, policy: str, target: float, sweeps: list[dict], result: dict, run_id: str) -> str:
    """The markdown a registering flow publishes as its Prefect artifact and logs."""
    chosen, decision = sweeps[0]["chosen"], result["decision"]
    return (f"# {title}\n\ndata md5 `{data_md5}`, policy `{policy}`, target accuracy {target:.3f}, "
            f"**chosen δ = {chosen['delta']:.4g}**\n\n{sweep_markdown(sweeps)}\n\n{decision.markdown()}\n\n"
            f"aliases: {result['aliases']}; plots: MLflow run `{run_id}` artifacts `plots/`")
