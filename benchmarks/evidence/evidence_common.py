"""Shared plumbing of the evidence experiments: scales, cached trained outputs, report sections, MLflow.

Every experiment script (``benchmarks/evidence/<name>.py``) takes the same scale flags, trains (or
reads from the cache) the multi-exit models it needs, fits everything on the validation split,
evaluates on the test split, and writes one report section::

    <report-dir>/evidence/<name>.md     the section (tables, figure links, verdict)
    <report-dir>/evidence/<name>.json   the measured numbers behind it
    <report-dir>/figures/<name>_*.png   its plots

``run_all.py`` joins the sections into ``<report-dir>/evidence.md``.

Trained models are shared between experiments: the outputs contract (val.npz, test.npz,
meta.json) plus the weights are cached under ``$PCEE_STATE_DIR/evidence/outputs/<key>/`` where
``key`` hashes everything that determines them (data, split sizes, seed, model, config, training) and
the training environment that decides the weights besides them (torch's thread count, the CPU or GPU
and its kernels' switches, the torch version: :mod:`pcee.training.reproducibility`). A key is therefore
machine-specific: another kind of machine, or another ``--threads``, trains its own copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pcee.atomic import to_jsonable, write_text_atomic

REPO = Path(__file__).resolve().parents[2]
CIFAR10 = os.path.relpath(REPO.parent / "shared" / "data" / "cifar10")  # ../shared beside the checkout; never copied in

#: the two scales: ``quick`` is a smoke run on the bundled digits, ``default`` the CPU evidence run
SCALES: dict[str, dict[str, Any]] = {
    "quick": {
        "data": "digits",
        "model": "small-cnn",
        "preset": "digits",
        "small_widths": [12, 24, 48, 48],
        "train_size": None,
        "val_size": None,
        "test_size": None,
        "epochs": 3,
        "batch_size": 64,
        "lr": 0.05,
    },
    "default": {
        "data": f"imagefolder:{CIFAR10}",
        "model": "small-cnn",
        "preset": "cifar",
        "small_widths": [24, 48, 96, 192],
        "train_size": 8000,
        "val_size": 2000,
        "test_size": 5000,
        "epochs": 6,
        "batch_size": 128,
        "lr": 0.05,
    },
}


def state_dir() -> Path:
    return Path(os.environ.get("PCEE_STATE_DIR", REPO / ".pcee"))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The scale flags every experiment shares (explicit flags override the scale's values)."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (digits, 3 epochs)")
    parser.add_argument("--data", default=None, help="dataset name (default: the scale's)")
    parser.add_argument("--model", default=None, help="model name (default: the scale's)")
    parser.add_argument("--preset", default=None, help="model preset (default: the scale's)")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: 1 by default)")
    parser.add_argument("--report-dir", default=str(REPO / "reports"), help="where evidence/<name>.md and figures/ go")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the MLflow experiment 'evidence'")


def resolve_scale(args: argparse.Namespace) -> dict[str, Any]:
    """The scale's settings with the explicit flags applied; also names the scale."""
    name = "quick" if args.quick else "default"
    scale = dict(SCALES[name], scale=name)
    for key in ("data", "model", "preset", "train_size", "val_size", "test_size", "epochs", "batch_size", "lr"):
        value = getattr(args, key, None)
        if value is not None:
            scale[key] = value
    custom = any(
        getattr(args, k, None) is not None
        for k in ("data", "model", "preset", "train_size", "val_size", "test_size", "epochs", "batch_size", "lr")
    )
    if custom:
        scale["scale"] = f"{name}+overrides"
    scale["seed"] = int(args.seed)
    return scale


def scale_line(scale: dict[str, Any]) -> str:
    """One line naming the scale of a run, for the top of each section."""
    return (
        f"Scale: **{scale['scale']}** — data `{scale['data']}`, model `{scale['model']}` preset `{scale['preset']}`, "
        f"train {scale['train_size'] or 'all'} / val {scale['val_size'] or 'default'} / test {scale['test_size'] or 'all'}, "
        f"{scale['epochs']} epochs, batch {scale['batch_size']}, seed {scale['seed']}."
    )


