"""Shared pieces of the pipeline flows: run directories, report markdown, the gate step."""

from __future__ import annotations

from pathlib import Path

from prefect.types.entrypoint import EntrypointType

from pcee.dvc_repo import project_dir
from pcee.operating_point import CHECK_LABEL, split_fit_calibrate
from pcee.params import OperatingPointParams, load_params
from pcee.registry.gate import gate
from pcee.registry.tracking import git_commit
from pcee.settings import Settings
from tasks import calibrate as C
from tasks import registry as R
from tasks.report import publish_report

REPO = Path(__file__).resolve().parents[1]  # the checkout: its params.yaml and git commit
#: every deployment loads its flow as ``flows.<name>``, not as a script module named ``<name>``: what
#: Prefect pickles for a Dask scheduler and its workers (the flow in the run's context) then names a
#: module they can import
MODULE_PATH = EntrypointType.MODULE_PATH


def run_dir(kind: str) -> Path:
    """A fresh directory for this flow run's files (bundle, plots) under the state dir."""
    from prefect.runtime import flow_run

    path = Settings().state_dir / "flow-runs" / f"{kind}-{flow_run.id or 'local'}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def operating_point_settings(**overrides) -> OperatingPointParams:
    """How operating points are chosen: ``params.yaml``'s ``calibrate`` section (the project's, else the
    checkout's), then ``overrides`` that are not None. Validated here (pydantic, :mod:`pcee.params`), so a
    bad α or η fails naming the key before any training."""

    path = project_dir() / "params.yaml"
    if not path.is_file():
        path = REPO / "params.yaml"
    return load_params(path).calibrate.updated(**overrides)


def choose_operating_points(
    policies: list[str], val, test, settings: OperatingPointParams, params: dict | None = None, **cost
) -> list[dict]:
    """Each policy's operating point, fanned out on the task runner (task ``operating-point``); the first
    policy's is the one served, and it must be certified: else nothing is registered and the champion stays.
    ``params`` are the first policy's own parameters; ``cost``: ``latency_profile`` and ``cost``."""

    futures = [
        C.operating_point.submit(p, val, test, settings, params if i == 0 else None, **cost)
        for i, p in enumerate(policies)
    ]
    sweeps = [f.result() for f in futures]
    sweeps[0]["op"].ensure_certified("nothing registered, the champion stays")
    return sweeps


def publish_run_report(kind: str, title: str, name: str, version: str, data_md5: str, sweeps, result, run_id) -> str:
    """The run's markdown report (:func:`run_report`) as the Prefect artifact ``pcee-<kind>-report``; returns it."""
    from prefect import get_run_logger

    md = run_report(title, data_md5, sweeps, result, run_id)
    verdict = "promoted" if result["decision"].promote else "rejected"
    publish_report(md, key=f"pcee-{kind}-report", description=f"{name} v{version}: gate {verdict}")
    get_run_logger().info("\n%s", md)
    return md


