"""Peer benchmark: pcee's HTTP service vs ``mlflow models serve`` on the same registered champion (issue 14, item 5).

    uv run --locked python benchmarks/serve_vs_mlflow.py [--quick] [--reps 5] [--models digits cifar]
        [--n-digits 600] [--n-cifar 240] [--concurrency 1 8 32] [--cifar-model attach-exits:tv-resnet18]
        [--mlflow-workers 1] [--tracking server|sqlite] [--client aiohttp|httpx] [--report-dir reports]

Everything runs on 127.0.0.1 free ports under one temporary state directory, and everything this
script starts is stopped again on exit, on an error and on Ctrl-C / SIGTERM:

1. an MLflow tracking server (``mlflow server``, SQLite backend, proxied artifacts in the temp dir;
   ``--tracking sqlite`` uses a SQLite tracking URI instead of a server);
2. per model, a bundle is built, logged and registered as pcee's pyfunc model
   (:func:`pcee.registry.log_and_register`) and made the ``champion``:

   - ``digits``: small-cnn (digits preset) on 1x8x8 digits, trained ``--digits-epochs`` epochs here
     (joint regime; ``--quick``: random initialisation), PCEE δ = 0.9 fitted on the validation split;
   - ``cifar``: a CIFAR-size model (default attach-exits with a torchvision resnet18 backbone on
     3x32x32) with **random initialisation**, PCEE fitted on seeded uniform-noise images with random
     labels, requests are uniform-noise images: a speed benchmark only, nothing is downloaded;

3. ``mlflow models serve -m models:/NAME@champion --env-manager local`` and pcee's service
   ``python -m pcee.cli serve --model-name NAME`` (its defaults: traffic logging on, 2 ms batching
   window, registry polling) start side by side against that registry;
4. they must answer identically: every sample of a fixed input set is sent to both (concurrency 8)
   and prediction, exit, answered and abstained must be equal, confidence, expected accuracy, FLOPs
   and answer threshold equal to 1e-5; every prediction of the timed runs is compared with the same
   reference too;
5. one async client (``--client``: aiohttp by default, or httpx; the same code and the same request bytes for both: the JSON
   ``{"inputs": [sample]}``, a list of one C×H×W sample, which both services accept) drives each
   server at each concurrency, ``--reps`` repetitions, alternating which server goes first; the table
   holds the medians of p50, p99 and req/s and the medians of the per-repetition ratios
   pcee/mlflow (both servers measured back to back); the same client against a trivial HTTP server
   (no model) gives the client's ceiling at each concurrency, and cells near it are marked client-bound;
6. mlflow's request path is timed in-process (JSON parsing, pyfunc predict, DataFrame -> JSON) next
   to the bare early-exit runner, to show where mlflow's time goes.

Goals (issue 14): digits: >= 4× mlflow's req/s at concurrency 8 and <= 0.5× mlflow's p50 at
concurrency 1; the CIFAR-size model: >= 1.5× mlflow's req/s (checked at concurrency 8).

``--quick`` is a smoke configuration (digits only, random-init weights, concurrency 1 and 8, tiny
request counts, one repetition): its numbers are not a measurement.
"""

# no ``from __future__ import annotations``: the smoke test loads this file without registering it in
# sys.modules (tests/benchmarks/bench_scripts.py), where dataclasses cannot resolve string annotations
import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.harness import (
    QUIET_ENV,
    Cell,
    Processes,
    build_digits_bundle,
    drive,
    free_port,
    med,
    request_bodies,
    serve_command,
    stop_on_sigterm,
)
from benchmarks.http_clients import CLIENTS, http_client
from pcee_dev.mlflow_server import mlflow_server_cmd

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: mlflow, uvicorn
SCRIPT = "benchmarks/serve_vs_mlflow.py"

#: per model: (ratio, concurrency, target, op, text), checked on the median of the per-repetition ratios
GOALS = {
    "digits": [
        ("rps_ratio", 8, 4.0, ">=", "pcee req/s >= 4× mlflow's at concurrency 8"),
        ("p50_ratio", 1, 0.5, "<=", "pcee p50 <= 0.5× mlflow's at concurrency 1"),
    ],
    "cifar": [("rps_ratio", 8, 1.5, ">=", "pcee req/s >= 1.5× mlflow's at concurrency 8")],
}
EXACT_FIELDS = ("prediction", "exit", "answered", "abstained")
CLOSE_FIELDS = ("confidence", "expected_accuracy", "flops", "answer_threshold")
CLOSE_TOL = 1e-5  # relative (and absolute near 0)
DIGITS_DELTA = 0.9
CIFAR_DELTA = 0.5
REQUEST_TIMEOUT_S = 120.0
CLIENT_BOUND_SHARE = 0.5  # a cell at >= this share of the client's ceiling is limited by the client too

