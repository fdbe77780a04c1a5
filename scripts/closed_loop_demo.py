#!/usr/bin/env python
"""``make demo``, second half: the closed loop through the real services, and the story it tells.

After ``scripts/demo.py`` has trained and registered the champion: start the HTTP service
(replicas behind the load balancer, :mod:`pcee_dev.services.hooks.serving`; every input stored, 30%
shadow rows), send clean traffic and run
the monitor (no drift expected), then shifted traffic *without labels* (``PCEE_DEMO_CORRUPTION``,
``PCEE_DEMO_SEVERITY``; default contrast 1: the label-free evidence cannot support α, labels can), running the monitor deployment after each chunk until it alarms. The alarm
(``pcee.drift.detected``) makes the automation of ``recalibrate/drift-alert`` build the **label-free
version** by itself: requests are answered only where the label-free lower bound supports α, every
other one is declined as "unverified under drift" (``/health`` and ``/metrics`` say so, and "waiting for
labels (n/150)"). Fresh shifted traffic measures it. Then labels arrive in pieces of 50 on requests
the label-free version served; after each piece the same deployment runs its **few-label** step, which
certifies the answer rule once a look of its schedule passes; the service reloads the certified version
and the same fresh traffic measures it. The demo prints a before/after table (accuracy on answered,
coverage, cost), the oracle coverage of the shifted traffic in the label-free version's order (labels
known: what the best ρ could have answered) and a **story**: which of "answered at >= α − 1 point" or
"unverified: declined" happened without labels, what the labels certified, and whether the demo's
promise was kept (label-free: answered >= α − 1 point or declined; labelled: coverage > 0 wherever the
oracle coverage exceeds 0.3; ``promise_kept`` in ``closed_loop.json``). Fails (exit 1) saying
where it stopped if the loop does not close within ``PCEE_DEMO_LOOP_TIMEOUT_S`` (default 300 s).

Shifted streams: the validation split, corrupted: its last 150 rows (the label budget) are held back
for the labelled pieces, the rest cycle before them (the label-free version's shadow rows come from
those), so no image is both. After-measurements: the test split, corrupted (images no step ever saw).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pcee.few_labels import DEFAULT_BUDGET
from pcee.settings import Settings
from pcee_dev.demo_settings import DemoSettings

REPO = Path(__file__).resolve().parents[1]

_DEMO = DemoSettings()
CORRUPTION, SEVERITY, CHUNK, LOOP_TIMEOUT_S = _DEMO.corruption, _DEMO.severity, _DEMO.chunk, _DEMO.loop_timeout_s
MAX_SHIFT_CHUNKS = 8
LABEL_PIECE = 50  # labels arrive in pieces of this many (the looks of pcee.few_labels: 50, 100, 150)
#: the last rows of the shifted validation stream, held back until labels are asked for (the label budget)
LABEL_ROWS = DEFAULT_BUDGET


class LoopNotClosed(RuntimeError):
    """The closed loop stopped at some step; the message says which."""


def _services():
    from pcee_dev.services import manager

    return manager


def start_http(services) -> list[str]:
    """(Re)start the HTTP service with the demo's settings; returns its one address (the load balancer)."""
    os.environ.setdefault("PCEE_SERVE_STORE_FRACTION", "1.0")  # the demo recalibrates on the stored inputs
    os.environ.setdefault("PCEE_SERVE_POLL_S", "2")
    os.environ.setdefault("PCEE_SERVE_ANSWER_MODE", "abstain")
    os.environ.setdefault(
        "PCEE_SERVE_SHADOW_FRACTION", "0.3"
    )  # the label-free refit reads shadow rows; a few % in production
    from pcee_dev.services.hooks import serving

    cfg = services.load_config()
    # the fleet (replicas, coordinator, load balancer) may run with the default store fraction and
    # poll: restart it with the demo's. The demo's clients send to its one address.
    running = serving.running(cfg)
    if running:
        services.stop(cfg, running)
    services.up(cfg)
    return [f"http://127.0.0.1:{Settings().serve_port}"]