def sweep_markdown(sweeps: list[dict], max_rows: int = 12) -> str:
    """Each policy's operating point (chosen on validation), then the main policy's choice evidence on
    the calibrate rows, thinned to ``max_rows`` rows."""

    lines = [
        f"| policy | mode | certified | parameter | accuracy lower bound | calibrate accuracy | relative cost | {CHECK_LABEL} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sweeps:
        op = s["op"]
        lb = "-" if op.accuracy_lower_bound is None else f"{op.accuracy_lower_bound:.4f}"
        ta = "-" if op.test_accuracy is None else f"{op.test_accuracy:.4f}"
        lines.append(
            f"| {s['policy']} | {op.mode} | {'yes' if op.certified else 'no'} | {op.param_name}={op.value:.4g} | {lb} | "
            f"{op.calibrate_accuracy:.4f} | {op.relative_cost:.3f} | {ta} |"
        )
    main = sweeps[0]["op"]
    rows = main.sweep
    step = max(1, len(rows) // max_rows)
    table = ["| value | accuracy | accuracy lower bound | relative cost | passed |", "|---|---|---|---|---|"]
    for r in rows[::step]:
        table.append(
            f"| {r['value']:.3f} | {r['calibrate_accuracy']:.4f} | {r['accuracy_lower_bound']:.4f} | {r['relative_cost']:.3f} | "
            f"{'yes' if r['passed'] else 'no'} |"
        )
    return (
        "### Operating point per policy (chosen on validation; test only as a check)\n\n"
        + "\n".join(lines)
        + f"\n\n### Choice evidence of `{main.policy_name}` ({main.n_calibrate} calibrate rows, fixed sequence from the most conservative value)\n\n"
        + "\n".join(table)
    )


def gate_and_promote(
    name: str, version: str, bundle_dir: str, splits, op, what: str | None = None, tags: dict | None = None
) -> dict:
    """Evaluate challenger and champion on the calibrate rows of the validation split (the rows the
    operating point was certified on, never fitted on), through the same bound; test accuracy as a
    check only. Apply the gate (tags and, given ``what`` and ``tags``, the version's description with
    the gate result: :func:`version_description`), move aliases."""

    _, cal = split_fit_calibrate(splits.val.y, op.calibrate_fraction, op.seed)
    x, y = splits.val.x[cal], splits.val.y[cal]
    bounded = op.mode != "point"
    kw = {
        "risk": op.risk if bounded else None,
        "bound": op.bound if bounded else None,
        "test_x": splits.test.x,
        "test_y": splits.test.y,
    }
    champion = R.read_aliases(name)["champion"]
    champion = None if champion == version else champion
    ev_new = R.evaluate_bundle(bundle_dir, x, y, version, **kw)
    ev_old = None
    if champion is not None:
        old_dir = R.fetch_bundle(name, champion, str(Path(bundle_dir).parent / "champion"))
        ev_old = R.evaluate_bundle(old_dir, x, y, champion, **kw)
    decision = gate(ev_new, ev_old, float(op.target_accuracy), bound=kw["bound"], risk=kw["risk"])
    description = version_description(what, tags, decision.to_dict()) if what is not None and tags is not None else None
    R.tag_decision(name, version, decision.to_dict(), description=description)
    aliases = R.promote(name, version) if decision.promote else R.read_aliases(name)
    return {"decision": decision, "aliases": aliases}


def certificate_tags(op) -> dict[str, str]:
    """The registry tags of an operating point: the served threshold and its certificate."""
    return {
        "policy": op.policy_name,
        "delta": f"{op.served_threshold:.6g}",
        "target_accuracy": f"{op.target_accuracy:.6g}",
        "risk": f"{op.risk:g}",
        "bound": op.bound,
        "mode": op.mode,
        "certified": str(op.certified).lower(),
        "n_calibrate": str(op.n_calibrate),
        "accuracy_lower_bound": f"{op.accuracy_lower_bound:.6g}" if op.accuracy_lower_bound is not None else "",
        "test_accuracy_check": f"{op.test_accuracy:.6g}" if op.test_accuracy is not None else "",
        "guarantee": op.guarantee,
        **answer_rule_tags(op.answer_rule),
    }


def answer_rule_tags(rule: dict | None) -> dict[str, str]:
    """Registry tags of an answer rule ρ (pcee.selective): its value, kind and coverage where it was chosen."""
    if not rule:
        return {}
    return {
        "answer_threshold": f"{float(rule['threshold']):.6g}",
        "answer_rule_kind": str(rule["kind"]),
        "answer_coverage": "" if rule.get("coverage") is None else f"{float(rule['coverage']):.6g}",
    }


def operating_point_tags(op, data_md5: str, flow: str) -> dict[str, str]:
    """The registry tags every registering flow sets on a new version: data, code and the certificate."""

    return {"data_md5": data_md5, "git_commit": git_commit(REPO), **certificate_tags(op), "flow": flow}


def version_description(what: str, tags: dict, gate: dict | None = None, max_reason: int = 400) -> str:
    """The one-paragraph MLflow description of a registered version (every registering flow: train,
    calibrate, recalibrate label-free and labelled): ``what`` it is (model, data, training regime, or
    "recalibrated from vN (label-free)"), then, from the version's registry ``tags``, the data version
    (md5) and the operating point (policy, served threshold δ, target α, risk η, bound, certified or not,
    answer threshold ρ), then the gate result (``gate``: ``promote`` and ``reason``; None: not gated yet)."""

    def tag(key: str, none: str = "none") -> str:
        value = tags.get(key)
        return none if value is None or str(value) == "" else str(value)

    certified = str(tags.get("certified", "")).lower() == "true"
    if certified:
        lb, n = tags.get("accuracy_lower_bound"), tags.get("n_calibrate")
        cert = "certified" + (
            f" (accuracy lower bound {lb}" + (f" on {n} calibrate rows" if n else "") + ")" if lb else ""
        )
    else:
        cert = "not certified"
    rho = tags.get("answer_threshold")
    rho = (
        f"answer threshold ρ={rho}" + (f" ({tags['answer_rule_kind']})" if tags.get("answer_rule_kind") else "")
        if rho not in (None, "")
        else "no answer threshold ρ (every request answered)"
    )
    text = (
        f"{what.rstrip('.')}. Data version (md5) {tag('data_md5', 'unknown')}. Operating point: policy {tag('policy', 'unknown')}, "
        f"served threshold δ={tag('delta')}, target accuracy α={tag('target_accuracy')}, risk η={tag('risk')}, "
        f"bound {tag('bound')}, mode {tag('mode', 'unknown')}, {cert}, {rho}."
    )
    if gate is None:
        return text + " Gate: not evaluated yet."
    reason = " ".join(str(gate.get("reason") or "").split())
    if len(reason) > max_reason:
        reason = reason[: max_reason - 1] + "…"
    return text + f" Gate: {'promoted' if gate.get('promote') else 'rejected'}" + (f" ({reason})." if reason else ".")


def operating_point_params(op) -> dict:
    """MLflow run params of the operating point (the served parameter, α, η, bound, data roles)."""
    return {
        "policy": op.policy_name,
        "param_name": op.param_name,
        "param_value": op.value,
        "delta": op.served_threshold,
        "target_accuracy": op.target_accuracy,
        "risk": op.risk,
        "bound": op.bound,
        "mode": op.mode,
        "calibrate_fraction": op.calibrate_fraction,
        "split_seed": op.seed,
        "n_fit": op.n_fit,
        "n_calibrate": op.n_calibrate,
        "answer_threshold": (op.answer_rule or {}).get("threshold"),
    }


def operating_point_metrics(exit_metrics: dict, op, validation: dict) -> dict[str, float]:
    """The run metrics every registering flow logs: per-exit test metrics (a report) plus the operating point."""
    out = {
        **exit_metrics,
        "calibrate_accuracy": op.calibrate_accuracy,
        "calibrate_relative_cost": op.relative_cost,
        "calibrate_mean_flops": op.mean_flops,
        "certified": float(op.certified),
        "gx_expectations": len(validation["results"]),
    }
    if op.accuracy_lower_bound is not None:
        out["accuracy_lower_bound"] = op.accuracy_lower_bound
    if op.test_accuracy is not None:
        out["test_accuracy_check"] = op.test_accuracy
        out["test_relative_cost_check"] = op.test_relative_cost
    return out


def choice_rows(sweeps: list[dict]) -> list[dict]:
    """Every policy's choice evidence on the calibrate rows (the MLflow sweep table)."""
    return [{"policy": s["policy"], **r} for s in sweeps for r in s["op"].sweep]


def run_report(title: str, data_md5: str, sweeps: list[dict], result: dict, run_id: str) -> str:
    """The markdown a registering flow publishes as its Prefect artifact and logs."""
    op, decision = sweeps[0]["op"], result["decision"]
    return (
        f"# {title}\n\ndata md5 `{data_md5}`\n\n## Operating point\n\n{op.markdown()}\n\n{sweep_markdown(sweeps)}\n\n"
        f"## Gate\n\n{decision.markdown()}\n\naliases: {result['aliases']}; plots (test curves, a report): MLflow run `{run_id}` artifacts `plots/`"
    )