#: a trivial HTTP/1.1 keep-alive server (no model, one constant answer in both servers' formats): the
#: client's ceiling, measured with the same client, bytes and concurrency as the real servers
ECHO_SERVER = r"""
import asyncio, sys
BODY = b'{"results": [{"prediction": 0}], "predictions": [{"prediction": 0}]}'
RESP = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":", 1)[1])
            if n:
                await reader.readexactly(n)
            writer.write(RESP)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def progress(msg: str) -> None:
    print(f"[serve_vs_mlflow {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def tracking_env(uri: str) -> Iterator[None]:
    """MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI set to ``uri`` in this process (and no download
    progress bars), restored afterwards."""
    new = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- models -----------------------------------------------------------------------------------------


@dataclass
class ModelCase:
    key: str  # digits | cifar
    registered_name: str
    description: str
    weights: str
    inputs: np.ndarray  # (N, C, H, W) float32: the fixed input set (identity check and load)
    bundle_dir: Path
    n_requests: int
    exit_histogram: dict[int, int] = field(default_factory=dict)


def build_digits(out: Path, epochs: int, seed: int, quick: bool) -> ModelCase:
    from pcee.data.datasets import load_dataset
    from pcee.models.registry import build_model

    meta = {"benchmark": "serve_vs_mlflow"}
    build_digits_bundle(out, delta=DIGITS_DELTA, epochs=epochs, seed=seed, meta=meta, progress=progress)
    weights = (
        f"trained here for {epochs} epoch(s), joint regime, seed {seed}" if epochs > 0 else "random initialisation"
    )
    x = load_dataset("digits", seed=0).test.x.astype(np.float32)
    n_inputs = 64 if quick else len(x)
    return ModelCase(
        key="digits",
        registered_name="pcee-digits-small-cnn",
        description=f"small-cnn (digits preset) on 1x8x8 digits, {build_model('small-cnn').num_exits} exits, "
        f"PCEE δ = {DIGITS_DELTA}",
        weights=weights,
        inputs=x[:n_inputs],
        bundle_dir=out,
        n_requests=0,
    )


def build_cifar(out: Path, spec: str, seed: int) -> ModelCase:
    import torch

    from pcee.bundle import ModelBundle
    from pcee.models.flops import measure_exit_flops
    from pcee.models.registry import build_model
    from pcee.policies.registry import build_policy

    name, _, preset = spec.partition(":")
    torch.manual_seed(seed)
    model = build_model(name, preset=preset or None, num_classes=10, in_chans=3, img_size=32).eval()
    shape = (3, 32, 32)
    rng = np.random.default_rng(seed)
    fit_x = rng.random((256, *shape), dtype=np.float32)
    fit_y = rng.integers(0, 10, 256)
    with torch.inference_mode():
        logits = torch.stack(model(torch.as_tensor(fit_x)), dim=1).numpy()
    flops = measure_exit_flops(model, shape)
    policy = build_policy("pcee", delta=CIFAR_DELTA, min_count=1).fit(logits, fit_y, flops)
    meta = {"dataset": "uniform-noise-3x32x32", "input_shape": list(shape), "benchmark": "serve_vs_mlflow"}
    ModelBundle(model, policy, flops, meta).save(out)
    token = "".join(ch if ch.isalnum() else "-" for ch in spec)
    return ModelCase(
        key="cifar",
        registered_name=f"pcee-cifar-size-{token}",
        description=f"{spec} on 3x32x32 (CIFAR size), {model.num_exits} exits, {flops[-1] / 1e6:.0f} MFLOPs to the "
        f"final exit, PCEE δ = {CIFAR_DELTA}",
        weights="random initialisation (speed benchmark only; policy fitted on uniform noise with random labels)",
        inputs=np.random.default_rng(seed + 1).random((64, *shape), dtype=np.float32),
        bundle_dir=out,
        n_requests=0,
    )


def register(case: ModelCase, tracking_uri: str, artifact_root: Path | None) -> str:
    """Log and register the bundle as pcee's pyfunc model; make it the champion. Returns the version."""
    import mlflow

    from pcee.registry import log_and_register, promote

    with tracking_env(tracking_uri):
        if artifact_root is not None:  # a SQLite tracking URI: keep artifacts in the temp dir
            mlflow.set_tracking_uri(tracking_uri)
            if mlflow.get_experiment_by_name("serve-vs-mlflow") is None:
                mlflow.create_experiment("serve-vs-mlflow", artifact_location=artifact_root.as_uri())
        _, version = log_and_register(
            experiment="serve-vs-mlflow",
            run_name=f"serve-vs-mlflow-{case.key}",
            model_name=case.registered_name,
            bundle_dir=case.bundle_dir,
            params={"benchmark": "serve_vs_mlflow", "model": case.description, "weights": case.weights},
            metrics={},
            tags={"benchmark": "serve_vs_mlflow"},
            description=f"serve_vs_mlflow benchmark model: {case.description}; {case.weights}",
        )
        promote(case.registered_name, version)
    return version


