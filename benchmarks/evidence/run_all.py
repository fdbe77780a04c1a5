"""Run every evidence experiment (and the other issues' benchmark scripts) and write reports/evidence.md.

Each experiment runs as its own process (``benchmarks/evidence/<name>.py``, the same as running it
alone) with the shared scale flags passed through; trained models are shared through the cache
under ``$PCEE_STATE_DIR/evidence/``. Then the sections are joined into ``<report-dir>/evidence.md``
with a summary table (scale, status, wall time of each part).

    uv run python benchmarks/evidence/run_all.py            # default CPU scale (make bench)
    uv run python benchmarks/evidence/run_all.py --quick    # smoke scale, minutes
    uv run python benchmarks/evidence/run_all.py --only control shift --skip-others
    uv run python benchmarks/evidence/run_all.py --assemble-only   # rebuild evidence.md from the sections
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pcee.atomic import write_text_atomic

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: report sections in order (issue 6's numbering); each is ``benchmarks/evidence/<name>.py`` unless VARIANTS says otherwise
EXPERIMENTS = (
    "equal_cost",
    "equal_cost_msdnet",
    "control",
    "control_overconfident",
    "calibration",
    "regimes",
    "sweet",
    "eero_budget",
    "shift",
)
#: sections that run another section's script with a different model: name -> (script, default args, --quick args).
#: Experiment 1 asks for two MSDNet sizes; the small CNN pair stays beside it because it is cheap.
#: MSDNet is trained jointly (all classifiers from the start, as its authors do) and gets more epochs
#: than the CNNs (it is deeper and learns slower).
VARIANTS = {
    "equal_cost_msdnet": (
        "equal_cost",
        ["--model", "msdnet", "--preset", "cifar10-anytime", "--regime", "joint", "--epochs", "10"],
        ["--model", "msdnet", "--preset", "cifar10-anytime", "--regime", "joint"],
    ),
}
#: the other issues' benchmark scripts: (script, default args, --quick args)
OTHERS = (
    ("sweep_speed.py", [], ["--samples", "5000", "--deltas", "100"]),
    ("inference_speed.py", [], ["--models", "small-cnn", "--repeats", "2"]),
    ("drift_loop.py", [], ["--epochs", "3"]),
    ("serving_load.py", [], ["--n", "200", "--reps", "1"]),
    ("target_guarantee.py", [], ["--quick"]),
    ("shift_control.py", [], ["--quick"]),
)
PASS_THROUGH = (
    "data",
    "model",
    "preset",
    "train_size",
    "val_size",
    "test_size",
    "epochs",
    "batch_size",
    "lr",
    "seed",
    "threads",
)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def start_experiment(name: str, args: argparse.Namespace, threads: int | None = None) -> dict:
    """Start section ``name``'s script as its own process; :func:`wait_experiment` collects it."""
    script, default_args, quick_args = VARIANTS.get(name, (name, [], []))
    cmd = [sys.executable, str(HERE / f"{script}.py"), "--report-dir", str(args.report_dir)]
    cmd += quick_args if args.quick else default_args
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if args.quick:
        cmd.append("--quick")
    if args.no_mlflow:
        cmd.append("--no-mlflow")
    for key in PASS_THROUGH:  # the flags passed to run_all come last and win
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return {
        "name": name,
        "process": subprocess.Popen(cmd, cwd=REPO),
        "t0": time.perf_counter(),
        "command": " ".join(["python"] + cmd[1:]),
    }


def wait_experiment(started: dict) -> dict:
    rc = started.pop("process").wait()
    return {
        "name": started["name"],
        "rc": rc,
        "seconds": time.perf_counter() - started.pop("t0"),
        "command": started["command"],
    }


def run_experiment(name: str, args: argparse.Namespace, threads: int | None = None) -> dict:
    return wait_experiment(start_experiment(name, args, threads))


