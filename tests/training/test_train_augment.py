import torch

from pcee.training.augment import crop_flip, resolve_augment


def test_auto_augment_choice():
    assert resolve_augment("auto", (1, 8, 8)) == "none"
    assert resolve_augment("auto", (3, 32, 32)) == "crop-flip"
    assert resolve_augment("none", (3, 32, 32)) == "none"


def test_crop_flip_is_a_shift_or_mirror_of_the_input():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    y = crop_flip(x, g, padding=4)
    assert y.shape == x.shape
    assert not torch.equal(x, y)
    # every output is a (possibly flipped) shift of its input: its central 24x24 part appears in x
    for i in range(8):
        centre = y[i, :, 4:28, 4:28]
        found = False
        for img in (x[i], x[i].flip(-1)):
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    if torch.equal(img[:, 4 + dy : 28 + dy, 4 + dx : 28 + dx], centre):
                        found = True
        assert found, f"sample {i} is not a crop/flip of its input"
    # deterministic from the generator
    assert torch.equal(crop_flip(x, torch.Generator().manual_seed(1)), crop_flip(x, torch.Generator().manual_seed(1)))
