"""Realised early-exit speedup of EarlyExitRunner vs the speedup predicted from FLOPs and from a
latency profile, on CPU, per runner option.

For each model (random weights), batch 256, and each exit mix (the fraction of samples answered
at each exit), the realised speedup is T(full forward, all exits) / T(runner); the predicted one is
C_L / mean C_exit for a cumulative per-exit cost C: FLOPs (``pred.``, ``eff.``), or the latency
profile ``pcee profile`` stores in a bundle (:func:`pcee.latency.measure_exit_latency` at batch 256,
measured in every repetition beside the timings, as many timed passes as the input has batches;
``pred.t``, ``eff.t``): its plain forward over the runner's mean time per sample
(``LatencyProfile.speedup``), the runner's time to answer a batch at each exit, decisions included.
Each exit's cost over the plain forward is a ratio measured side by side in the profile's passes; the
prediction takes its median over the repetitions. ``eff.L`` takes the profile's last exit in place of its
plain forward (what this benchmark did before the profile timed a plain forward: it leaves the
runner's own overhead at the last exit out of the prediction); ``eff.s`` is eff.L with a profile of
the segments alone (method "segments", what ``pcee profile`` stored before), which leaves out the
decisions' cost. Their ratio ("efficiency") is 1 when the cost the operating point was chosen on
turns into saved time exactly; issue 14's goal is eff.t >= 0.9 in every mix (eff., on FLOPs, reported
beside it).

The mixes are set by a real score-threshold policy (``MixPolicy``, a FittedThresholdPolicy whose
per-exit thresholds are fitted on the benchmark's own input so that a fraction mix[l] leaves at
exit l), so the runner's torch decision path is what is timed. Mixes go from "all leave at exit 1"
through "all leave at exit k" to "all reach L", plus a uniform mix and "half at exit 1, half at L".

Options, measured side by side in one run (each repetition times every option, in rotating order):

- ``before``: the runner as it was before issue 14 (``LegacyRunner`` below, verbatim): the policy asked
  after every segment (three numpy confidence passes per exit), no padding
- ``new``: the default EarlyExitRunner on CPU (``decide="numpy"``: the policy's rule applied by the
  runner to one confidence pass per exit, padding to 16 rows, ``regroup=4``); bit-identical
- ``torch-decide``: ``decide="torch"``: the device path (:mod:`pcee.inference.device`) run on the CPU:
  decisions, bookkeeping and regrouping in torch, answer columns once per window of ``regroup`` batches
  from a logits buffer (the accelerator path; no latency profile, so every split is made); bit-identical
- ``per-batch``: the default runner with ``regroup=1``: every batch of 256 on its own, its survivors
  thinning at each exit (``new`` regroups the survivors of up to 4 batches into full batches; the
  inputs of more than one batch are the small CNNs'); bit-identical
- ``bare``: not a runner: the same compacted segment calls with the reference's survivor counts and
  nothing else (slicing, no decisions): the model's own time for the mix, a floor for any runner
- ``channels-last``, ``fused+cl`` (fuse_bn and channels_last), ``compile``: opt-in, NOT bit-identical;
  their full forward uses the same transformed model, so "real." compares like with like

Times are medians of ``--repeats`` (>= 5) repetitions of process CPU time (1 thread: the time the
work took on the CPU, much less disturbed by other load on a shared machine than wall time; wall
medians are summarised too). Each run is timed right after a full forward of the same input, and
the realised speedup is the median of these paired ratios. "vs before" is T_run(before) /
T_run(option) for the same mix.

Memory: like ``pcee serve`` and ``pcee profile`` (``PCEE_KEEP_FREED_MEMORY``), the benchmark keeps
freed memory in the process (:mod:`pcee.inference.allocator`) unless ``--malloc default``: with
glibc's defaults every batch's activations are page-faulted in afresh, kernel time that made up a
fifth of this benchmark's CPU time and differs between a full forward and a run. The
"answers" column compares with the reference: a full forward (batches of 256) then ``policy.decide``:
"=ref" means exits, predictions and answering logits are bit-identical (``before`` returns no logits:
exits and predictions only).

Models: MSDNet (cifar10-anytime), the small CNN at 8x8 and 32x32, and exits attached to two library
backbones (``attach-exits``: torchvision ResNet-18 and a small timm ViT, their presets).

Run: uv run python benchmarks/inference_speed.py [--threads 1] [--repeats 5] [--malloc keep|default]
     [--models msdnet,small-cnn,small-cnn-32,tv-resnet18,timm-vit-tiny]
     [--options before,new,torch-decide,per-batch,bare,channels-last,fused+cl] (add ``compile``: slow to compile on CPU)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pcee.calibration.scores import confidence  # noqa: E402
from pcee.inference.allocator import keep_freed_memory  # noqa: E402
from pcee.inference.runner import EarlyExitRunner, ExitResult  # noqa: E402
from pcee.latency import measure_exit_latency  # noqa: E402
from pcee.models.base import index_state  # noqa: E402
from pcee.models.flops import measure_exit_flops  # noqa: E402
from pcee.models.registry import build_model  # noqa: E402
from pcee.policies.estimator import ALWAYS, NEVER, FittedThresholdPolicy  # noqa: E402

BATCH = 256
OPTIONS: dict[str, dict[str, Any]] = {
    "before": {},
    "new": {},
    "torch-decide": {"decide": "torch"},
    "per-batch": {"regroup": 1},
    "bare": {},
    "channels-last": {"channels_last": True},
    "fused+cl": {"fuse_bn": True, "channels_last": True},
    "compile": {"compile": True},
}
#: options whose full forward is the plain model's (timed together, pooled)
PLAIN = ("before", "new", "torch-decide", "per-batch", "bare")
DEFAULT_OPTIONS = "before,new,torch-decide,per-batch,bare,channels-last,fused+cl"


class MixPolicy(FittedThresholdPolicy):
    """Exit at the first l with max_prob >= thresholds_[l], thresholds fitted so that on the fitted
    logits a fraction ``mix[l]`` of the samples leaves at exit l (as MSDNet's budgeted evaluation)."""

    name = "mix"
    param_name = ""

    def __init__(self, mix: Any = None, score: str = "max_prob") -> None:
        self.mix = mix
        self.score = score

    def fit(self, logits: np.ndarray, labels: np.ndarray | None = None, flops: np.ndarray | None = None) -> MixPolicy:
        n, num_exits, _ = logits.shape
        mix = np.asarray(self.mix, dtype=np.float64) / np.sum(self.mix)
        scores = confidence(logits, self.score)
        thresholds = np.full(num_exits, ALWAYS)
        remaining = np.ones(n, dtype=bool)
        for level in range(num_exits - 1):
            cand = np.sort(scores[remaining, level])[::-1]
            m = int(round(n * mix[level]))
            thresholds[level] = NEVER if m == 0 else ALWAYS if m >= cand.size else cand[m - 1]
            remaining &= ~(scores[:, level] >= thresholds[level])
        self.thresholds_ = thresholds
        self.num_exits_ = num_exits
        return self


class LegacyRunner:
    """EarlyExitRunner.run as it was before issue 14 (the baseline ``before``), kept verbatim."""

    def __init__(self, model, policy, flops, batch_size=256, device="cpu") -> None:
        self.model, self.policy, self.flops = model, policy, np.asarray(flops, dtype=np.float64)
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.score = policy.score

    def run(self, x) -> ExitResult:
        n = int(x.shape[0])
        num_exits = self.model.num_exits
        prediction = np.zeros(n, dtype=np.int64)
        exits = np.zeros(n, dtype=np.int64)
        conf = np.zeros(n, dtype=np.float64)
        expected = np.zeros(n, dtype=np.float64)
        confidences = np.full((n, num_exits), np.nan, dtype=np.float64)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, n, self.batch_size):
                    xb = torch.as_tensor(x[start : start + self.batch_size], dtype=torch.float32).to(self.device)
                    self._run_batch(xb, start, prediction, exits, conf, expected, confidences)
        finally:
            self.model.train(was_training)
        return ExitResult(prediction, exits, conf, expected, self.flops[exits], confidences)

    def _run_batch(self, xb, offset, prediction, exits, conf, expected, confidences) -> None:
        num_exits = self.model.num_exits
        alive = np.arange(offset, offset + xb.shape[0])
        state = self.model.initial_state(xb)
        for level in range(num_exits):
            state, z = self.model.forward_segment(level, state)
            z = z.float().cpu().numpy()
            s = confidence(z, self.score)
            confidences[alive, level] = s
            if level < num_exits - 1:
                leave = np.asarray(self.policy.exit_mask(level, z), dtype=bool)
            else:
                leave = np.ones(alive.size, dtype=bool)
            if leave.any():
                idx = alive[leave]
                prediction[idx] = z[leave].argmax(axis=1)
                exits[idx] = level
                conf[idx] = s[leave]
                expected[idx] = self.policy.expected_accuracy(level, z[leave])
            if leave.all() or level == num_exits - 1:
                return
            if leave.any():
                state = index_state(state, torch.as_tensor(~leave, device=self.device))
                alive = alive[~leave]


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


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def answers_vs_reference(res: ExitResult, ref_exit: np.ndarray, ref_logits: np.ndarray) -> str:
    rows = np.arange(len(ref_exit))
    ref_z = ref_logits[rows, ref_exit]
    same = np.array_equal(res.exit, ref_exit) and np.array_equal(res.prediction, ref_z.argmax(1))
    if res.logits is None:
        return "=ref (exit, pred)" if same else f"{int((res.exit != ref_exit).sum())} exits differ"
    if same and np.array_equal(res.logits, ref_z):
        return "=ref"
    diff = np.abs(ref_logits[rows, res.exit] - res.logits).max()
    return f"{int((res.exit != ref_exit).sum())} exits differ, max|dz| {diff:.1e}"


