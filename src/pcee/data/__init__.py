"""Datasets, splits, prepared snapshots and corruptions (numpy/torch/torchvision/sklearn only).

Heavy parts (torchvision CIFAR classes, PIL decoding, corruptions) are imported by their own
modules only when used: ``pcee.data.corruptions``, ``pcee.data.prepared``.
"""

from pcee.data.datasets import DATASET_NAMES, ArraySplit, DatasetSplits, load_dataset

__all__ = ["DATASET_NAMES", "ArraySplit", "DatasetSplits", "load_dataset"]