def health(urls: list[str]) -> dict:
    """The service's /health (through the load balancer: a live replica's, with the fleet's versions)."""
    import httpx

    return httpx.get(f"{urls[0]}/health", timeout=10).json()


def served_versions(urls: list[str]) -> set[str]:
    """The model versions live behind the address (one once every replica has reloaded)."""
    import httpx

    h = httpx.get(f"{urls[0]}/health", timeout=10).json()
    return {str(v) for v in h["fleet"]["versions_live"]} if "fleet" in h else {str(h["model_version"])}


def send(urls: list[str], x, y, feedback: float, seed: int):
    from pcee.serving.auth import client_token
    from pcee.traffic.loadgen import run_load

    token = client_token(Settings())  # the one make up generated: feedback needs it
    res = asyncio.run(run_load(urls, x, y, n=len(x), concurrency=4, feedback_rate=feedback, seed=seed, token=token))
    if res.errors:
        raise LoopNotClosed(f"sending traffic: {res.errors} of {res.sent} requests failed: {dict(res.error_kinds)}")
    return res


def monitor_now(model: str, state: Path, **params) -> dict:
    from prefect.deployments import run_deployment

    from flows.monitor import deployment_name

    reports = state / "monitor" / model / "reports"
    before = set(reports.glob("*.json")) if reports.is_dir() else set()
    name = deployment_name()
    run = run_deployment(name, parameters={"model_name": model, **params}, timeout=180)
    if not run.state.is_completed():
        raise LoopNotClosed(f"monitor run {run.name} ended {run.state.type.value}: {run.state.message}")
    new = sorted(set(reports.glob("*.json")) - before)
    if not new:
        raise LoopNotClosed(f"monitor run {run.name} wrote no report (no new traffic in its window?)")
    return json.loads(new[-1].read_text())


def recalibrate_runs() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def read() -> list[str]:
        async with get_client() as client:
            dep = await client.read_deployment_by_name("recalibrate/drift-alert")
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            return [f"{r.name}: {r.state.type.value if r.state else '?'}" for r in runs]

    return asyncio.run(read())


def wait_for_new_champion(
    urls: list[str], model: str, old: str, keep_sending, timeout_s: float, rearm: bool
) -> str | None:
    """Wait until every replica serves one version other than ``old``; returns it, or None when every
    recalibrate run finished and the champion stayed (e.g. the label-free refit was refused)."""
    from pcee.registry.aliases import aliases

    deadline = time.monotonic() + timeout_s
    seen_runs: list[str] = []
    rearmed = 0
    while True:
        versions = served_versions(urls)
        if len(versions) == 1 and old not in versions:
            return versions.pop()
        if time.monotonic() > deadline:
            raise LoopNotClosed(
                f"champion still v{old} after {timeout_s:.0f}s; recalibrate runs: {recalibrate_runs() or 'none'}"
            )
        keep_sending()  # live traffic keeps coming while the loop reacts
        runs = recalibrate_runs()
        if runs != seen_runs:
            print(f"  recalibrate/drift-alert runs: {runs}")
            seen_runs = runs
        finished = runs and all(r.endswith(("COMPLETED", "FAILED", "CRASHED", "CANCELLED")) for r in runs)
        if finished and aliases(model)["champion"] == old:
            if not rearm or rearmed >= 2:
                return None
            rearmed += 1  # the run changed nothing (e.g. too few shadow rows yet): the monitor alarms again
            rep = monitor_now(model, STATE, cooldown_minutes=0.0)
            print(
                f"  champion unchanged after the recalibration; monitor re-run: {'DRIFT (event emitted again)' if rep['drifted'] else 'no drift'}"
            )
        time.sleep(1)


STATE = Path(".")


def row(label: str, version: str, h: dict, res, num_exits: int, target: float) -> dict:
    acc = res.answered_accuracy
    return {
        "maps": label,
        "version": version,
        "requests": res.ok,
        "delta": h.get("delta"),
        "answer_threshold": h.get("answer_threshold"),
        "verification": h.get("verification"),
        "coverage": res.coverage,
        "answered_accuracy": acc,
        "accuracy": res.accuracy,
        "shortfall": max(0.0, target - acc) if acc == acc else float("nan"),
        "relative_cost": res.relative_cost(num_exits),
    }