def run_other(script: str, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / script)] + extra
    print(f"== {script}: {' '.join(extra)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.other_timeout)
        rc, out = p.returncode, (p.stdout + ("\n" + p.stderr if p.returncode else ""))
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {args.other_timeout} s\n{exc.stdout or ''}"
    return {
        "name": script,
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "command": " ".join(["python", f"benchmarks/{script}"] + extra),
        "output": out,
    }


def _verdict_line(body: str) -> str:
    for line in body.splitlines():
        if line.startswith("**Verdict.**"):
            return line[len("**Verdict.**") :].strip()
    return ""


def _training_table(scales: list[dict]) -> list[str]:
    """The cached trained models at the sections' scales (what a fresh ``make bench`` would have to train)."""
    wanted = {(sc.get("data"), sc.get("epochs"), sc.get("seed")) for sc in scales}
    cache = Path(os.environ.get("PCEE_STATE_DIR", REPO / ".pcee")) / "evidence" / "outputs"
    rows, total = [], 0.0
    for meta_path in sorted(cache.glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
            spec = meta["spec"]
        except (OSError, ValueError, KeyError):
            continue
        if (spec["data"], spec["train"]["epochs"], spec["seed"]) not in wanted:
            continue
        total += float(meta.get("train_seconds", 0.0))
        rows.append(
            f"| `{spec['data']}` | {spec['model']} {spec['overrides'] or ''} | {spec['train']['regime']} | {spec['train']['epochs']} | "
            f"{spec.get('split_sizes')} | {meta.get('train_seconds', float('nan')):.0f} | {meta.get('torch_threads', '')} |"
        )
    if not rows:
        return []
    return [
        "Trained models in the shared cache (`$PCEE_STATE_DIR/evidence/outputs/`; a fresh run trains each once):",
        "",
        "| data | model (overrides) | regime | epochs | split sizes | training wall time (s) | torch threads |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Training wall time of these models, in total: {total:.0f} s (measured on a 2-core CPU; torch threads per row).",
        "",
    ]


def assemble(report_dir: Path, runs: dict[str, dict], others: list[dict], header: dict) -> Path:
    """Join the sections (whatever exists under ``report_dir/evidence``) into ``report_dir/evidence.md``."""
    sec_dir = report_dir / "evidence"
    lines = [
        "# Evidence: early exiting with performance control",
        "",
        f"Generated {header['when']} at commit `{header['commit']}` by `{header['command']}`. Every number below was "
        "measured by the scripts in `benchmarks/evidence/` (seed-controlled; everything is fit on the validation split and "
        "evaluated once on test; δ is never chosen on test). Each section states the scale it ran at; a section that "
        "says *quick* is a smoke run on the bundled digits data, not evidence.",
        "",
        "| experiment | scale | status | wall time (s) | this run |",
        "|---|---|---|---|---|",
    ]
    bodies, scales = [], []
    for name in EXPERIMENTS:
        md, js = sec_dir / f"{name}.md", sec_dir / f"{name}.json"
        run = runs.get(name)
        if md.is_file() and js.is_file():
            info = json.loads(js.read_text())
            scales.append(info["scale"])
            status = "ok" if run is None or run["rc"] == 0 else f"FAILED (rc {run['rc']}); section from an earlier run"
            lines.append(
                f"| {info['title']} | {info['scale']['scale']} | {status} | {info['wall_seconds']:.0f} | {'yes' if run else 'earlier run'} |"
            )
            bodies.append(md.read_text())
        else:
            status = "not run" if run is None else f"FAILED (rc {run['rc']})"
            secs = "" if run is None else f"{run['seconds']:.0f}"
            lines.append(f"| {name} | — | {status} | {secs} | {'yes' if run else 'no'} |")
            bodies.append(f"## {name}\n\nNot run at any scale yet: no measured numbers.\n")
    lines.append("")
    verdicts = [_verdict_line(b) for b in bodies]
    if any(verdicts):
        lines += ["### Claims at a glance", ""]
        lines += [f"- **{EXPERIMENTS[i]}** — {v}" for i, v in enumerate(verdicts) if v]
        lines.append("")
    lines += _training_table(scales)
    if header.get("total_seconds") is not None:
        lines += [f"Total wall time of this run: {header['total_seconds']:.0f} s.", ""]
    lines += bodies
    other_md = sec_dir / "others.md"
    if others:
        part = ["## Other issues' benchmark scripts", ""]
        for o in others:
            part += [
                f"### `{o['command']}` — rc {o['rc']}, {o['seconds']:.1f} s",
                "",
                "```",
                o["output"].strip()[-6000:],
                "```",
                "",
            ]
        write_text_atomic(other_md, "\n".join(part) + "\n")
    if other_md.is_file():
        lines.append(other_md.read_text())
    else:
        present = [o[0] for o in OTHERS if (REPO / "benchmarks" / o[0]).is_file()]
        lines += [
            "## Other issues' benchmark scripts",
            "",
            f"Not run for this report ({', '.join(f'`benchmarks/{p}`' for p in present) or 'none present'}); "
            "`make bench` (without `--skip-others`) runs them and includes their output here.",
            "",
        ]
    out = report_dir / "evidence.md"
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=None, help="run only these experiments")
    p.add_argument("--skip-others", action="store_true", help="do not run the other issues' benchmark scripts")
    p.add_argument("--assemble-only", action="store_true", help="only rebuild evidence.md from the existing sections")
    p.add_argument("--other-timeout", type=int, default=1800)
    p.add_argument(
        "--jobs", type=int, default=2, help="experiment processes at once (2: the MSDNet pair trains beside the rest)"
    )
    p.add_argument("--report-dir", type=Path, default=REPO / "reports")
    p.add_argument("--no-mlflow", action="store_true")
    for key in PASS_THROUGH:
        p.add_argument(f"--{key.replace('_', '-')}", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    runs, others = {}, []
    if not args.assemble_only:
        names = list(args.only or EXPERIMENTS)
        if args.model is not None and args.only is None:
            for name in [n for n in names if n in VARIANTS]:
                print(
                    f"== {name}: skipped (--model {args.model} replaces the variant's model)",
                    file=sys.stderr,
                    flush=True,
                )
                names.remove(name)
        # a variant shares no trained model with the other sections, so with --jobs 2 it trains on the
        # second core beside them (one torch thread each); alone it gets both cores
        side = [n for n in names if n in VARIANTS] if args.jobs > 1 and len(names) > 1 else []
        if side and not args.no_mlflow:
            from benchmarks.evidence import evidence_common

            evidence_common.ensure_experiment()
        background = [start_experiment(n, args, threads=1) for n in side]
        for name in names:
            if name not in side:
                runs[name] = run_experiment(name, args, threads=None if name not in VARIANTS else 2)
        for started in background:
            runs[started["name"]] = wait_experiment(started)
        if not args.skip_others:  # timing benchmarks: only once nothing else runs
            for script, default_args, quick_args in OTHERS:
                if (REPO / "benchmarks" / script).is_file():
                    others.append(run_other(script, quick_args if args.quick else default_args, args))
    header = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "command": "python benchmarks/evidence/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "total_seconds": None if args.assemble_only else time.perf_counter() - t0,
    }
    out = assemble(Path(args.report_dir), runs, others, header)
    print(f"wrote {out}", file=sys.stderr)
    failed = [r["name"] for r in list(runs.values()) + others if r["rc"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
