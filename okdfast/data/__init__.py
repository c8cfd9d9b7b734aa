"""Data sets (CIFAR-10/100, CINIC-10, synthetic) held in memory as uint8 arrays, and the plain torch loaders.

    splits = load_dataset("cifar100", data_dir=None, download=False, subset=None, seed=0)
    train_loader, test_loader = build_data_loaders(splits, loader="auto", device="cuda", batch_size=128)

One responsibility per file: ``registry`` (names -> builders, ``load_dataset``, ``DatasetSplits``), ``locate``
(search paths, ``DatasetNotFoundError``, network timeouts), ``stats`` (mean/std, classes), ``arrays``
(``ArrayDataset``), ``cifar`` (pickle and ``.npz`` readers), ``cinic`` (ImageFolder reader + cache), ``synthetic``,
``transforms`` (the batched augmentation and its torchvision reference), ``plan`` (the seeded epoch plan every
loader follows), ``loader`` (the torch DataLoader reference), and the device-delivering loaders behind one factory
(``factory.build_data_loaders``, ``--loader``, the one builder of training, evaluation and benchmarks):
``gpu_loader``, ``dali_loader``, ``ffcv_loader``, ``torch_loader`` (the reference), ``base`` (what they all yield).
"""

from okdfast.data import cifar, cinic, synthetic  # noqa: F401  (importing them registers the built-in data sets)
from okdfast.data.arrays import ArrayDataset
from okdfast.data.base import Delivery, PlannedLoader
from okdfast.data.factory import LOADERS, build_data_loaders, resolve_loader
from okdfast.data.loader import EpochLoader
from okdfast.data.locate import DatasetNotFoundError
from okdfast.data.registry import DATASETS, DatasetSplits, list_datasets, load_dataset, register_dataset
from okdfast.data.stats import STATS, DatasetStats, dataset_stats

__all__ = [
    "DATASETS",
    "LOADERS",
    "STATS",
    "ArrayDataset",
    "DatasetNotFoundError",
    "DatasetSplits",
    "DatasetStats",
    "Delivery",
    "EpochLoader",
    "PlannedLoader",
    "build_data_loaders",
    "dataset_stats",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "resolve_loader",
]