class Loop:
    """The demo's state: services, data, the versions met on the way, the rows of the table."""

    def __init__(self, services, cfg) -> None:
        from pcee.data.corruptions import corrupt
        from pcee.data.datasets import load_dataset

        self.cfg, self.model = cfg, os.environ.setdefault("PCEE_MODEL_NAME", "pcee-digits-small-cnn")
        self.urls = start_http(services)
        self.h = health(self.urls)
        self.v_old, self.num_exits = str(self.h["model_version"]), int(self.h["num_exits"])
        # the promise is the operator's target α (the certified δ is only the threshold that keeps it)
        self.target = float(self.h["target_accuracy"] if self.h.get("target_accuracy") is not None else self.h["delta"])
        self.splits = load_dataset(f"prepared:{Settings().project_dir / 'data'}")
        xs, ys = corrupt(self.splits.val.x, CORRUPTION, SEVERITY, seed=1), self.splits.val.y
        # the last LABEL_ROWS images are sent only once labels are asked for: no image is both one the label-free
        # version was refit on (its shadow rows come from the stream before) and one the labels certify it on
        cut = len(xs) - LABEL_ROWS
        if cut < CHUNK:
            raise LoopNotClosed(
                f"the validation split has {len(xs)} rows: too few to hold {LABEL_ROWS} back for labels"
            )
        self.xs, self.ys, self.xl, self.yl = xs[:cut], ys[:cut], xs[cut:], ys[cut:]
        self.labelled_sent = 0
        self.xt = corrupt(self.splits.test.x, CORRUPTION, SEVERITY, seed=2)
        self.static = {"ok": 0, "correct": 0, "answered": 0, "answered_correct": 0, "flops": 0.0, "final_flops": None}
        self.sent, self.chunk_i = 0, 0

    def shifted_chunk(self, size: int = CHUNK) -> None:
        lo = (self.chunk_i * size) % len(self.xs)
        idx = [(lo + j) % len(self.xs) for j in range(size)]
        res = send(self.urls, self.xs[idx], self.ys[idx], feedback=0.0, seed=100 + self.chunk_i)
        self.chunk_i += 1
        self.sent += res.ok
        if set(res.model_versions) == {self.v_old}:  # answered by the static maps only
            for key in ("ok", "correct", "answered", "answered_correct"):
                self.static[key] += getattr(res, key)
            self.static["flops"] += res.flops_total
            self.static["final_flops"] = res.exit_flops.get(self.num_exits - 1, self.static["final_flops"])

    def labelled_piece(self, size: int) -> None:
        """The next ``size`` held-back rows, each with its label (the feedback a labeller sends)."""
        if self.labelled_sent + size > len(self.xl):
            raise LoopNotClosed(
                f"only {len(self.xl)} rows were held back for labels, {self.labelled_sent + size} asked"
            )
        idx = np.arange(self.labelled_sent, self.labelled_sent + size)
        res = send(self.urls, self.xl[idx], self.yl[idx], feedback=1.0, seed=500 + self.labelled_sent)
        self.labelled_sent += size
        self.sent += res.ok

    def measure(self, label: str, version: str) -> dict:
        """Fresh shifted traffic (test images no step saw) through the reloaded ``version``: its table row."""
        res = send(self.urls, self.xt, self.splits.test.y, feedback=0.0, seed=7)
        if set(res.model_versions) != {version}:
            raise LoopNotClosed(
                f"after-traffic answered by versions {dict(res.model_versions)}, expected only v{version}"
            )
        return row(label, f"v{version}", health(self.urls), res, self.num_exits, self.target)

    def static_row(self) -> dict:
        st = self.static
        acc = st["answered_correct"] / st["answered"] if st["answered"] else float("nan")
        cost = st["flops"] / st["ok"] / st["final_flops"] if st["ok"] and st["final_flops"] else float("nan")
        return {
            "maps": "static maps",
            "version": f"v{self.v_old}",
            "requests": st["ok"],
            "delta": self.h.get("delta"),
            "answer_threshold": self.h.get("answer_threshold"),
            "verification": self.h.get("verification"),
            "coverage": st["answered"] / st["ok"] if st["ok"] else float("nan"),
            "answered_accuracy": acc,
            "accuracy": st["correct"] / st["ok"] if st["ok"] else float("nan"),
            "shortfall": max(0.0, self.target - acc) if acc == acc else float("nan"),
            "relative_cost": cost,
        }


