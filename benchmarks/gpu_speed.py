"""Early exit on a GPU: EarlyExitRunner against a plain forward on CUDA (issue 27's table), and the
trainer against a plain PyTorch loop.

Method (issue 27). Input from host numpy (the service's case). Both sides CUDA-synchronised (the answers
on the host). Each figure is the median over ``--repeats`` of paired ratios T(plain forward of every
exit, logits copied to host) / T(runner), each pair timed back to back. "eff" is that realised speed-up
over the FLOPs-predicted one (F_L / mean F_exit of the mix). Mixes are set by
``inference_speed.MixPolicy`` (a score threshold fitted on the benchmark's own input so that a fraction
mix[l] leaves at exit l). Random weights.

Rows per model and batch size (the input is four batches: one window of the runner's ``regroup``; the
runner decides on the device, ``decide="torch"``, the default there):

- ``eager``: the runner against the plain forward, both eager;
- ``graphs``: the runner with CUDA graphs per segment and bucketed batch size (``graphs=True``, as
  ``pcee serve --device cuda --graphs``) against the plain forward replayed from CUDA graphs of its
  segments at the batch size (the same switch on both sides).

Both runners use the latency profile of this device (``pcee.latency.measure_exit_latency`` at batch
sizes 1, 8, 64 and the batch, as ``pcee profile --device cuda`` stores it), which decides where a
split pays. Columns: eff per mix, runner / plain at "all at L" (< 1: the runner is faster), the
runner's host syncs per batch, one-sample p50 in ms of the runner and of the plain forward (50 single
samples, uniform mix). Then per model: ``pcee.training.train_model`` as it is (regime joint, batch 256,
10k random 3x32x32 images, no augmentation; one epoch untimed, two timed) against a plain loop (the same
model, SGD, summed cross-entropy of the exits, data already on the device), seconds per epoch.

Without CUDA it says so and exits 0. ``--device cpu --smoke`` runs the same code on the CPU on small
inputs (to check the script, not to measure). A time guard skips what is left after ``--budget-s``
(270 s by default: the whole run stays under 5 minutes on an H200) and says so.

Run: uv run python benchmarks/gpu_speed.py [--repeats 5] [--models msdnet,tv-resnet18,timm-vit-tiny,small-cnn-32]
     [--batches 256,2048] [--no-train] [--budget-s 270]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from inference_speed import MixPolicy  # benchmarks/ is the script's directory

from pcee.inference.graphs import GraphedSegments, cuda_capture, eager_capture
from pcee.inference.runner import EarlyExitRunner
from pcee.latency import measure_exit_latency
from pcee.models.flops import measure_exit_flops
from pcee.models.registry import build_model

MODELS: dict[str, tuple[Callable[[], Any], tuple[int, int, int], tuple[int, ...]]] = {
    "msdnet": (lambda: build_model("msdnet", preset="cifar10-anytime"), (3, 32, 32), (256, 2048)),
    "tv-resnet18": (lambda: build_model("attach-exits", preset="tv-resnet18"), (3, 32, 32), (256, 2048)),
    "timm-vit-tiny": (lambda: build_model("attach-exits", preset="timm-vit-tiny"), (3, 32, 32), (256, 2048)),
    "small-cnn-32": (lambda: build_model("small-cnn", in_chans=3, img_size=32), (3, 32, 32), (256,)),
}
TRAINED = ("msdnet", "tv-resnet18")
SMOKE: dict[str, tuple[Callable[[], Any], tuple[int, int, int], tuple[int, ...]]] = {
    "small-cnn": (
        lambda: build_model("small-cnn", widths=(8, 8, 16), downsample=(False, True, False)),
        (1, 8, 8),
        (32,),
    ),
}


class Clock:
    """Seconds of a call, the device synchronised before and after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


