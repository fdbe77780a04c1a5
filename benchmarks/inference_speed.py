"""Realised early-exit speedup of EarlyExitRunner vs the FLOPs-predicted speedup, on CPU.

For each model (random weights), batch 256, and each exit mix (the fraction of samples answered
at each exit, forced by a fixed-schedule policy), the realised speedup is
T(full forward, all exits) / T(EarlyExitRunner); the predicted one is F_L / mean F_exit. Their
ratio ("efficiency") is 1 when skipped work turns into saved time exactly; the target is >= 0.85.

Mixes go from "all leave at exit 1" through "all leave at exit k" to "all reach L", plus a
uniform mix and "half at exit 1, half at L".

Models: MSDNet (cifar10-anytime), the small CNN at 8x8 and 32x32, and exits attached to two library
backbones (``attach-exits``: torchvision ResNet-18 and a small timm ViT, their presets).

Run: uv run python benchmarks/inference_speed.py [--threads 1] [--models msdnet,small-cnn,small-cnn-32,tv-resnet18,timm-vit-tiny]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pcee.calibration.scores import confidence  # noqa: E402
from pcee.inference.runner import EarlyExitRunner  # noqa: E402
from pcee.models.base import index_state  # noqa: E402
from pcee.models.flops import measure_exit_flops  # noqa: E402
from pcee.models.registry import build_model  # noqa: E402
from pcee.policies.base import ExitPolicy  # noqa: E402

BATCH = 256


class ScheduleExitPolicy(ExitPolicy):
    """Leaves a fixed fraction ``mix[l]`` of the original batch at exit l, whatever the logits.

    At exit l the survivors are a fraction sum(mix[l:]) of the batch, so the first
    round(n_alive * mix[l] / sum(mix[l:])) of them leave.
    """

    name = "schedule"

    def __init__(self, mix: np.ndarray) -> None:
        self.mix = np.asarray(mix, dtype=np.float64) / np.sum(mix)

    def exit_mask(self, level: int, logits: np.ndarray) -> np.ndarray:
        n = len(logits)
        remaining = self.mix[level:].sum()
        m = int(round(n * self.mix[level] / remaining)) if remaining > 0 else n
        mask = np.zeros(n, dtype=bool)
        mask[:m] = True
        return mask

    def expected_accuracy(self, level: int, logits: np.ndarray) -> np.ndarray:
        return confidence(logits, "max_prob")


def mixes(num_exits: int) -> list[tuple[str, np.ndarray]]:
    out = []
    for k in range(num_exits):
        m = np.zeros(num_exits)
        m[k] = 1
        out.append((f"all at exit {k + 1}", m))
    out.append(("uniform", np.full(num_exits, 1.0 / num_exits)))
    half = np.zeros(num_exits)
    half[[0, -1]] = 0.5
    out.append(("half exit 1, half L", half))
    return out


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(label: str, model, input_shape, n_batches: int, repeats: int) -> list[tuple]:
    model.eval()
    flops = measure_exit_flops(model, input_shape)
    x = torch.rand(n_batches * BATCH, *input_shape).numpy()
    xt = torch.as_tensor(x)

    def full():
        with torch.inference_mode():
            for s in range(0, len(xt), BATCH):
                model(xt[s : s + BATCH])

    full()  # warm-up
    rows = []
    for name, mix in mixes(model.num_exits):
        runner = EarlyExitRunner(model, ScheduleExitPolicy(mix), flops, batch_size=BATCH)
        res = runner.run(x)  # warm-up, and the realised mix
        alive = [int(v) for v in (res.exit[:BATCH][None, :] >= np.arange(model.num_exits)[:, None]).sum(axis=1)]

        def segments_only():
            # the same compacted segment calls without policy, numpy or bookkeeping: the time the
            # model itself needs for this mix (isolates the runner's overhead from FLOPs-vs-time)
            with torch.inference_mode():
                for s in range(0, len(xt), BATCH):
                    state = model.initial_state(xt[s : s + BATCH])
                    for level, n_alive in enumerate(alive):
                        if n_alive == 0:
                            break
                        state, _ = model.forward_segment(level, index_state(state, slice(0, n_alive)))

        t_full = timed(full, repeats)  # measured next to each mix: the machine's load drifts
        t_run = timed(lambda: runner.run(x), repeats)
        t_seg = timed(segments_only, repeats)
        predicted = flops[-1] / res.flops.mean()
        realised = t_full / t_run
        rows.append((label, name, res.flops.mean() / flops[-1], t_full, t_run, predicted, realised, realised / predicted, t_seg / t_run))
    return rows


#: model key -> (builder, input shape, batches of 256, default timing repeats)
CONFIGS = {
    "msdnet": (lambda: build_model("msdnet", preset="cifar10-anytime"), (3, 32, 32), 1, 2),
    "small-cnn": (lambda: build_model("small-cnn"), (1, 8, 8), 8, 15),
    "small-cnn-32": (lambda: build_model("small-cnn", in_chans=3, img_size=32), (3, 32, 32), 2, 5),
    # exits on library backbones (issue 12): torchvision ResNet-18 and a small timm ViT, random weights
    "tv-resnet18": (lambda: build_model("attach-exits", preset="tv-resnet18"), (3, 32, 32), 1, 3),
    "timm-vit-tiny": (lambda: build_model("attach-exits", preset="timm-vit-tiny"), (3, 32, 32), 1, 3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=0, help="timing repeats (default: 2 for msdnet, 15 for small-cnn)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    configs = CONFIGS
    rows = []
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        if key not in configs:
            raise SystemExit(f"unknown model {key!r}; valid: {', '.join(configs)}")
        build, shape, n_batches, repeats = configs[key]
        label = "msdnet cifar10-anytime" if key == "msdnet" else f"{key} {'x'.join(map(str, shape))}"
        if key.startswith(("tv-", "timm-")):
            label = f"attach-exits {key}"
        rows += bench(label, build(), shape, n_batches, args.repeats or repeats)

    print(f"EarlyExitRunner vs full forward, CPU, {args.threads} thread(s), batch {BATCH}, random weights (best of repeats)")
    head = f"{'model':<30}{'mix':<22}{'rel.FLOPs':>10}{'T full (s)':>11}{'T runner':>10}{'pred.':>7}{'real.':>7}{'eff.':>7}{'seg/run':>9}"
    print(head)
    print("-" * len(head))
    for label, name, rel, t_full, t_run, pred, real, eff, seg in rows:
        flag = "" if eff >= 0.85 else "  < 0.85"
        print(f"{label:<30}{name:<22}{rel:>10.3f}{t_full:>11.4f}{t_run:>10.4f}{pred:>7.2f}{real:>7.2f}{eff:>7.2f}{seg:>9.2f}{flag}")
    effs = np.array([r[-2] for r in rows])
    print()
    print("eff. = realised / FLOPs-predicted speedup; seg/run = time of the bare compacted segment calls / runner time")
    print("(near 1: the runner adds little, so a low eff. comes from time not following FLOPs in the model itself)")
    print()
    print(f"efficiency: min {effs.min():.2f}, median {np.median(effs):.2f}; {int((effs < 0.85).sum())} of {effs.size} mixes below 0.85")


if __name__ == "__main__":
    main()
