"""Per-exit cost: FlopCounterMode cumulative FLOPs and the MSDNet port's op-count convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcee.models import build_model, list_models, list_presets
from pcee.models.flops import (
    default_input_shape,
    measure_exit_flops,
    port_op_count,
    reference_mflops,
)

torch.set_num_threads(1)

CASES = [(name, preset) for name in list_models() for preset in list_presets(name)]


@pytest.mark.parametrize("name, preset", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_flops_strictly_increase_with_the_exit(name, preset):
    model = build_model(name, preset)
    flops = measure_exit_flops(model, default_input_shape(model))
    assert flops.shape == (model.num_exits,) and flops.dtype == np.float64
    assert flops[0] > 0 and np.all(np.diff(flops) > 0)
    assert model.training  # measuring leaves the mode as it was


@pytest.mark.parametrize("preset", ["cifar100-anytime"])
def test_msdnet_matches_the_published_reference_within_3_percent(preset):
    model = build_model("msdnet", preset)
    ref = reference_mflops("msdnet", preset)
    assert ref is not None and len(ref) == model.num_exits == 7
    port = port_op_count(model, (3, 32, 32)) / 1e6
    np.testing.assert_allclose(port, ref, rtol=0.03)
    # FlopCounterMode counts a multiply-add as 2 FLOPs and ignores ReLU/pool/bias: about twice the port's number
    flops = measure_exit_flops(model, (3, 32, 32)) / 1e6
    assert np.all((flops / port > 1.9) & (flops / port < 2.0))


def test_small_cnn_first_exit_by_hand():
    # digits preset, exit 1 = conv 1->16 (3x3, 8x8 output) + 2x2-pooled linear 16*4 -> 10
    model = build_model("small-cnn", "digits")
    conv_macs = 1 * 16 * 9 * 8 * 8
    linear_macs = 16 * 4 * 10
    flops = measure_exit_flops(model, (1, 8, 8))
    assert flops[0] == 2 * (conv_macs + linear_macs)
    # port convention adds one op per ReLU output (16*8*8), per pooled input (16*8*8) and per bias (10)
    port = port_op_count(model, (1, 8, 8))
    assert port[0] == conv_macs + linear_macs + 16 * 64 + 16 * 64 + 10


def test_cost_counts_every_head_on_the_way():
    # F_l includes heads 1..l: widening exit 1's head raises every later exit's cost by the same amount
    small = build_model("small-cnn", "digits", head_pool=1)
    large = build_model("small-cnn", "digits", head_pool=2)
    diff = measure_exit_flops(large, (1, 8, 8)) - measure_exit_flops(small, (1, 8, 8))
    per_head = [2 * w * (4 - 1) * 10 for w in small.config["widths"]]  # linear in-features grow 4x
    np.testing.assert_array_equal(diff, np.cumsum(per_head))


def test_bad_input_shape_is_rejected():
    model = build_model("small-cnn")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        measure_exit_flops(model, (8, 8))