class BareSegments:
    """Not a runner: the compacted segment calls of a mix with nothing else (survivors = the first
    n_alive rows, by slicing); ``run`` returns None. The model's own time for the mix."""

    def __init__(self, model, exits: np.ndarray) -> None:
        self.model = model
        self.alive = [  # per batch: samples still running at each exit
            [int(v) for v in (exits[s : s + BATCH][None, :] >= np.arange(model.num_exits)[:, None]).sum(axis=1)]
            for s in range(0, len(exits), BATCH)
        ]

    def run(self, x) -> None:
        with torch.inference_mode():
            for b, s in enumerate(range(0, len(x), BATCH)):
                state = self.model.initial_state(torch.as_tensor(x[s : s + BATCH]))
                for level, n_alive in enumerate(self.alive[b]):
                    if n_alive == 0:
                        break
                    state, _ = self.model.forward_segment(level, index_state(state, slice(0, n_alive)))


def bench(label: str, model, input_shape, n_batches: int, repeats: int, options: list[str]) -> list[dict]:
    model.eval()
    flops = measure_exit_flops(model, input_shape)
    # the cost a latency-profiled bundle chooses with (pcee profile), at the runner's batch size, measured in
    # every repetition below, beside the timings it predicts (a shared machine's speed drifts within
    # minutes): per repetition and method, each exit's cost over the profile's plain forward (the ratio a
    # speed-up prediction divides), pooled over the repetitions by their median
    profiles: dict[str, list[np.ndarray]] = {"runner": [], "segments": []}

    def profile_once() -> None:
        for method, reps in profiles.items():
            # one untimed pass first, as pcee profile takes warm-up passes: the first call after the option
            # timings may run cold (in one run ResNet-18's plain forward, timed first in the pass, came out 7 %
            # dearer than the runner's last exit, against 6 % cheaper in the run before); as many timed passes
            # as the realised timing runs batches (one 8x8 CNN batch is ~13 ms, noisy on its own)
            prof = measure_exit_latency(
                model, input_shape, batch_sizes=(BATCH,), repeats=n_batches, warmup=1, method=method
            )
            plain = prof.plain(BATCH)
            assert plain is not None
            reps.append(prof.cost(BATCH) / plain)

    x = torch.rand(n_batches * BATCH, *input_shape).numpy()
    with torch.inference_mode():  # the reference: full forward in batches of 256, every exit
        ref_logits = np.concatenate(
            [torch.stack(model(torch.as_tensor(x[s : s + BATCH])), 1).numpy() for s in range(0, len(x), BATCH)]
        )
    mix_list = mixes(model.num_exits)
    policies = [MixPolicy(mix).fit(ref_logits) for _, mix in mix_list]
    ref_exits = [p.decide(ref_logits) for p in policies]

    # one runner per (option, mix); each full-forward group (the plain model, or an option's transformed
    # copy) is timed once per repetition
    runners: dict[str, list[Any]] = {}
    group: dict[str, str] = {}
    fulls: dict[str, Any] = {}
    for opt in options:
        group[opt] = "plain" if opt in PLAIN else opt
        exec_model, channels_last, segments = model, False, None
        if opt == "before":
            runners[opt] = [LegacyRunner(model, p, flops, batch_size=BATCH) for p in policies]
        elif opt == "bare":
            runners[opt] = [BareSegments(model, e) for e in ref_exits]
        else:
            first = EarlyExitRunner(model, policies[0], flops, batch_size=BATCH, **OPTIONS[opt])
            t0 = time.perf_counter()
            first.warmup(x[:BATCH])  # compiles every segment when "compile" is on; never timed
            if opt == "compile":
                print(f"[{label}] compile: {time.perf_counter() - t0:.0f} s wall for the first call of every segment")
            runners[opt] = [first]
            for p in policies[1:]:  # share the transformed (and compiled) model
                r = EarlyExitRunner(model, p, flops, batch_size=BATCH, **OPTIONS[opt])
                r.exec_model, r._segments = first.exec_model, first._segments
                runners[opt].append(r)
            if group[opt] != "plain":
                exec_model, channels_last = first.exec_model, first.channels_last
                segments = first._segments if first.compile else None  # else the module's own forward
        if group[opt] in fulls:
            continue

        def full(exec_model=exec_model, channels_last=channels_last, segments=segments):
            with torch.inference_mode():
                for s in range(0, len(x), BATCH):
                    xb = torch.as_tensor(x[s : s + BATCH])
                    if channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    if segments is None:
                        exec_model(xb)
                    else:
                        state = exec_model.initial_state(xb)
                        for segment in segments:
                            state, _ = segment(state)

        fulls[group[opt]] = full
        full()  # warm-up

    results = {(opt, i): runners[opt][i].run(x) for opt in options for i in range(len(mix_list))}  # warm-up
    cpu: dict[Any, list[float]] = {}
    wall: dict[Any, list[float]] = {}
    profile_once()  # warm-up
    for reps in profiles.values():
        reps.clear()
    for rep in range(repeats):
        profile_once()
        order = options[rep % len(options) :] + options[: rep % len(options)]  # rotate: no option always first
        for opt in order:
            for i in range(len(mix_list)):
                # the full forward timed right before each run: the realised speedup is a paired ratio,
                # so a shared machine's drift between them (seconds apart, not minutes) cancels
                c_full, w_full = timed(fulls[group[opt]])
                c, w = timed(lambda r=runners[opt][i]: r.run(x))
                for key, value in (((opt, i), c), ((opt, i, "full"), c_full)):
                    cpu.setdefault(key, []).append(value)
                for key, value in (((opt, i), w), ((opt, i, "full"), w_full)):
                    wall.setdefault(key, []).append(value)

    # each exit's cost in units of a plain forward
    latency, seg_latency = (np.maximum.accumulate(np.median(profiles[m], axis=0)) for m in ("runner", "segments"))
    rows = []
    for i, (name, _) in enumerate(mix_list):
        ref_exit = ref_exits[i]
        predicted = flops[-1] / flops[ref_exit].mean()
        predicted_t = 1.0 / latency[ref_exit].mean()  # over a plain forward, as "real." is measured
        predicted_l = latency[-1] / latency[ref_exit].mean()  # over the runner answering at the last exit
        predicted_s = seg_latency[-1] / seg_latency[ref_exit].mean()
        for opt in options:
            t_full, t_run = np.median(cpu[(opt, i, "full")]), np.median(cpu[(opt, i)])
            real = float(np.median(np.divide(cpu[(opt, i, "full")], cpu[(opt, i)])))  # median of paired ratios
            wall_real = float(np.median(np.divide(wall[(opt, i, "full")], wall[(opt, i)])))
            res = results[(opt, i)]
            rows.append(
                {
                    "model": label,
                    "mix": name,
                    "option": opt,
                    "rel": flops[ref_exit].mean() / flops[-1],
                    "t_full": t_full,
                    "t_run": t_run,
                    "pred": predicted,
                    "real": real,
                    "eff": real / predicted,
                    "pred_t": predicted_t,
                    "eff_t": real / predicted_t,
                    "eff_l": real / predicted_l,
                    "last_over_plain": latency[-1],
                    "eff_s": real / predicted_s,
                    "wall_eff": wall_real / predicted,
                    "vs_before": (np.median(cpu[("before", i)]) / t_run) if "before" in options else float("nan"),
                    "answers": "-" if res is None else answers_vs_reference(res, ref_exit, ref_logits),
                }
            )
    return rows