class PlainForward:
    """Every exit of the model, batch by batch, the logits on the host: eager, or each segment replayed
    from a CUDA graph at the batch size (the same switch as the runner's ``graphs``)."""

    def __init__(self, model, batch: int, device: torch.device, graphs: bool) -> None:
        self.model, self.batch, self.device = model, batch, device
        eager = [lambda s, k=k: model.forward_segment(k, s) for k in range(model.num_exits)]
        capture = cuda_capture(torch.cuda.graph_pool_handle()) if device.type == "cuda" else eager_capture
        self.graphed = GraphedSegments(eager, batch, capture) if graphs else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), self.batch):
                state = self.model.initial_state(torch.as_tensor(x[s : s + self.batch]).to(self.device))
                logits = []
                for k in range(self.model.num_exits):
                    state, z = (
                        self.graphed(k, state) if self.graphed is not None else self.model.forward_segment(k, state)
                    )
                    logits.append(z)
                out.append(torch.stack(logits, 1).float().cpu().numpy())
        return np.concatenate(out)


def mixes(num_exits: int) -> list[tuple[str, np.ndarray]]:
    def mix(*pairs: tuple[int, float]) -> np.ndarray:
        m = np.zeros(num_exits)
        for level, share in pairs:
            m[level] = share
        return m

    return [
        ("uniform", np.full(num_exits, 1.0 / num_exits)),
        ("half 1, half L", mix((0, 0.5), (num_exits - 1, 0.5))),
        ("all at 1", mix((0, 1.0))),
        ("all at L", mix((num_exits - 1, 1.0))),
    ]


def bench_batch(model, shape, batch: int, graphs: bool, repeats: int, device: torch.device) -> dict[str, Any]:
    """eff per mix, runner / plain at "all at L", syncs per batch, one-sample p50s, for one switch setting."""
    rng = np.random.default_rng(0)
    x = rng.random((4 * batch, *shape), dtype=np.float32)
    clock = Clock(device)
    flops = measure_exit_flops(model, shape)
    plain = PlainForward(model, batch, device, graphs)
    ref = plain(x)  # warms the plain forward's graphs too
    sizes = sorted({1, 8, 64, batch})
    profile = measure_exit_latency(
        model, shape, batch_sizes=sizes, repeats=5, warmup=2, runner_options={"graphs": graphs, "decide": "torch"}
    )
    policies = {name: MixPolicy(m).fit(ref) for name, m in mixes(model.num_exits)}
    runner = EarlyExitRunner(
        model,
        policies["uniform"],
        flops,
        batch_size=batch,
        device=device,
        decide="torch",
        graphs=graphs,
        profile=profile,
    )
    runner.warmup(x[:batch])  # with graphs: every segment captured at every bucket
    ratios: dict[str, list[float]] = {name: [] for name in policies}
    syncs = []
    for _ in range(repeats):
        for name, policy in policies.items():
            runner.policy = policy  # the runner reads its policy's rule at each run
            before = runner.device_syncs
            t_plain = clock(lambda: plain(x))
            t_run = clock(lambda: runner.run(x))
            ratios[name].append(t_plain / t_run)
            syncs.append((runner.device_syncs - before) / 4)
    out: dict[str, Any] = {"syncs": float(np.median(syncs))}
    for name, policy in policies.items():
        exits = policy.decide(ref)
        predicted = flops[-1] / flops[exits].mean()
        out[name] = float(np.median(ratios[name])) / predicted
    out["run/plain at L"] = 1.0 / float(np.median(ratios["all at L"]))
    runner.policy = policies["uniform"]
    one_run, one_plain = [], []
    plain1 = PlainForward(model, 1, device, graphs)
    plain1(x[:1])  # captures its graphs
    for i in range(50):
        one_plain.append(clock(lambda i=i: plain1(x[i : i + 1])))
        one_run.append(clock(lambda i=i: runner.run(x[i : i + 1])))
    out["p50 run ms"], out["p50 plain ms"] = 1000 * float(np.median(one_run)), 1000 * float(np.median(one_plain))
    return out