# --- the client -------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str  # mlflow | pcee
    url: str
    path: str  # /invocations | /predict
    results_key: str  # predictions | results


async def run_cell(
    server: Server, bodies: list[bytes], n: int, concurrency: int, keep: bool = False, client: str = "aiohttp"
) -> Cell:
    """Send ``n`` requests (samples in order, cycling) with ``concurrency`` clients over one
    ``client`` session (see :data:`CLIENTS`); the same code, headers and bytes for both servers."""
    url = server.url.rstrip("/") + server.path
    async with http_client(client, concurrency, REQUEST_TIMEOUT_S) as (post, transport_errors):
        return await drive(
            post, transport_errors, url, bodies, n, concurrency, server.results_key, keep=keep, server=server.name
        )


def _close(a: Any, b: Any) -> bool:
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    return abs(fa - fb) <= CLOSE_TOL * max(1.0, abs(fa), abs(fb))


def compare(reference: dict[int, dict], other: dict[int, dict], n: int) -> dict[str, Any]:
    """Field-by-field comparison of two servers' answers to the same ``n`` samples."""
    mismatches = []
    for k in range(n):
        a, b = reference.get(k), other.get(k)
        if a is None or b is None:
            mismatches.append({"sample": k, "field": "answer", "mlflow": a is not None, "pcee": b is not None})
            continue
        for f in EXACT_FIELDS:
            if a.get(f) != b.get(f):
                mismatches.append({"sample": k, "field": f, "mlflow": a.get(f), "pcee": b.get(f)})
        for f in CLOSE_FIELDS:
            if not _close(a.get(f), b.get(f)):
                mismatches.append({"sample": k, "field": f, "mlflow": a.get(f), "pcee": b.get(f)})
    bad = {m["sample"] for m in mismatches}
    return {
        "samples": n,
        "identical": n - len(bad),
        "fields_exact": list(EXACT_FIELDS),
        "fields_close": list(CLOSE_FIELDS),
        "tolerance": CLOSE_TOL,
        "mismatches": mismatches[:20],
        "mismatch_count": len(mismatches),
    }


# --- where mlflow's time goes -----------------------------------------------------------------------