# ---------------------------------------------------------------------------------------------
# data and trained models (cached)
# ---------------------------------------------------------------------------------------------
_SPLITS: dict[tuple, Any] = {}


def load_splits(scale: dict[str, Any]):
    from pcee.data.datasets import load_dataset

    key = (scale["data"], scale["seed"], scale["train_size"], scale["val_size"], scale["test_size"])
    if key not in _SPLITS:
        _SPLITS[key] = load_dataset(
            scale["data"],
            seed=scale["seed"],
            train_size=scale["train_size"],
            val_size=scale["val_size"],
            test_size=scale["test_size"],
        )
    return _SPLITS[key]


@dataclass
class Trained:
    """A trained model's validation and test outputs (and the cache directory holding its weights)."""

    label: str
    val: Any  # ExitOutputs
    test: Any  # ExitOutputs
    meta: dict[str, Any]
    path: Path
    cached: bool
    train_seconds: float = 0.0
    _model: Any = field(default=None, repr=False)

    def model(self):
        """The trained network (loaded from the cache on first use)."""
        if self._model is None:
            from pcee.training.checkpoint import load_checkpoint

            self._model = load_checkpoint(self.path)
            self._model.eval()
        return self._model


def cache_spec(
    scale: dict[str, Any], splits, overrides: dict[str, Any], config, purpose: str | None = None
) -> dict[str, Any]:
    """Everything that decides a cached model's weights: its data, model, training config and the
    environment the training would run in now (threads, machine, torch; the trainer pins and records it)."""
    from pcee.training.reproducibility import training_environment

    spec = {
        "data": scale["data"],
        "sizes": [scale["train_size"], scale["val_size"], scale["test_size"]],
        "split_sizes": splits.sizes() if callable(getattr(splits, "sizes", None)) else None,
        "seed": scale["seed"],
        "model": scale["model"],
        "preset": scale["preset"],
        "overrides": overrides,
        "train": config.to_dict(),
        "environment": training_environment(config),
        "version": 1,
    }
    if purpose:
        spec["purpose"] = purpose
    return spec