#: model key -> (builder, input shape, batches of 256)
CONFIGS = {
    "msdnet": (lambda: build_model("msdnet", preset="cifar10-anytime"), (3, 32, 32), 1),
    "small-cnn": (lambda: build_model("small-cnn"), (1, 8, 8), 8),
    "small-cnn-32": (lambda: build_model("small-cnn", in_chans=3, img_size=32), (3, 32, 32), 2),
    # exits on library backbones (issue 12): torchvision ResNet-18 and a small timm ViT, random weights
    "tv-resnet18": (lambda: build_model("attach-exits", preset="tv-resnet18"), (3, 32, 32), 1),
    "timm-vit-tiny": (lambda: build_model("attach-exits", preset="timm-vit-tiny"), (3, 32, 32), 1),
}


def summary(rows: list[dict], options: list[str]) -> list[str]:
    lines = [
        f"{'option':<15}{'eff.t median':>13}{'eff.t min':>10}{'< 0.9':>7}{'eff.L min':>10}{'< 0.9':>7}{'eff.s min':>10}{'< 0.9':>7}"
        f"{'eff. median':>12}{'eff. min':>9}{'< 0.85':>8}"
        f"{'wall eff. median':>17}{'vs before median':>17}{'min':>6}{'max':>6}"
    ]
    for opt in options:
        sel = [r for r in rows if r["option"] == opt]
        effs = np.array([r["eff"] for r in sel])
        effs_t = np.array([r["eff_t"] for r in sel])
        effs_s = np.array([r["eff_s"] for r in sel])
        effs_l = np.array([r["eff_l"] for r in sel])
        weffs = np.array([r["wall_eff"] for r in sel])
        vs = np.array([r["vs_before"] for r in sel])
        lines.append(
            f"{opt:<15}{np.median(effs_t):>13.2f}{effs_t.min():>10.2f}{f'{int((effs_t < 0.9).sum())}/{effs_t.size}':>7}"
            f"{effs_l.min():>10.2f}{f'{int((effs_l < 0.9).sum())}/{effs_l.size}':>7}"
            f"{effs_s.min():>10.2f}{f'{int((effs_s < 0.9).sum())}/{effs_s.size}':>7}"
            f"{np.median(effs):>12.2f}{effs.min():>9.2f}{f'{int((effs < 0.85).sum())}/{effs.size}':>8}"
            f"{np.median(weffs):>17.2f}{np.median(vs):>17.2f}{vs.min():>6.2f}{vs.max():>6.2f}"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=",".join(CONFIGS))
    p.add_argument("--options", default=DEFAULT_OPTIONS, help=f"comma-separated, from: {', '.join(OPTIONS)}")
    p.add_argument("--repeats", type=int, default=5, help="timing repetitions per option and mix (medians; >= 5)")
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: freed memory stays in the process, as pcee serve runs (default); default: glibc's own",
    )
    args = p.parse_args()
    kept = args.malloc == "keep" and keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; valid: {', '.join(OPTIONS)}")

    rows = []
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        if key not in CONFIGS:
            raise SystemExit(f"unknown model {key!r}; valid: {', '.join(CONFIGS)}")
        build, shape, n_batches = CONFIGS[key]
        label = "msdnet cifar10-anytime" if key == "msdnet" else f"{key} {'x'.join(map(str, shape))}"
        if key.startswith(("tv-", "timm-")):
            label = f"attach-exits {key}"
        rows += bench(label, build(), shape, n_batches, args.repeats, options)

    print(
        f"EarlyExitRunner vs full forward, CPU, {args.threads} thread(s), batch {BATCH}, random weights; "
        f"medians of {args.repeats} repetitions of process CPU time, options interleaved; "
        f"freed memory {'kept in the process' if kept else 'returned (glibc defaults)'}"
    )
    head = (
        f"{'model':<28}{'mix':<21}{'option':<15}{'rel.FLOPs':>9}{'T full':>8}{'T run':>8}"
        f"{'pred.':>7}{'pred.t':>7}{'real.':>7}{'eff.':>6}{'eff.t':>6}{'eff.L':>6}{'eff.s':>6}{'vs before':>10}  answers"
    )
    print(head)
    print("-" * (len(head) + 24))
    last = None
    for r in rows:
        if last is not None and (r["model"], r["mix"]) != last:
            print()
        last = (r["model"], r["mix"])
        flag = "" if r["eff_t"] >= 0.9 else " <"
        print(
            f"{r['model']:<28}{r['mix']:<21}{r['option']:<15}{r['rel']:>9.3f}{r['t_full']:>8.3f}{r['t_run']:>8.3f}"
            f"{r['pred']:>7.2f}{r['pred_t']:>7.2f}{r['real']:>7.2f}{r['eff']:>6.2f}{r['eff_t']:>6.2f}{r['eff_l']:>6.2f}{r['eff_s']:>6.2f}{r['vs_before']:>10.2f}  {r['answers']}{flag}"
        )
    print()
    print("eff. = realised / FLOPs-predicted speedup; eff.t = realised / latency-predicted (pred.t: the profile at")
    print(f"batch {BATCH}, its plain forward over the runner's mean time per sample; < marks eff.t < 0.9); eff.L = the")
    print("same with the profile's last exit in place of its plain forward (the runner's own overhead at L left out")
    print(
        "of the prediction); eff.s = eff.L with a profile of the segments alone; T in CPU seconds for the whole input;"
    )
    print("vs before = T_run(before) / T_run(option), same mix; answers vs full forward + decide (=ref: bit-identical)")
    print()
    for line in summary(rows, options):
        print(line)
    print()
    print("latency profile (runner, batch 256): answering at the last exit / a plain forward, per sample")
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"  {model:<28}{next(r['last_over_plain'] for r in rows if r['model'] == model):.3f}")


if __name__ == "__main__":
    main()
