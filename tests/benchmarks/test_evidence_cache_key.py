"""The evidence model cache keys a model by what decides its weights: with the training environment
(torch's thread count, the machine, torch), not only the data, model and config (issue 29, item 1)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def test_the_cache_key_changes_with_the_thread_count_and_only_then():
    from benchmarks.evidence import evidence_common as ec
    from pcee.training import TrainConfig

    scale = dict(ec.SCALES["quick"], scale="quick", seed=0)
    splits = SimpleNamespace(sizes=lambda: {"train": 1079, "val": 359, "test": 359})
    config = TrainConfig(regime="mixed", epochs=3, seed=0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ec.cache_spec(scale, splits, {}, config)
        assert ec.cache_key(one) == ec.cache_key(ec.cache_spec(scale, splits, {}, config))  # stable
        torch.set_num_threads(2)
        two = ec.cache_spec(scale, splits, {}, config)
    finally:
        torch.set_num_threads(previous)
    assert one["environment"]["threads"] == 1 and two["environment"]["threads"] == 2
    assert {k: v for k, v in one.items() if k != "environment"} == {k: v for k, v in two.items() if k != "environment"}
    assert ec.cache_key(one) != ec.cache_key(two)
    assert one["environment"]["torch"] == torch.__version__ and "cpu_features" in one["environment"]