def mlflow_breakdown(case: ModelCase, tracking_uri: str, iters: int, dst: Path) -> dict[str, Any]:
    """mlflow's /invocations work for one request, timed in this process (no HTTP), beside the bare
    early-exit runner and pcee's JSON parsing.

    The timings run in a worker thread, as the mlflow server runs ``invocations`` (asyncio.to_thread),
    and round-robin (one call of each step per round, median over rounds), so that the noise of a
    shared machine falls on every step alike."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow.pyfunc
    import torch
    from mlflow.pyfunc import scoring_server as ss

    from pcee.serving.inputs import arrays_from_json, parse_json_body

    threads_before = torch.get_num_threads()
    body = request_bodies(case.inputs[:1], list_of_one=True)[0]
    dst.mkdir(parents=True, exist_ok=True)
    with tracking_env(tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{case.registered_name}@champion", dst_path=str(dst))
    mlflow_threads = torch.get_num_threads()  # the pyfunc's load_context sets it, as in the mlflow server
    schema = model.metadata.get_input_schema()
    runner = model.unwrap_python_model().runner
    parsed = ss._parse_json_data(body, model.metadata, schema).data
    x = np.ascontiguousarray(np.asarray(parsed, dtype=np.float32))
    shape = tuple(x.shape[1:])
    pred = model.predict(parsed)
    steps: dict[str, Callable[[], Any]] = {
        "invocations_total_ms": lambda: ss.invocations(body, "application/json", model, schema),
        "mlflow_parse_json_ms": lambda: ss._parse_json_data(body, model.metadata, schema),
        "pyfunc_predict_ms": lambda: model.predict(parsed),
        "predictions_to_json_ms": lambda: ss.predictions_to_json(pred, io.StringIO()),
        "runner_ms_mlflow_threads": lambda: runner.run(x),
        "pcee_parse_json_ms": lambda: arrays_from_json(parse_json_body(body), shape, 256),
    }

    def rounds(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()  # warm
        for _ in range(iters):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) * 1000.0 for k, v in times.items()}

    def measure() -> dict[str, float]:
        out = rounds(steps)
        torch.set_num_threads(1)  # pcee's batch worker runs the model with one torch thread
        out.update(rounds({"runner_ms_1_thread": lambda: runner.run(x)}))
        return out

    try:
        with ThreadPoolExecutor(1) as pool:
            timings = pool.submit(measure).result()
    finally:
        torch.set_num_threads(threads_before)
    return {"iterations": iters, "mlflow_torch_threads": mlflow_threads, **timings}


PCEE_HISTOGRAMS = ("pcee_batch_size", "pcee_store_commit_seconds", "pcee_prediction_latency_seconds")


def pcee_counters(url: str) -> dict[str, float]:
    """``_sum`` and ``_count`` of pcee's batch-size, commit-time and batcher-latency histograms."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0] in PCEE_HISTOGRAMS:
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def pcee_server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What pcee's service saw during one cell: mean samples per micro-batch, mean commit time per
    batch and mean time from enqueue to answer (batching wait + model + bookkeeping, before the commit)."""

    def delta(name: str) -> float:
        return after.get(name, float("nan")) - before.get(name, 0.0)

    batches = delta("pcee_batch_size_count")
    commits = delta("pcee_store_commit_seconds_count")
    answers = delta("pcee_prediction_latency_seconds_count")
    return {
        "mean_batch": delta("pcee_batch_size_sum") / batches if batches > 0 else float("nan"),
        "commit_ms": 1000 * delta("pcee_store_commit_seconds_sum") / commits if commits > 0 else float("nan"),
        "batcher_ms": 1000 * delta("pcee_prediction_latency_seconds_sum") / answers if answers > 0 else float("nan"),
    }


# --- the benchmark ----------------------------------------------------------------------------------


def bench_model(
    case: ModelCase, args: argparse.Namespace, procs: Processes, tracking_uri: str, tmp: Path
) -> dict[str, Any]:
    """Start both servers on ``case``'s champion, check identity, time them, stop them."""
    name = case.registered_name
    mlflow_port, pcee_port = free_port(), free_port()
    mlflow_cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{name}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(mlflow_port),
        "--workers",
        str(args.mlflow_workers),
    ]
    pcee_cmd = serve_command(
        pcee_port, f"sqlite:///{tmp / f'traffic-{case.key}.db'}", "--model-name", name, poll_interval_s=None
    )
    progress(f"{case.key}: starting mlflow models serve (:{mlflow_port}) and pcee serve (:{pcee_port})")
    t0 = time.perf_counter()
    mlflow_proc = procs.start(f"mlflow-serve-{case.key}", mlflow_cmd, f"http://127.0.0.1:{mlflow_port}")
    pcee_proc = procs.start(f"pcee-serve-{case.key}", pcee_cmd, f"http://127.0.0.1:{pcee_port}")
    echo_port = free_port()
    echo_proc = procs.start(
        f"echo-{case.key}", [sys.executable, "-c", ECHO_SERVER, str(echo_port)], f"http://127.0.0.1:{echo_port}"
    )
    try:
        procs.wait_healthy([mlflow_proc, pcee_proc, echo_proc], timeout=args.startup_timeout)
        startup_s = time.perf_counter() - t0
        health = httpx.get(f"{pcee_proc.url}/health", timeout=5).json()
        servers = [
            Server("mlflow", mlflow_proc.url, "/invocations", "predictions"),
            Server("pcee", pcee_proc.url, "/predict", "results"),
        ]
        bodies = request_bodies(case.inputs, list_of_one=True)

        # identity: every sample of the fixed set, to both, at concurrency 8 (pcee's batching path)
        progress(f"{case.key}: identity check on {len(bodies)} samples")
        ref = asyncio.run(run_cell(servers[0], bodies, len(bodies), 8, keep=True, client=args.client))
        got = asyncio.run(run_cell(servers[1], bodies, len(bodies), 8, keep=True, client=args.client))
        identity = compare(ref.answers, got.answers, len(bodies))
        identity["errors"] = {"mlflow": dict(ref.error_kinds), "pcee": dict(got.error_kinds)}
        reference = {k: int(a["prediction"]) for k, a in ref.answers.items()}
        case.exit_histogram = dict(sorted(Counter(int(a["exit"]) for a in ref.answers.values()).items()))

        warm = max(2 * max(args.concurrency), 16 if args.quick else 64)
        for srv in servers:
            asyncio.run(run_cell(srv, bodies, warm, max(args.concurrency), client=args.client))

        cells: dict[tuple[str, int], list[Cell]] = {}
        load_mismatch = Counter()
        pcee_side: dict[int, list[dict[str, float]]] = {}
        for rep in range(args.reps):
            for ci, conc in enumerate(args.concurrency):
                order = servers if (rep + ci) % 2 == 0 else servers[::-1]
                for srv in order:
                    before = pcee_counters(srv.url) if srv.name == "pcee" else None
                    cell = asyncio.run(run_cell(srv, bodies, case.n_requests, conc, client=args.client))
                    if before is not None:
                        pcee_side.setdefault(conc, []).append(pcee_server_side(before, pcee_counters(srv.url)))
                    cells.setdefault((srv.name, conc), []).append(cell)
                    load_mismatch[srv.name] += sum(
                        1 for k, p in cell.predictions if k in reference and reference[k] != p
                    )
                    progress(
                        f"{case.key} rep {rep + 1}/{args.reps} c={conc:<2} {srv.name:<6} p50 {cell.p(50):7.2f} ms  "
                        f"p99 {cell.p(99):7.2f} ms  {cell.rps:7.1f} req/s  errors {cell.errors}"
                    )
        # the client's ceiling: the same client, bytes and concurrency against the trivial server
        echo = Server("echo", echo_proc.url, "/predict", "results")
        ceiling: dict[int, list[float]] = {}
        for _ in range(min(3, args.reps)):
            for conc in args.concurrency:
                ceiling.setdefault(conc, []).append(
                    asyncio.run(run_cell(echo, bodies, case.n_requests, conc, client=args.client)).rps
                )
        progress(f"{case.key}: client ceiling " + ", ".join(f"c={c}: {med(v):.0f} req/s" for c, v in ceiling.items()))
    finally:
        procs.stop(echo_proc)
        procs.stop(pcee_proc)
        procs.stop(mlflow_proc)

    rows = []
    for (srv_name, conc), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append(
            {
                "server": srv_name,
                "concurrency": conc,
                "p50_ms": med([c.p(50) for c in runs]),
                "p99_ms": med([c.p(99) for c in runs]),
                "req_per_s": med([c.rps for c in runs]),
                "requests_per_rep": case.n_requests,
                "errors": sum(c.errors for c in runs),
                "error_kinds": dict(sum((c.error_kinds for c in runs), Counter())),
                "reps": [{"p50_ms": c.p(50), "p99_ms": c.p(99), "req_per_s": c.rps, "errors": c.errors} for c in runs],
            }
        )
    ratios = []
    for conc in args.concurrency:
        m, p = cells[("mlflow", conc)], cells[("pcee", conc)]
        rps_r = [b.rps / a.rps for a, b in zip(m, p, strict=True)]
        p50_r = [b.p(50) / a.p(50) for a, b in zip(m, p, strict=True)]
        side = pcee_side.get(conc, [])
        ceiling_rps = med(ceiling.get(conc, []))
        busiest = max(med([c.rps for c in m]), med([c.rps for c in p]))
        ratios.append(
            {
                "concurrency": conc,
                "client_ceiling_rps": ceiling_rps,
                "client_bound": bool(busiest >= CLIENT_BOUND_SHARE * ceiling_rps),
                "pcee_server_side": {k: med([d[k] for d in side]) for k in ("mean_batch", "commit_ms", "batcher_ms")},
                "rps_ratio": med(rps_r),
                "p50_ratio": med(p50_r),
                "rps_ratio_reps": rps_r,
                "p50_ratio_reps": p50_r,
                "rps_ratio_of_medians": med([c.rps for c in p]) / med([c.rps for c in m]),
                "p50_ratio_of_medians": med([c.p(50) for c in p]) / med([c.p(50) for c in m]),
            }
        )
    breakdown = None
    if not args.no_breakdown:
        progress(f"{case.key}: timing mlflow's request path in-process")
        iters = args.breakdown_iters or (30 if args.quick else 200 if case.key == "digits" else 40)
        try:  # a diagnostic: its failure must not lose the measurements
            breakdown = mlflow_breakdown(case, tracking_uri, iters, tmp / f"breakdown-{case.key}")
        except Exception as err:
            progress(f"{case.key}: the in-process timing failed: {type(err).__name__}: {err}")
            breakdown = {"error": f"{type(err).__name__}: {err}"}
    return {
        "model": case.key,
        "registered_name": name,
        "description": case.description,
        "weights": case.weights,
        "input_shape": list(case.inputs.shape[1:]),
        "fixed_inputs": len(case.inputs),
        "exit_histogram_fixed_inputs": case.exit_histogram,
        "startup_s": startup_s,
        "pcee_health": {k: health.get(k) for k in ("model_version", "policy", "delta", "num_exits", "logging")},
        "identity": identity,
        "identical": identity["identical"] == identity["samples"] and identity["samples"] > 0,
        "load_prediction_mismatches": dict(load_mismatch),
        "cells": rows,
        "ratios": ratios,
        "breakdown": breakdown,
    }