def cache_key(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def trained(
    scale: dict[str, Any],
    regime: str = "mixed",
    model_overrides: dict[str, Any] | None = None,
    label: str | None = None,
    train_overrides: dict[str, Any] | None = None,
    purpose: str | None = None,
    measure_train_accuracy: bool = False,
) -> Trained:
    """Train ``scale``'s model with ``regime`` (or read it from the cache) and return its outputs.

    ``model_overrides`` change the architecture (e.g. ``widths`` for a smaller network);
    ``train_overrides`` other ``TrainConfig`` fields (weight decay, augmentation, schedule);
    ``purpose`` tells apart models trained for a special purpose (it enters the cache key).
    ``measure_train_accuracy`` skips the per-epoch validation pass and records the per-exit
    accuracy on the training images in ``meta["train_accuracy"]`` (a memorisation check).
    """

    from pcee.models.flops import measure_exit_flops
    from pcee.models.registry import build_model, data_overrides
    from pcee.outputs import read_outputs_dir, write_outputs_dir
    from pcee.training.checkpoint import save_checkpoint
    from pcee.training.config import TrainConfig
    from pcee.training.evaluate import compute_outputs, exit_accuracies, predict_all_exits
    from pcee.training.trainer import echo_epochs, seed_everything, train_model

    splits = load_splits(scale)
    overrides = {**data_overrides(scale["model"], splits.input_shape, splits.num_classes), **(model_overrides or {})}
    config = TrainConfig(
        regime=regime,
        epochs=int(scale["epochs"]),
        batch_size=int(scale["batch_size"]),
        lr=float(scale["lr"]),
        seed=int(scale["seed"]),
        **(train_overrides or {}),
    )
    spec = cache_spec(scale, splits, overrides, config, purpose)
    key = cache_key(spec)
    out = state_dir() / "evidence" / "outputs" / key
    label = label or f"{scale['model']}/{regime}"
    if (out / "meta.json").is_file() and (out / "model.pt").is_file():
        outputs, meta = read_outputs_dir(out)
        return Trained(
            label,
            outputs["val"],
            outputs["test"],
            meta,
            out,
            cached=True,
            train_seconds=float(meta.get("train_seconds", 0.0)),
        )
    seed_everything(int(scale["seed"]))
    model = build_model(scale["model"], scale["preset"], **overrides)
    flops = measure_exit_flops(model, splits.input_shape)
    t0 = time.perf_counter()
    echo_epochs()  # one progress line per epoch on stderr (no bar: progress=False)
    # a memorisation run needs no per-epoch validation pass (it would only cost time)
    history = train_model(
        model, dataclasses.replace(splits, val=None) if measure_train_accuracy else splits, config, progress=False
    )
    seconds = time.perf_counter() - t0
    if history.environment != spec["environment"]:  # the key must name what the weights came from
        raise RuntimeError(
            f"training ran in another environment than its cache key says: {history.environment} != {spec['environment']}"
        )
    model.eval()
    val = compute_outputs(model, splits.val, flops)
    test = compute_outputs(model, splits.test, flops)
    meta = {
        "spec": spec,
        "key": key,
        "label": label,
        "train_seconds": seconds,
        "history": history,
        "torch_threads": history.environment["threads"],
        "training_environment": history.environment,
    }
    if measure_train_accuracy:
        train_logits = predict_all_exits(model, splits.train.x, batch_size=config.eval_batch_size)
        meta["train_accuracy"] = [float(a) for a in exit_accuracies(train_logits, np.asarray(splits.train.y))]
    with tempfile.TemporaryDirectory() as tmp:
        weights, model_json = save_checkpoint(Path(tmp) / "ckpt", model)
        write_outputs_dir(
            out,
            {"val": val, "test": test},
            meta,
            extra_files={"model.pt": Path(weights), "model.json": Path(model_json)},
        )
    result = Trained(label, val, test, meta, out, cached=False, train_seconds=seconds)
    result._model = model
    return result


def correct_matrix(outputs) -> np.ndarray:
    """(N, L) bool: is exit l right on sample i."""
    return outputs.logits.argmax(axis=-1) == outputs.labels[:, None]


def curve_area(relative_cost: np.ndarray, accuracy: np.ndarray, lo: float, hi: float = 1.0) -> float:
    """Mean accuracy of a curve's upper envelope over relative cost [lo, hi] (held flat past its ends).

    A normalised area under the accuracy–cost curve: the accuracy one gets on average when the
    budget is uniform over [lo, hi].
    """
    c, a = np.asarray(relative_cost, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    keep = np.isfinite(c) & np.isfinite(a)
    c, a = c[keep], a[keep]
    order = np.lexsort((a, c))
    c, a = c[order], np.maximum.accumulate(a[order])
    grid = np.linspace(lo, hi, 401)
    # below the cheapest point nothing is reachable at that cost: count the cheapest point's accuracy
    # (every policy here can always reach its cheapest point; exit 1 costs lo)
    vals = np.interp(grid, c, a)
    return float(np.trapezoid(vals, grid) / (hi - lo)) if hi > lo else float(vals[0])


# ---------------------------------------------------------------------------------------------
# report sections and MLflow
# ---------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One experiment's part of the evidence report."""

    name: str
    title: str
    scale: dict[str, Any]
    report_dir: Path
    lines: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def figure_path(self, stem: str) -> Path:
        path = self.report_dir / "figures" / f"{self.name}_{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figures.append(path)
        return path

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
        self.lines.append("")

    def image(self, path: Path, alt: str) -> None:
        rel = os.path.relpath(path, self.report_dir)
        self.lines.append(f"![{alt}]({rel})")
        self.lines.append("")


def fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "n/a"
        if 0 < abs(v) < 1e-3:
            return f"{float(v):.1e}"
        return f"{float(v):.4f}"
    return str(v)


def mlflow_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a local SQLite store under ``$PCEE_STATE_DIR/evidence``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = state_dir() / "evidence" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def ensure_experiment() -> None:
    """Point MLflow at :func:`mlflow_uri` and create the experiment ``evidence`` if it is missing.

    ``run_all`` calls this once before it starts experiments side by side, so that two processes
    never create the SQLite schema or the experiment at the same time.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    local_store = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports it
    mlflow.set_tracking_uri(mlflow_uri())
    if local_store and mlflow.get_experiment_by_name("evidence") is None:
        # a local SQLite store would otherwise put artifacts in ./mlruns of whatever the cwd is
        artifacts = (state_dir() / "evidence" / "artifacts").resolve()
        mlflow.create_experiment("evidence", artifact_location=artifacts.as_uri())
    mlflow.set_experiment("evidence")


def log_mlflow(section: Section, md_path: Path, json_path: Path) -> str:
    """Log the section as one run of the MLflow experiment ``evidence``; returns the run id."""
    import mlflow

    ensure_experiment()
    params = {k: ("" if v is None else str(v)) for k, v in section.scale.items()}
    metrics = {k: float(v) for k, v in section.metrics.items() if v is not None and np.isfinite(v)}
    with mlflow.start_run(run_name=section.name) as run:
        mlflow.set_tags({"experiment_script": section.name, "scale": section.scale["scale"]})
        mlflow.log_params(params)
        if metrics:
            mlflow.log_metrics(
                {"".join(ch if ch.isalnum() or ch in "-_./ " else "_" for ch in k): v for k, v in metrics.items()}
            )
        mlflow.log_artifact(str(md_path))
        mlflow.log_artifact(str(json_path))
        for fig in section.figures:
            if fig.is_file():
                mlflow.log_artifact(str(fig), artifact_path="figures")
        return run.info.run_id


def finish(section: Section, args: argparse.Namespace) -> Path:
    """Write the section's markdown and JSON (atomically) and log it to MLflow unless disabled."""
    seconds = time.perf_counter() - section.started
    section.metrics["wall_seconds"] = seconds
    body = [f"## {section.title}", "", scale_line(section.scale), ""] + section.lines
    body += [
        f"_Wall time of this experiment: {seconds:.1f} s (training included unless the models came from the cache)._",
        "",
    ]
    out = Path(section.report_dir) / "evidence"
    md_path, json_path = out / f"{section.name}.md", out / f"{section.name}.json"
    payload = {
        "name": section.name,
        "title": section.title,
        "scale": section.scale,
        "wall_seconds": seconds,
        "results": section.results,
    }
    write_text_atomic(
        json_path, json.dumps(to_jsonable(payload, nonfinite_as_null=True), indent=2, sort_keys=True) + "\n"
    )
    write_text_atomic(md_path, "\n".join(body) + "\n")
    if not args.no_mlflow:
        run_id = log_mlflow(section, md_path, json_path)
        print(
            f"[{section.name}] logged to MLflow experiment 'evidence' run {run_id} at {mlflow_uri()}", file=sys.stderr
        )
    print(f"[{section.name}] wrote {md_path} ({seconds:.1f} s)", file=sys.stderr)
    return md_path


def start(
    name: str, title: str, argv: list[str] | None, extra=None
) -> tuple[argparse.Namespace, dict[str, Any], Section]:
    """Parse the common flags (plus ``extra(parser)``), set threads, and open the section."""
    import torch

    parser = argparse.ArgumentParser(description=title)
    add_common_args(parser)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(args.threads)))
    os.environ.setdefault("MPLBACKEND", "Agg")
    scale = resolve_scale(args)
    return args, scale, Section(name, title, scale, Path(args.report_dir))
