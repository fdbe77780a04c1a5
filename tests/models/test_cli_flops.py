"""`pcee flops` prints the per-exit cost table."""

from __future__ import annotations

import json

from pcee.cli import main


def test_flops_table_for_msdnet_cifar100_anytime(capsys):
    assert main(["flops", "--model", "msdnet", "--config", "cifar100-anytime"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, 8))
    port = [float(r[3]) for r in rows]
    ref = [float(r[4]) for r in rows]
    assert ref == [15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94]
    assert all(abs(p / r - 1) < 0.03 for p, r in zip(port, ref))
    assert float(rows[-1][-1]) == 1.0  # relative cost of the final exit
    assert "MACs" in out


def test_flops_json_with_overrides(capsys):
    args = ["flops", "--model", "small-cnn", "--config", "cifar", "--set", "num_classes=100", "--json"]
    assert main(args) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["input_shape"] == [3, 32, 32] and len(table["exits"]) == 4
    assert all(e["reference_mflops"] is None for e in table["exits"])
    assert all(abs(e["macs_m"] * 2 - e["flops_m"]) < 1e-9 for e in table["exits"])


def test_unknown_model_fails_with_valid_names(capsys):
    assert main(["flops", "--model", "msdnett"]) == 2
    err = capsys.readouterr().err
    assert "msdnett" in err and all(
        name in err for name in ("msdnet", "resnet18", "small-cnn", "vit", "attach-exits", "tiny-mlp-exits")
    )