def until_alarm(loop: Loop) -> dict:
    """Clean traffic and a monitor run, then shifted traffic without labels until the monitor alarms."""
    clean = send(loop.urls, loop.splits.test.x, loop.splits.test.y, feedback=0.0, seed=1)
    rep = monitor_now(loop.model, STATE)
    p = rep["primary"]
    print(
        f"clean traffic: {clean.ok} requests, accuracy {clean.accuracy:.4f}, coverage {clean.coverage:.3f}; monitor: "
        f"{'DRIFT' if rep['drifted'] else 'no drift'} (window {rep['n_live']}, {p['column']} p={p['p_value']:.3g})"
    )
    if rep["drifted"]:
        print("  (a false alarm on clean traffic: the automation may act now; the loop below still has to close)")
    while True:
        if loop.chunk_i >= MAX_SHIFT_CHUNKS:
            raise LoopNotClosed(f"no drift alarm after {loop.sent} shifted requests")
        loop.shifted_chunk()
        rep = monitor_now(loop.model, STATE)
        p = rep["primary"]
        print(
            f"  {loop.sent} shifted requests sent; monitor: {'DRIFT' if rep['drifted'] else 'no drift'} "
            f"({p['column']} KS D={p['statistic']:.3f} p={p['p_value']:.3g})"
        )
        if rep["drifted"]:
            return rep