def _meets(value: float | None, op: str, target: float) -> bool:
    return bool(value is not None and math.isfinite(value) and (value >= target if op == ">=" else value <= target))


def goals_of(result: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    out = []
    by_conc = {r["concurrency"]: r for r in result["ratios"]}
    for key, conc, target, op, text in GOALS[result["model"]]:
        r = by_conc.get(conc)
        value = r[key] if r else float("nan")
        met = _meets(value, op, target)
        reps = r[f"{key}_reps"] if r else []
        out.append(
            {
                "model": result["model"],
                "goal": text,
                "metric": key,
                "concurrency": conc,
                "target": target,
                "op": op,
                "measured": value,
                "met": met,
                "reps_met": sum(_meets(v, op, target) for v in reps),
                "reps": len(reps),
                "client_bound": bool(r["client_bound"]) if r else False,
                "quick": quick,
            }
        )
    return out


def fmt(v: float, digits: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _client_name(payload: dict[str, Any]) -> str:
    # reports written before ``--client`` existed used httpx
    return {"aiohttp": "aiohttp.ClientSession", "httpx": "httpx.AsyncClient"}[payload.get("client", "httpx")]


def report(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        "# pcee serve vs mlflow models serve (same registered champion)",
        "",
        f"_Reproduce: `{payload['command']}` (scale **{payload['scale']}**; wall time {payload['wall_seconds']:.0f} s)._",
        "",
        f"Machine: {m['cpu_count']} CPU cores ({m['platform']}), Python {m['python']}, torch {m['torch']}, mlflow "
        f"{m['mlflow']}{'' if m['omp_num_threads'] is None else ', OMP_NUM_THREADS=' + m['omp_num_threads']}; load average {m['loadavg_start'][0]:.1f} at the start and {m['loadavg_end'][0]:.1f} at the "
        "end. **The machine is shared and noisy** (other jobs run beside this benchmark): absolute numbers move "
        "between runs; the ratios are paired (both servers measured back to back in each repetition, alternating "
        "which goes first) and are the numbers to read.",
        "",
        f"Setup: {payload['tracking']}. `mlflow models serve -m models:/NAME@champion --env-manager local "
        f"--workers {payload['mlflow_workers']}` (one uvicorn worker unless `--mlflow-workers`; the pyfunc sets torch to "
        "min(4, cores) threads) and `python -m pcee.cli serve --model-name NAME` with its defaults (one process, "
        "micro-batching up to 64 samples within 2 ms, one torch thread, every request logged to its SQLite traffic "
        "store, 10% of inputs stored, 2% shadow runs to the final exit, registry polled every 10 s) run side by "
        f"side on the same champion. One {_client_name(payload)} per cell sends the same bytes to both: "
        '`{"inputs": [sample]}` (one C×H×W sample in a list of one). '
        f"{payload['requests_note']} Medians over {payload['reps']} repetition(s); ratio = median of the per-repetition "
        "ratios pcee/mlflow (in brackets: the smallest and largest of them). **Client ceiling**: the same client, bytes and concurrency against a trivial HTTP server "
        "(no model, a constant answer) started beside them; a row marked *client-bound* had a server at >= "
        f"{CLIENT_BOUND_SHARE:g}× that ceiling, where the load generator (one Python process sharing the cores with "
        "the servers) limits both servers and "
        "compresses the ratio towards 1.",
        "",
    ]
    for res in payload["models"]:
        ident = res["identity"]
        lines += [
            f"## {res['model']}: {res['description']}",
            "",
            f"Weights: {res['weights']}. Registered as `{res['registered_name']}` (champion). Start-up of both servers "
            f"{res['startup_s']:.0f} s. Exits taken on the fixed inputs: "
            + ", ".join(f"exit {k}: {v}" for k, v in res["exit_histogram_fixed_inputs"].items())
            + ".",
            "",
            f"**Identical answers: {'yes' if res['identical'] else 'NO'}** — {ident['identical']}/{ident['samples']} "
            f"samples of the fixed input set answered identically ({', '.join(ident['fields_exact'])} equal; "
            f"{', '.join(ident['fields_close'])} within {ident['tolerance']:g}); prediction mismatches against that "
            f"reference during the timed runs: mlflow {res['load_prediction_mismatches'].get('mlflow', 0)}, pcee "
            f"{res['load_prediction_mismatches'].get('pcee', 0)}.",
            "",
            "| server | concurrency | p50 ms | p99 ms | req/s | errors |",
            "|---|---|---|---|---|---|",
        ]
        for row in res["cells"]:
            lines.append(
                f"| {row['server']} | {row['concurrency']} | {fmt(row['p50_ms'])} | {fmt(row['p99_ms'])} | "
                f"{fmt(row['req_per_s'], 1)} | {row['errors']} |"
            )
        lines += [
            "",
            "| concurrency | req/s pcee/mlflow | p50 pcee/mlflow | client ceiling req/s | pcee: samples per batch "
            "| pcee: log ms per batch | pcee: enqueue -> answer ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["ratios"]:
            side = r["pcee_server_side"]
            bound = " (client-bound)" if r["client_bound"] else ""
            reps = {
                k: [v for v in r[f"{k}_reps"] if v is not None and math.isfinite(v)] for k in ("rps_ratio", "p50_ratio")
            }
            spread = {k: f" ({fmt(min(v))}–{fmt(max(v))})" if len(v) > 1 else "" for k, v in reps.items()}
            lines.append(
                f"| {r['concurrency']} | {fmt(r['rps_ratio'])}×{spread['rps_ratio']} | "
                f"{fmt(r['p50_ratio'])}×{spread['p50_ratio']} | "
                f"{fmt(r['client_ceiling_rps'], 0)}{bound} | {fmt(side['mean_batch'], 1)} | {fmt(side['commit_ms'])} | "
                f"{fmt(side['batcher_ms'])} |"
            )
        lines.append("")
        b = res.get("breakdown")
        if b and "error" in b:
            lines += [f"The in-process timing of mlflow's request path failed: {b['error']}", ""]
        elif b:
            c1 = next((r for r in res["cells"] if r["server"] == "mlflow" and r["concurrency"] == 1), None)
            http = f" (its HTTP p50 at concurrency 1, measured at another moment: {fmt(c1['p50_ms'])} ms)" if c1 else ""
            lines += [
                f"Where mlflow's time goes (one request, in-process in a worker thread as the server runs it, no HTTP; "
                f"median of {b['iterations']} rounds): `invocations()` {fmt(b['invocations_total_ms'], 3)} ms{http} = JSON -> "
                f"array {fmt(b['mlflow_parse_json_ms'], 3)} ms + pyfunc predict {fmt(b['pyfunc_predict_ms'], 3)} ms (of "
                f"which the early-exit runner {fmt(b['runner_ms_mlflow_threads'], 3)} ms with the pyfunc's "
                f"{b['mlflow_torch_threads']} torch threads; {fmt(b['runner_ms_1_thread'], 3)} ms with 1) + DataFrame -> "
                f"JSON {fmt(b['predictions_to_json_ms'], 3)} ms. pcee's JSON -> array check of the same body: "
                f"{fmt(b['pcee_parse_json_ms'], 3)} ms.",
                "",
            ]
    lines += ["## Goals (issue 14)", ""]
    if payload["scale"] == "quick":
        lines += [
            "_Quick smoke run: tiny request counts and one repetition; these verdicts are not a measurement._",
            "",
        ]
    for g in payload["goals"]:
        sym = "×"
        bound = (
            " — the faster server ran at >= half the client's ceiling here, so the ratio is compressed"
            * g["client_bound"]
        )
        lines.append(
            f"- {'PASS' if g['met'] else 'FAIL'} — {g['model']}: {g['goal']}: measured {fmt(g['measured'])}{sym} "
            f"(goal {g['op']} {g['target']:g}{sym}; {g['reps_met']}/{g['reps']} repetitions met it){bound}"
        )
    if payload.get("skipped"):
        lines += ["", "Not run: " + "; ".join(payload["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: digits only (random init), concurrency 1 and 8, tiny request counts, one repetition",
    )
    p.add_argument("--models", nargs="+", choices=("digits", "cifar"), default=None, help="default digits cifar")
    p.add_argument("--reps", type=int, default=None, help="repetitions per cell (default 5; --quick 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 8 32 (--quick 1 8)")
    p.add_argument("--n-digits", type=int, default=None, help="requests per cell, digits (default 600; --quick 40)")
    p.add_argument("--n-cifar", type=int, default=240, help="requests per cell, CIFAR-size model (default 240)")
    p.add_argument("--digits-epochs", type=int, default=None, help="training epochs of the digits model (default 3)")
    p.add_argument(
        "--cifar-model",
        default="attach-exits:tv-resnet18",
        help="NAME[:PRESET] of the CIFAR-size model (default attach-exits:tv-resnet18; e.g. msdnet:cifar10-anytime)",
    )
    p.add_argument(
        "--client",
        choices=CLIENTS,
        default="aiohttp",
        help="the load generator (default aiohttp; httpx: the client of the earlier runs, about 5x its CPU per request)",
    )
    p.add_argument("--mlflow-workers", type=int, default=1, help="uvicorn workers of mlflow models serve (default 1)")
    p.add_argument(
        "--tracking",
        choices=("server", "sqlite"),
        default="server",
        help="an MLflow tracking server (default) or a SQLite tracking URI",
    )
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds the servers may take to start")
    p.add_argument(
        "--breakdown-iters",
        type=int,
        default=None,
        help="rounds of the in-process timing (default 200 digits, 40 CIFAR-size; --quick 30)",
    )
    p.add_argument("--no-breakdown", action="store_true", help="skip the in-process timing of mlflow's request path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state dir (logs) for inspection")
    p.add_argument("--report-dir", type=Path, default=REPO / "reports")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: rebuild the report (goals, .md, .json) in --report-dir from a serve_vs_mlflow.json",
    )
    args = p.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        payload["goals"] = [g for res in payload["models"] for g in goals_of(res, payload["scale"] == "quick")]
        write_report(payload, Path(args.report_dir))
        return 0 if payload["all_identical"] else 1
    args.models = args.models or (["digits"] if args.quick else ["digits", "cifar"])
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.concurrency is None:
        args.concurrency = [1, 8] if args.quick else [1, 8, 32]
    if args.n_digits is None:
        args.n_digits = 40 if args.quick else 600
    args.digits_epochs = args.digits_epochs if args.digits_epochs is not None else (0 if args.quick else 3)
    if args.reps < 1 or min(args.concurrency) < 1 or args.n_digits < 1 or args.n_cifar < 1:
        p.error("--reps, --concurrency, --n-digits and --n-cifar must be >= 1")
    if (
        args.mlflow_workers < 1
        or args.digits_epochs < 0
        or (args.breakdown_iters is not None and args.breakdown_iters < 1)
    ):
        p.error("--mlflow-workers and --breakdown-iters must be >= 1, --digits-epochs >= 0")

    t_start = time.perf_counter()
    loadavg_start = os.getloadavg()
    quiet = dict(QUIET_ENV)
    tmp = Path(tempfile.mkdtemp(prefix="pcee-serve-vs-mlflow-"))  # removed in the finally below
    env = {
        **os.environ,
        **quiet,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow models serve runs `uvicorn`
        "PCEE_STATE_DIR": str(tmp / "state"),
        "MPLCONFIGDIR": str(tmp / "matplotlib"),
        "TMPDIR": str(tmp),  # mlflow models serve downloads the model into a temp dir
    }
    for var in ("PCEE_MODEL_NAME", "PCEE_TRAFFIC_URL"):  # nothing of the caller's deployment
        env.pop(var, None)
    procs = Processes(tmp, env)
    results: list[dict[str, Any]] = []
    try:
        with stop_on_sigterm():
            if args.tracking == "server":
                port = free_port()
                tracking_uri = f"http://127.0.0.1:{port}"
                artifact_root = None
                cmd = mlflow_server_cmd(port, str(tmp / "mlflow-artifacts"), backend=f"sqlite:///{tmp / 'mlflow.db'}")
                progress(f"starting the MLflow tracking server on {tracking_uri}")
                tracking = procs.start("mlflow-tracking", cmd, tracking_uri)
                tracking_desc = (
                    "an MLflow tracking server started here (`mlflow server`, SQLite backend, proxied artifacts, "
                    "one worker) holds the registry"
                )
            else:
                tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
                artifact_root = tmp / "mlflow-artifacts"
                artifact_root.mkdir(parents=True)
                tracking = None
                tracking_desc = "the registry is a SQLite tracking URI in a temporary directory (no tracking server)"
            for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
                procs.env[key] = tracking_uri

            cases = []  # build the bundles while the tracking server starts
            if "digits" in args.models:
                progress("digits: building the bundle")
                case = build_digits(tmp / "bundles" / "digits", args.digits_epochs, args.seed, args.quick)
                case.n_requests = args.n_digits
                cases.append(case)
            if "cifar" in args.models:
                progress(f"cifar: building the bundle ({args.cifar_model}, random init)")
                case = build_cifar(tmp / "bundles" / "cifar", args.cifar_model, args.seed)
                case.n_requests = args.n_cifar
                cases.append(case)
            if tracking is not None:
                procs.wait_healthy([tracking], timeout=args.startup_timeout)
            for case in cases:
                version = register(case, tracking_uri, artifact_root)
                progress(f"{case.key}: registered {case.registered_name} version {version} as champion")
                results.append(bench_model(case, args, procs, tracking_uri, tmp))
    finally:
        procs.stop_all()
        if args.keep_state:
            progress(f"state kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    import mlflow
    import torch

    seconds = time.perf_counter() - t_start
    command = " ".join(["uv run --locked python", SCRIPT, *(argv if argv is not None else sys.argv[1:])])
    goals = [g for res in results for g in goals_of(res, args.quick)]
    payload = {
        "command": command,
        "scale": "quick" if args.quick else "default",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mlflow": mlflow.__version__,
            "loadavg_start": list(loadavg_start),
            "loadavg_end": list(os.getloadavg()),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "tracking": tracking_desc,
        "mlflow_workers": args.mlflow_workers,
        "client": args.client,
        "reps": args.reps,
        "concurrency": args.concurrency,
        "requests_note": "Requests per cell and repetition: "
        + ", ".join(f"{c.key} {c.n_requests}" for c in cases)
        + f"; a warm-up before the first repetition; concurrency {', '.join(map(str, args.concurrency))}.",
        "seed": args.seed,
        "wall_seconds": seconds,
        "models": results,
        "goals": goals,
        "all_identical": all(r["identical"] for r in results),
    }
    write_report(payload, Path(args.report_dir))
    return 0 if payload["all_identical"] else 1


def write_report(payload: dict[str, Any], out_dir: Path) -> None:
    """Write serve_vs_mlflow.json and .md into ``out_dir`` and print the report."""
    from pcee.atomic import to_jsonable, write_text_atomic

    payload = to_jsonable(payload, nonfinite_as_null=True)
    text = report(payload)
    write_text_atomic(out_dir / "serve_vs_mlflow.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out_dir / "serve_vs_mlflow.md", text)
    print(text, flush=True)
    progress(f"wrote {out_dir / 'serve_vs_mlflow.md'} and .json ({payload['wall_seconds']:.0f} s of measuring)")


if __name__ == "__main__":
    sys.exit(main())
