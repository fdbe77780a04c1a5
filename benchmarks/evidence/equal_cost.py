"""Experiment 1 — a bigger model with PCEE vs a smaller model run to its end, at equal cost.

The PCEE paper's Figure 1 claim: a larger multi-exit network, early-exited with PCEE so that its
mean cost matches the smaller network's full cost, is more accurate than the smaller network.
Both are trained with the same regime (``--regime``, mixed by default) and budget; δ for the large one is chosen on the
*validation* split as the most accurate δ whose validation mean FLOPs ≤ the small model's F_L,
then applied once on test.

    uv run python benchmarks/evidence/equal_cost.py [--quick]
"""

from __future__ import annotations

from benchmarks.evidence import evidence_common as C

TITLE = "1. Bigger model + PCEE vs smaller full model at equal cost"
#: the smaller sibling of each model family (small-cnn takes the scale's ``small_widths``)
SMALL_OVERRIDES = {"msdnet": {"n_channels": 8, "growth_rate": 3}, "vit": {"hidden_dim": 96, "mlp_dim": 192}}

#: how each family's pair differs from the paper's setting (for the verdict line)
DIFFERENCES = {
    "small-cnn": "two widths of a small CNN instead of two MSDNet/ViT sizes",
    "msdnet": "two narrow CIFAR MSDNets (n_channels/growth 16/6 vs 8/3) trained briefly from scratch",
    "vit": "two small ViTs trained from scratch",
}


def _extra(parser) -> None:
    parser.add_argument(
        "--regime",
        default="mixed",
        help="training regime of both models (make bench: joint for MSDNet, its authors' recipe)",
    )
    parser.add_argument(
        "--small-overrides",
        default=None,
        help="JSON config overrides of the smaller model, e.g. '{\"widths\": [16, 32, 64, 128]}'",
    )


def small_overrides(scale: dict, text: str | None) -> dict:
    import json

    if text:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise SystemExit(f"--small-overrides must be a JSON object, got {text!r}")
        return value
    if scale["model"] == "small-cnn":
        return {"widths": list(scale["small_widths"])}
    if scale["model"] in SMALL_OVERRIDES:
        return dict(SMALL_OVERRIDES[scale["model"]])
    raise SystemExit(
        f"no default smaller variant of {scale['model']!r}; give --small-overrides (known: small-cnn, {', '.join(SMALL_OVERRIDES)})"
    )


def main(argv: list[str] | None = None) -> int:
    import matplotlib.pyplot as plt
    import numpy as np

    from pcee.plots import _save
    from pcee.sweep import select_delta, sweep_policy

    args, scale, sec = C.start("equal_cost", TITLE, argv, extra=_extra)
    if scale["model"] != C.SCALES[scale["scale"].split("+")[0]]["model"]:
        # another family (e.g. the MSDNet run of make bench) is its own section beside the default one
        sec.name, sec.title = f"equal_cost_{scale['model']}", f"{TITLE} ({scale['model']})"
    small_cfg = small_overrides(scale, args.small_overrides)
    big = C.trained(scale, args.regime, label=f"{scale['model']} (large, {args.regime})")
    small = C.trained(
        scale, args.regime, model_overrides=small_cfg, label=f"{scale['model']} {small_cfg} (small, {args.regime})"
    )
    budget = float(small.test.flops[-1])
    small_acc = float(C.correct_matrix(small.test)[:, -1].mean())
    table, res = (
        [],
        {
            "budget_flops": budget,
            "small_final_accuracy": small_acc,
            "small_flops": small.test.flops.tolist(),
            "large_flops": big.test.flops.tolist(),
            "regime": args.regime,
        },
    )
    curves = {}
    for policy in ("pcee", "pcee-ws"):
        on_val = sweep_policy(policy, big.val, big.val)
        on_test = sweep_policy(policy, big.val, big.test)
        pick = select_delta(on_val, flops_budget=budget)
        i = int(np.flatnonzero(np.isclose(on_test.delta, pick["delta"]))[0])
        acc, cost = float(on_test.accuracy[i]), float(on_test.mean_flops[i])
        curves[policy] = on_test
        res[policy] = {
            "delta": pick["delta"],
            "budget_met_on_val": pick["met"],
            "test_accuracy": acc,
            "test_mean_flops": cost,
        }
        table.append(
            [f"large + {policy} (δ={pick['delta']:.3f} from val)", cost / 1e6, cost / budget, acc, acc - small_acc]
        )
        sec.metrics[f"{policy}.test_accuracy"] = acc
        sec.metrics[f"{policy}.gain_points"] = 100 * (acc - small_acc)
    big_final = float(C.correct_matrix(big.test)[:, -1].mean())
    table.insert(0, ["small, final exit", budget / 1e6, 1.0, small_acc, 0.0])
    table.append(
        [
            "large, final exit (no early exit)",
            float(big.test.flops[-1]) / 1e6,
            float(big.test.flops[-1]) / budget,
            big_final,
            big_final - small_acc,
        ]
    )
    res["large_final_accuracy"] = big_final
    sec.results = res
    sec.metrics["small_final_accuracy"] = small_acc
    sec.add(
        f"Large: {big.label}, exits at {np.round(big.test.flops / 1e6, 2).tolist()} MFLOPs; small: {small.label}, "
        f"exits at {np.round(small.test.flops / 1e6, 2).tolist()} MFLOPs. Budget = the small model's full cost. "
        f"Per-exit test accuracy: large {np.round(C.correct_matrix(big.test).mean(axis=0), 4).tolist()}, "
        f"small {np.round(C.correct_matrix(small.test).mean(axis=0), 4).tolist()}.",
        "",
    )
    sec.table(["system", "test MFLOPs/sample", "cost / small's", "test accuracy", "Δ vs small"], table)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for policy, r in curves.items():
        o = np.argsort(r.mean_flops)
        ax.plot(r.mean_flops[o] / 1e6, r.accuracy[o], lw=1.2, label=f"large + {policy} (test)")
    sacc = C.correct_matrix(small.test).mean(axis=0)
    bacc = C.correct_matrix(big.test).mean(axis=0)
    ax.plot(small.test.flops / 1e6, sacc, "s--", label="small, each exit")
    ax.plot(big.test.flops / 1e6, bacc, "o:", label="large, each exit")
    ax.axvline(budget / 1e6, color="grey", ls=":", lw=0.8, label="small's full cost")
    ax.set(xlabel="mean MFLOPs per sample", ylabel="test accuracy", title="equal-cost comparison")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    sec.image(_save(fig, sec.figure_path("curves")), "accuracy vs MFLOPs")
    gain = res["pcee"]["test_accuracy"] - small_acc
    within = res["pcee"]["test_mean_flops"] <= budget * 1.02
    sec.add(
        f"**Verdict.** At the small model's cost the large model with PCEE reaches {res['pcee']['test_accuracy']:.4f} vs "
        f"{small_acc:.4f} ({100 * gain:+.2f} points, test cost {res['pcee']['test_mean_flops'] / budget:.2f}× the budget). "
        + ("Claim reproduced at this scale." if gain > 0 and within else "Claim NOT reproduced at this scale.")
        + f" Differences from the paper: {DIFFERENCES.get(scale['model'], 'a different model family')}, "
        f"{scale['epochs']} epochs, {scale['train_size'] or 'all'} training images, one seed.",
        "",
    )
    C.finish(sec, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