def labels_in_pieces(loop: Loop, v_lf: str) -> tuple[str | None, int]:
    """Labels arrive LABEL_PIECE at a time on requests the label-free version serves; after each piece the
    few-label step runs (recalibrate/drift-alert, label_free=False). Returns (the certified version or None,
    the labels it saw)."""
    from prefect.deployments import run_deployment

    from pcee.registry.aliases import aliases

    budget, n = int(health(loop.urls).get("label_budget") or DEFAULT_BUDGET), 0
    for _ in range(budget // LABEL_PIECE):
        loop.labelled_piece(LABEL_PIECE)
        h = health(loop.urls)
        n = int(h.get("labels_received") or 0)
        print(f"  {h.get('labels') or 'labels'} on v{v_lf}; /health verification: {h['verification']}")
        run = run_deployment(
            "recalibrate/drift-alert", parameters={"model_name": loop.model, "label_free": False}, timeout=300
        )
        if not run.state.is_completed():
            raise LoopNotClosed(f"few-label run {run.name} ended {run.state.type.value}: {run.state.message}")
        report = run_report(loop.model, run.id)
        print(f"  few-label step: {report}")
        if aliases(loop.model)["champion"] != v_lf:
            return wait_for_new_champion(loop.urls, loop.model, v_lf, lambda: None, LOOP_TIMEOUT_S, rearm=False), n
    return None, n


def run_report(model: str, run_id) -> str:
    """The one-line status of a recalibrate run (its Prefect artifact's description)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> str:
        async with get_client() as client:
            key = ArtifactFilterKey(any_=[f"pcee-recalibrate-{model}".lower()])
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
            return next((str(a.description) for a in arts if a.flow_run_id == run_id), "(no report)")

    return asyncio.run(read())


def oracle_coverage(loop: Loop, version: str) -> float:
    """The largest share of the after-traffic whose accuracy is >= α when answered in ``version``'s order
    (labels known; reporting only, the service never sees this)."""
    from pcee.bundle import ModelBundle
    from pcee.registry.fetch import fetch_bundle
    from pcee.selective import expected_at_exit
    from pcee.training.evaluate import predict_all_exits

    bundle = ModelBundle.load(fetch_bundle(loop.model, version, STATE / "demo-bundles"))
    logits = predict_all_exits(bundle.model, np.asarray(loop.xt, dtype=np.float32))
    exits, expected = expected_at_exit(bundle.policy, logits)
    correct = logits[np.arange(exits.size), exits].argmax(-1) == loop.splits.test.y
    best = 0.0
    for rho in np.unique(expected):
        rows = expected >= rho
        if correct[rows].mean() >= loop.target - 1e-12:
            best = max(best, float(rows.mean()))
    return best


#: the labelled row must certify coverage > 0 wherever the oracle coverage exceeds this (issue 26, goal 4)
ORACLE_BAR = 0.3


def story(
    loop: Loop, lf_row: dict | None, lab_row: dict | None, oracle: float | None, labels: int | None
) -> tuple[list[str], bool]:
    """What happened, in words that the numbers above support, and whether both rows kept the demo's promise
    (label-free: answered >= α − 1 point or declined; labelled: coverage > 0 wherever the oracle exceeds
    ORACLE_BAR); the last line says which."""
    bar = loop.target - 0.01
    out, kept = [], True
    if lf_row is None:
        out.append("label-free: no label-free version was built (see the Prefect artifact)")
        kept = False
    elif lf_row["coverage"] == 0:
        out.append(
            f"label-free (0 labels): unverified: declined — all {lf_row['requests']} shifted requests declined as "
            f'"{lf_row["verification"]}" (best guess returned, flagged), none called answered'
        )
    else:
        ok = lf_row["answered_accuracy"] >= bar
        kept = kept and ok
        out.append(
            f"label-free (0 labels): answered {lf_row['coverage']:.1%} at accuracy {lf_row['answered_accuracy']:.4f} "
            f'({">=" if ok else "BELOW"} α − 1 point = {bar:.2f}); the rest declined as "unverified under drift"'
        )
    needed = oracle is not None and oracle > ORACLE_BAR
    covered = lab_row is not None and lab_row["coverage"] > 0
    kept = kept and (covered or not needed)
    if lab_row is None:
        out.append(
            f"labelled: no look certified with {labels} labels (oracle coverage {oracle:.2f}"
            + (
                f", above {ORACLE_BAR}: a share the labels could not certify was there)"
                if needed
                else f", at most {ORACLE_BAR}: little to certify)"
            )
            + "; the label-free version keeps declining what it cannot support"
        )
    else:
        out.append(
            f"labelled ({labels} labels): certified, coverage {lab_row['coverage']:.1%} at accuracy "
            f"{lab_row['answered_accuracy']:.4f} (oracle coverage {oracle:.2f}; "
            f"{'coverage > 0' if covered else 'coverage 0'}{f' although the oracle exceeds {ORACLE_BAR}' if needed and not covered else ''})"
        )
    out.append(
        f"{'kept' if kept else 'NOT kept'}: label-free answered >= α − 1 point or declined; labelled coverage > 0 "
        f"wherever the oracle coverage exceeds {ORACLE_BAR}"
    )
    return out, kept


def print_table(loop: Loop, rows: list[dict]) -> None:
    print(f"\n=== before/after on shifted traffic ({CORRUPTION} severity {SEVERITY}) ===")
    print(
        f"answer mode abstain: a declined request still gets its best guess, flagged; shortfall = max(0, α {loop.target:.4f} "
        "− accuracy on answered requests)"
    )
    print(
        f"{'maps':16s} {'version':>7s} {'requests':>8s} {'ρ':>6s} {'coverage':>8s} {'acc answered':>12s} {'acc all':>8s} "
        f"{'rel. cost':>9s}  verification"
    )
    for r in rows:
        rho = float("nan") if r["answer_threshold"] is None else float(r["answer_threshold"])
        acc = "—" if r["answered_accuracy"] != r["answered_accuracy"] else f"{r['answered_accuracy']:.4f}"
        print(
            f"{r['maps']:16s} {r['version']:>7s} {r['requests']:8d} {rho:6.3f} {r['coverage']:8.3f} {acc:>12s} "
            f"{r['accuracy']:8.4f} {r['relative_cost']:9.3f}  {r['verification']}"
        )


def run_loop(loop: Loop) -> dict:
    from pcee.registry.aliases import aliases

    alarm = until_alarm(loop)
    delay = loop.sent
    print(
        f"drift detected after {delay} shifted requests; pcee.drift.detected emitted; waiting for the automation "
        "(recalibrate/drift-alert: the label-free version)"
    )
    v_lf = wait_for_new_champion(loop.urls, loop.model, loop.v_old, loop.shifted_chunk, LOOP_TIMEOUT_S, rearm=True)
    if v_lf is None:
        raise LoopNotClosed("the drift alarm produced no label-free version")
    h = health(loop.urls)
    print(
        f'the service reloaded: v{v_lf}, verification "{h["verification"]}", {h.get("labels")} (aliases {aliases(loop.model)})'
    )
    lf_row = loop.measure("label-free", v_lf)
    oracle = oracle_coverage(loop, v_lf)
    v_cert, labels = labels_in_pieces(loop, v_lf)
    lab_row = None
    if v_cert is not None:
        print(f'the service reloaded: v{v_cert}, verification "{health(loop.urls)["verification"]}"')
        lab_row = loop.measure("labelled", v_cert)
    rows = [loop.static_row(), lf_row] + ([lab_row] if lab_row else [])
    return {
        "alarm": alarm,
        "delay": delay,
        "v_lf": v_lf,
        "v_cert": v_cert,
        "rows": rows,
        "oracle": oracle,
        "labels": labels,
        "lf_row": lf_row,
        "lab_row": lab_row,
    }


def main() -> int:
    global STATE
    services = _services()
    cfg = services.load_config()
    STATE = cfg.state_dir
    info = json.loads((cfg.state_dir / "services.json").read_text())
    os.environ["PREFECT_API_URL"] = info["prefect_api_url"]
    os.environ["MLFLOW_TRACKING_URI"] = info["mlflow_tracking_uri"]
    os.environ["PCEE_STATE_DIR"] = str(cfg.state_dir)
    t_start = time.monotonic()
    try:
        print(
            f"\n=== closed loop: serve the champion, shift the traffic ({CORRUPTION} severity {SEVERITY}), let the loop react ==="
        )
        loop = Loop(services, cfg)
        print(
            f"serving {loop.model} v{loop.v_old} at {', '.join(loop.urls)}: target accuracy α {loop.target:.4f}, answer mode "
            f'{loop.h.get("answer_mode")}, verification "{loop.h.get("verification")}", shadow fraction {loop.h.get("shadow_fraction")}'
        )
        out = run_loop(loop)
    except LoopNotClosed as err:
        print(f"\nCLOSED LOOP FAILED\n  {err}", file=sys.stderr)
        return 1
    print_table(loop, out["rows"])
    lines, kept = story(loop, out["lf_row"], out["lab_row"], out["oracle"], out["labels"])
    print(f"oracle coverage of the after-traffic in the label-free version's order (labels known): {out['oracle']:.3f}")
    print("\nSTORY: " + "\nSTORY: ".join(lines))
    print(
        f"detection delay: {out['delay']} shifted requests; closed loop in {time.monotonic() - t_start:.0f}s; "
        f"Prefect UI {info['prefect_ui_url']}"
    )
    summary = {
        "corruption": CORRUPTION,
        "severity": SEVERITY,
        "old_version": loop.v_old,
        "label_free_version": out["v_lf"],
        "labelled_version": out["v_cert"],
        "new_version": out["v_cert"] or out["v_lf"],
        "delay_requests": out["delay"],
        "target_accuracy": loop.target,
        "oracle_coverage": out["oracle"],
        "labels": out["labels"],
        "rows": out["rows"],
        "story": lines,
        "promise_kept": kept,
    }
    from pcee.atomic import write_text_atomic

    write_text_atomic(cfg.state_dir / "closed_loop.json", json.dumps(summary, indent=2) + "\n")  # for tests and scripts
    return 0


if __name__ == "__main__":
    sys.exit(main())
