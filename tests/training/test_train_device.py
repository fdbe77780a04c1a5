"""The trainer's device path (issue 27, item 4), on CPU: the same code runs on a GPU.

The data is placed once and batched by index tensors (per-batch copies only when it does not fit, with the
same values), the loss is read once per epoch, bf16 autocast and channels-last train, bad switches fail
clearly. The CUDA-only check of host syncs is skipped where CUDA is missing."""

from __future__ import annotations

import collections
import dataclasses
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import pcee.training.trainer as trainer
from pcee.training import TrainConfig, train_model
from pcee.training.device import DEVICE_DATA_SHARE, TrainData, fits_on_device
from pcee.training.reproducibility import weights_digest

STEPS = dict(regime="joint", epochs=2, batch_size=128, lr=0.1, seed=3, threads=1)
HOST_READS = {"__float__", "item", "tolist", "__bool__", "__int__", "__index__", "numpy"}


def no_val(digits):
    return dataclasses.replace(digits, val=None)


def test_data_fits_on_the_device_up_to_its_share_of_free_memory():
    free = 8 * 2**30
    assert fits_on_device(int(DEVICE_DATA_SHARE * free), free)
    assert not fits_on_device(int(DEVICE_DATA_SHARE * free) + 1, free)
    x, y = np.zeros((10, 1, 8, 8), np.float32), np.arange(10)
    assert TrainData.place(x, y, torch.device("cpu")).on_device  # the host is the device
    streamed = TrainData.place(x, y, torch.device("cpu"), placement="host")
    assert not streamed.on_device
    idx = streamed.order([3, 1, 4])
    xb, yb = streamed.batch(idx)
    assert yb.tolist() == [3, 1, 4] and xb.shape == (3, 1, 8, 8)


def test_placement_and_tensor_input_leave_the_weights_unchanged(digits, small_cnn):
    """Data on the device, copied per batch, or given as tensors: the same batches, the same weights."""
    digests = set()
    for placement, as_tensors in (("auto", False), ("host", False), ("device", True)):
        splits = no_val(digits)
        if as_tensors:  # tensors where numpy was
            train = SimpleNamespace(x=torch.as_tensor(splits.train.x), y=torch.as_tensor(splits.train.y))
            splits = SimpleNamespace(train=train, val=None)
        model = small_cnn(seed=1)
        train_model(model, splits, TrainConfig(**STEPS, augment="none", data_placement=placement), progress=False)
        digests.add(weights_digest(model))
    assert len(digests) == 1


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (a device sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()
        self.steps = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads[name] += 1
        elif name == "backward":
            self.steps += 1
        return func(*args, **(kwargs or {}))


def test_the_loss_is_summed_on_the_device_and_read_once_per_epoch(digits, small_cnn, monkeypatch):
    reads_of_loss = []
    real_read = trainer._read_loss

    def counted(total):
        value = real_read(total)
        reads_of_loss.append(value)
        return value

    monkeypatch.setattr(trainer, "_read_loss", counted)
    config = TrainConfig(**{**STEPS, "batch_size": 64})
    with HostReads() as mode:
        history = train_model(small_cnn(), no_val(digits), config, progress=False)
    steps_per_epoch = len(digits.train.y) // 64
    assert mode.steps == config.epochs * steps_per_epoch
    assert len(reads_of_loss) == config.epochs  # one read per epoch
    # every value read on the host during training: the epoch's loss, and the sampler's order (on the host)
    assert sum(mode.reads.values()) <= 2 * config.epochs < mode.steps, mode.reads
    # the logged loss is the read sum over the epoch's samples
    for record, total in zip(history, reads_of_loss, strict=True):
        assert record["train_loss"] == total / (steps_per_epoch * 64)


def test_bf16_autocast_trains_with_float32_weights(digits, small_cnn):
    model = small_cnn()
    dtypes = set()
    hook = model.exit_heads[-1].register_forward_hook(lambda m, i, out: dtypes.add(out.dtype) if m.training else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_model(model, no_val(digits), TrainConfig(**STEPS, precision="bf16"), progress=False)
    hook.remove()
    assert dtypes == {torch.bfloat16}  # the training forward ran under autocast
    assert all(v.dtype == before[k].dtype for k, v in model.state_dict().items())  # weights stay float32
    assert all(np.isfinite(r["train_loss"]) for r in history)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # it trained


def test_channels_last_trains_in_that_format_and_hands_back_the_default_one(digits, small_cnn):
    model = small_cnn()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    hook = conv.register_forward_pre_hook(
        lambda m, args: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
            and m.weight.is_contiguous(memory_format=torch.channels_last)
        )
    )
    history = train_model(model, no_val(digits), TrainConfig(**STEPS, channels_last=True), progress=False)
    hook.remove()
    assert seen and all(seen)
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(np.isfinite(r["train_loss"]) for r in history)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "fp16"}, "valid precisions: fp32, bf16"),
        ({"data_placement": "gpu"}, "valid data placements: auto, device, host"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"channels_last": "yes"}, "channels_last must be true or false"),
        ({"deterministic": 1}, "deterministic must be true or false"),
    ],
)
def test_bad_switches_fail_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_channels_last_needs_image_inputs(small_cnn):
    flat = SimpleNamespace(train=SimpleNamespace(x=np.zeros((8, 64), np.float32), y=np.zeros(8, np.int64)), val=None)
    with pytest.raises(ValueError, match=r"channels_last needs 4-D image inputs .* shape \(8, 64\)"):
        train_model(small_cnn(), flat, TrainConfig(channels_last=True, epochs=1), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host syncs exist only on a GPU")
def test_on_cuda_no_step_waits_for_the_host(digits, small_cnn):
    model = small_cnn().cuda()  # moving the weights syncs once per tensor: before the count starts
    config = TrainConfig(**{**STEPS, "batch_size": 16, "device": "cuda"})
    steps = config.epochs * (len(digits.train.y) // 16)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_model(model, no_val(digits), config, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # placing the data (x, y), then per epoch the order's copy and the loss read: a few, never one per step
    assert len(syncs) <= 3 * config.epochs + 2 < steps, [str(w.message) for w in syncs]