def bench_training(build, shape, device: torch.device, n: int, epochs: int = 2) -> tuple[float, float]:
    """(trainer, plain loop) seconds per epoch."""
    from pcee.data.datasets import ArraySplit, DatasetSplits
    from pcee.training.config import TrainConfig
    from pcee.training.trainer import train_model

    rng = np.random.default_rng(0)
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    small = ArraySplit(x[:256], y[:256])
    splits = DatasetSplits("random", ArraySplit(x, y), small, small, 10, [str(c) for c in range(10)], shape)
    clock = Clock(device)

    def config(epochs: int) -> TrainConfig:
        return TrainConfig(regime="joint", epochs=epochs, batch_size=256, augment="none", device=device.type)

    torch.manual_seed(0)
    model = build()
    train_model(model, splits, config(1), progress=False)  # warm-up: cuDNN autotuning, allocator
    trainer = clock(lambda: train_model(model, splits, config(epochs), progress=False)) / epochs
    torch.manual_seed(0)
    model = build().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    xd, yd = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)

    def loop(epochs: int) -> None:
        for _ in range(epochs):
            order = torch.randperm(n, device=device)
            for s in range(0, n, 256):
                idx = order[s : s + 256]
                loss = sum(torch.nn.functional.cross_entropy(z, yd[idx]) for z in model(xd[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]  # a sum of tensors
                opt.step()

    loop(1)
    return trainer, clock(lambda: loop(epochs)) / epochs


def row(label: str, r: dict[str, Any]) -> str:
    cells = [f"{r[m]:>9.2f}" for m in ("uniform", "half 1, half L", "all at 1", "all at L")]
    return (
        f"{label:<38}{''.join(cells)}{r['run/plain at L']:>10.2f}x{r['syncs']:>8.1f}"
        f"{r['p50 run ms']:>10.2f}{r['p50 plain ms']:>10.2f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description="Early exit on a GPU: runner vs plain forward, trainer vs plain loop.")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only with --smoke, to check the script")
    p.add_argument("--smoke", action="store_true", help="a tiny model and batch (checks the script, measures nothing)")
    p.add_argument("--repeats", type=int, default=5, help="paired timings per mix (median)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="256,2048", help="batch sizes (a model's own list caps them)")
    p.add_argument("--no-train", action="store_true", help="skip the trainer rows")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip what is left after this many seconds")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_speed: no CUDA device on this machine (torch.cuda.is_available() is False): nothing measured.")
        print("The device path's logic is tested on CPU (tests/inference/test_device_path.py); run this on a GPU.")
        return 0
    if args.device == "cpu" and not args.smoke:
        raise SystemExit("gpu_speed measures a GPU: --device cpu only with --smoke")
    device = torch.device(args.device)
    start = time.perf_counter()
    models = SMOKE if args.smoke else {k: MODELS[k] for k in args.models.split(",") if k}
    batches = {int(b) for b in args.batches.split(",")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run: not a measurement)"
    print(
        f"EarlyExitRunner vs plain forward on {name}, torch {torch.__version__}; medians of {args.repeats} paired ratios"
    )
    head = f"{'model, batch, switches':<38}{'uniform':>9}{'half1/L':>9}{'all@1':>9}{'all@L':>9}{'run/plain':>11}{'syncs/b':>8}{'p50 run':>10}{'p50 plain':>10}"
    print(head)
    print("-" * len(head))
    skipped = []
    for key, (build, shape, own_batches) in models.items():
        torch.manual_seed(0)
        model = build().to(device).eval()
        for batch in [b for b in own_batches if args.smoke or b in batches]:
            for graphs in (False, True):
                label = f"{key} {batch} {'graphs' if graphs else 'eager'}"
                if time.perf_counter() - start > args.budget_s:
                    skipped.append(label)
                    continue
                print(row(label, bench_batch(model, shape, batch, graphs, args.repeats, device)), flush=True)
    print()
    print("eff = realised / FLOPs-predicted speed-up (goal: >= 0.9 at batch 2048, >= 0.8 at 256, every mix);")
    print("run/plain at 'all at L' (goal <= 1.05x); syncs/b = the runner's host syncs per batch; p50 in ms, one sample")
    if not args.no_train:
        print()
        print(f"{'trainer vs plain loop (s per epoch)':<38}{'trainer':>10}{'plain':>10}{'ratio':>8}")
        for key in [k for k in models if args.smoke or k in TRAINED]:
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"{key} training")
                continue
            build, shape, _ = models[key]
            trainer, loop = bench_training(build, shape, device, 512 if args.smoke else 10_000, 1 if args.smoke else 2)
            print(f"{key:<38}{trainer:>10.3f}{loop:>10.3f}{trainer / loop:>8.2f}", flush=True)
    if skipped:
        print(f"\nskipped (over the {args.budget_s:.0f} s budget): {', '.join(skipped)}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
