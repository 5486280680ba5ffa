"""Datasets and loaders: Fashion-MNIST (default), MNIST and CIFAR-10.

Every split is held in memory as one uint8 tensor ``[N, C, H, W]`` and normalised a batch at a
time, so an epoch costs no per-image PIL work.  Items are ``(image, label, sample_id)``:

* ``image``     float32 ``[C, H, W]``, normalised with the dataset's channel mean / std;
* ``label``     int class index;
* ``sample_id`` int, the image's index in its *official* split file (training-set index for
  the train and validation subsets, test-set index for the test set).  It keys the channel
  draws, so a given image sees the same channel whatever the batch size, shuffling or
  number of workers, and train / validation ids never collide.

Data sources, tried in order:

1. ``root`` in torchvision's layout (e.g. ``<root>/FashionMNIST/raw/*-ubyte``,
   ``<root>/cifar-10-batches-py``);
2. Fashion-MNIST only: the Debian package ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist/*.gz``).  Its archives are recompressed, so their
   md5 differs from torchvision's list and torchvision's download step rejects them; they are
   decompressed into ``<root>/FashionMNIST/raw/`` instead (each file written to a temporary
   name, then renamed, so an interrupted run never leaves a truncated file);
3. torchvision's own download (needs the internet).

When none works, :class:`DataUnavailableError` says where it looked and how to get the data, and
whatever the failed attempts created under ``root`` (empty or partial torchvision folders, ``root``
itself) is removed again.  The source used is logged (``dmoe_torch.data`` at INFO).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .selection.common import is_int
from .utils import atomic_write

log = logging.getLogger(__name__)

DATASETS = ("fashion_mnist", "mnist", "cifar10")

# Where the Debian package `dataset-fashion-mnist` installs its files (tests monkeypatch this).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class _Spec:
    torchvision_class: str
    folder: str  # torchvision's folder under root, for the error message
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    # Horizontal flips keep the label of clothes and natural images, not of digits.
    flip_ok: bool


_SPECS = {
    "fashion_mnist": _Spec(
        "FashionMNIST",
        "FashionMNIST/raw",
        1,
        28,
        (0.2860,),
        (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        flip_ok=True,
    ),
    "mnist": _Spec(
        "MNIST",
        "MNIST/raw",
        1,
        28,
        (0.1307,),
        (0.3081,),
        tuple(str(d) for d in range(10)),
        flip_ok=False,
    ),
    "cifar10": _Spec(
        "CIFAR10",
        "cifar-10-batches-py",
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        flip_ok=True,
    ),
}

DATASET_IMAGE_SIZES = {name: spec.image_size for name, spec in _SPECS.items()}
DATASET_TRAIN_SIZES = {"fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000}  # official training sets
DATASET_TEST_SIZES = {"fashion_mnist": 10_000, "mnist": 10_000, "cifar10": 10_000}  # official test sets


def split_sizes(available: int, val_size: int, limit_train: int | None) -> tuple[int, int]:
    """(training images, validation images) :func:`build_datasets` takes from an official
    training set of ``available`` images: the first ``limit_train`` of them when set, of which
    ``min(val_size, limit_train // 5)`` validate; else ``val_size`` of all.  The training
    count may be <= 0 (a val_size too large: build_datasets refuses it)."""
    pool = available if limit_train is None else min(limit_train, available)
    held_out = val_size if limit_train is None else min(val_size, pool // 5)
    return pool - held_out, held_out


class DataUnavailableError(ValueError, RuntimeError):
    """The dataset could not be found or downloaded anywhere.

    A ValueError (a configuration problem: wrong ``data.root``) and a RuntimeError (an
    environment problem), so either kind of handler reports it cleanly.
    """


@dataclass
class DataInfo:
    """What the model needs to know about a dataset."""

    name: str
    in_channels: int
    num_classes: int
    image_size: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())


class ImageTensorDataset(Dataset):
    """Images held as one uint8 tensor, normalised on access.

    images     uint8 [N, C, H, W]
    labels     int64 [N]
    sample_ids int64 [N]  stable ids (index in the official split file)
    mean, std  per-channel normalisation constants (of images scaled to [0, 1])
    augment    random crop (padding 2) and, where ``flip_ok``, horizontal flip, drawn from
               ``generator``; meant for the training subset only.

    ``ds[i]`` returns ``(image [C, H, W] float32, label int, sample_id int)``.
    ``ds[index_tensor_or_list]`` returns the batch ``(images [B, C, H, W], labels [B],
    sample_ids [B])`` at once; :func:`make_loader` uses this to avoid per-image collation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sample_ids: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        augment: bool = False,
        flip_ok: bool = True,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if not (len(images) == len(labels) == len(sample_ids)):
            raise ValueError("images, labels and sample_ids must have the same length")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.sample_ids = sample_ids.to(torch.int64)
        channels = images.shape[1]
        self._scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, channels, 1, 1)
        self._shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(1, channels, 1, 1)
        self.augment = augment
        self.flip_ok = flip_ok
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        batch_index = torch.as_tensor(index, dtype=torch.int64)
        if batch_index.dim() == 0:  # int, numpy integer or 0-d tensor: one item
            images, labels, ids = self._batch(batch_index.view(1))
            return images[0], int(labels[0]), int(ids[0])
        return self._batch(batch_index)

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.images.index_select(0, index).to(torch.float32)
        if self.augment:
            x = _random_crop_flip(x, padding=2, flip=self.flip_ok, generator=self.generator)
        x = x * self._scale - self._shift
        return x, self.labels.index_select(0, index), self.sample_ids.index_select(0, index)


def _random_crop_flip(x: torch.Tensor, *, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Batched random crop after zero padding, and random horizontal flip. x: [B, C, H, W]."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    rows = dy[:, None] + torch.arange(H)[None, :]  # [B, H]
    cols = dx[:, None] + torch.arange(W)[None, :]  # [B, W]
    if flip:
        flipped = torch.rand(B, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(B)[:, None, None]
    # Advanced indexing over (batch, row, col) gathers each image's own window: [B, H, W, C].
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _checked_split(name: str, val_size, seed, limit_train, limit_test) -> tuple[int, int, int | None, int | None]:
    """build_datasets' arguments checked (ValueError naming the key) and as Python ints."""
    if name not in _SPECS:
        raise ValueError(f"data.name must be one of {', '.join(DATASETS)}; got {name!r}")
    for key, value in (("data.val_size", val_size), ("data.seed", seed)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{key} must be a non-negative int, got {value!r}")
    for key, value in (("data.limit_train", limit_train), ("data.limit_test", limit_test)):
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{key} must be a positive int or null, got {value!r}")
    limits = (None if v is None else int(v) for v in (limit_train, limit_test))  # numpy integers too
    return (int(val_size), int(seed), *limits)


def build_datasets(
    name: str,
    root: str | os.PathLike,
    *,
    val_size: int = 5000,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    augment: bool = False,
    download: bool = True,
) -> tuple[ImageTensorDataset, ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Load a dataset and split off a validation set.

    name         one of DATASETS
    root         data directory in torchvision's layout (created if needed; removed again,
                 with anything else created under it, when the data cannot be found)
    val_size     validation images held out of the official training set by a seeded
                 permutation (seed ``seed``); the rest is the training set.
    limit_train  use only the first ``limit_train`` official training images; the validation
                 set is then ``min(val_size, limit_train // 5)`` of them.
    limit_test   use only the first ``limit_test`` test images.
    augment      batched random crop (padding 2) + horizontal flip (not for MNIST) on the
                 training subset, drawn from a generator seeded with ``seed``.
    download     allow torchvision's download as the last resort.

    Returns (train, val, test, info).  Sample ids are indices into the official split files.
    """
    val_size, seed, limit_train, limit_test = _checked_split(name, val_size, seed, limit_train, limit_test)
    spec = _SPECS[name]
    root = Path(root).expanduser()

    with _removed_on_failure(root):
        train_images, train_labels, source = _load_split(name, root, train=True, download=download)
        test_images, test_labels, _ = _load_split(name, root, train=False, download=download)
    log.info("%s: %d training and %d test images from %s", name, len(train_labels), len(test_labels), source)

    n_fit, n_val = split_sizes(len(train_labels), val_size, limit_train)
    n_train = n_fit + n_val  # the pool both are drawn from
    if n_fit < 1:
        raise ValueError(f"data.val_size ({val_size}) must be smaller than the {n_train} training images")
    permutation = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    # Sorted so that the subsets keep the files' order (cheap, contiguous-ish gathers).
    val_index = permutation[:n_val].sort().values
    train_index = permutation[n_val:].sort().values
    n_test = len(test_labels) if limit_test is None else min(limit_test, len(test_labels))
    test_index = torch.arange(n_test)

    def subset(images, labels, index, *, augment_subset=False):
        return ImageTensorDataset(
            images.index_select(0, index),
            labels.index_select(0, index),
            index,
            spec.mean,
            spec.std,
            augment=augment_subset,
            flip_ok=spec.flip_ok,
            seed=seed,
        )

    info = DataInfo(
        name=name,
        in_channels=spec.in_channels,
        num_classes=len(spec.class_names),
        image_size=spec.image_size,
        class_names=spec.class_names,
        mean=spec.mean,
        std=spec.std,
    )
    return (
        subset(train_images, train_labels, train_index, augment_subset=augment),
        subset(train_images, train_labels, val_index),
        subset(test_images, test_labels, test_index),
        info,
    )


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(images [B, C, H, W], labels [B], sample_ids [B])``.

    Shuffling draws from a generator seeded with ``seed``: the sequence of epochs is the same
    for every run with that seed.  For :class:`ImageTensorDataset` whole batches are fetched by
    one tensor gather (no per-image collation).  ``drop_last`` avoids a last batch of one image,
    which BatchNorm rejects in training mode.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    if isinstance(ds, ImageTensorDataset):
        # batch_size=None: the loader hands each list of indices to ds[...] and yields the
        # already-batched tuple unchanged.
        return DataLoader(
            ds,
            batch_size=None,
            sampler=BatchSampler(sampler, batch_size, drop_last),
            num_workers=num_workers,
            generator=generator,
            worker_init_fn=_seed_worker_augmentation if num_workers else None,
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


def _seed_worker_augmentation(worker_id: int) -> None:
    # Each worker holds a copy of the dataset: give each copy its own augmentation stream
    # (torch derives the worker seed from the loader's seeded generator, so it is reproducible).
    info = torch.utils.data.get_worker_info()
    info.dataset.generator.manual_seed(info.seed)


# ---------------------------------------------------------------------------------------------
# Sources


@contextmanager
def _removed_on_failure(root: Path):
    """On DataUnavailableError, remove what was created meanwhile under ``root`` (two levels
    deep, e.g. ``MNIST/raw`` with partial downloads), or ``root`` itself if it was created."""
    existed = root.exists()
    before = set(_entries(root)) if existed else set()
    try:
        yield
    except DataUnavailableError:
        created = [root] if not existed else sorted(set(_entries(root)) - before, key=lambda p: len(p.parts))
        for path in created:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
        raise


def _entries(root: Path, depth: int = 2) -> list[Path]:
    """Every path under ``root`` down to ``depth`` levels."""
    found, level = [], [root]
    for _ in range(depth):
        level = [child for folder in level if folder.is_dir() and not folder.is_symlink() for child in folder.iterdir()]
        found.extend(level)
    return found


def _load_split(name: str, root: Path, *, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return (uint8 images [N, C, H, W], int64 labels [N], where they came from) of one
    official split."""
    spec = _SPECS[name]
    tried: list[str] = [f"{root / spec.folder} (torchvision layout under data.root)"]
    source = str(root / spec.folder)
    dataset = _try_torchvision(spec, root, train=train, download=False)
    if dataset is None and name == "fashion_mnist":
        tried.append(f"{DEBIAN_FASHION_MNIST_DIR} (Debian package dataset-fashion-mnist)")
        if _install_debian_fashion_mnist(root):
            dataset = _try_torchvision(spec, root, train=train, download=False)
            source = f"{root / spec.folder} (unpacked from {DEBIAN_FASHION_MNIST_DIR}, Debian package dataset-fashion-mnist)"
    if dataset is None and download:
        tried.append("torchvision download (needs internet)")
        dataset = _try_torchvision(spec, root, train=train, download=True)
        source = f"{root / spec.folder} (downloaded by torchvision)"
    if dataset is None:
        hint = "install the Debian package (`sudo apt-get install dataset-fashion-mnist`), or " if name == "fashion_mnist" else ""
        raise DataUnavailableError(
            f"dataset {name!r} not found; looked in: {'; '.join(tried)}. To get it, {hint}"
            f"run once with internet access so torchvision can download it into data.root={str(root)!r}, "
            f"or point data.root at a copy in torchvision's layout."
        )
    images = torch.as_tensor(dataset.data)
    if images.dim() == 3:  # MNIST-like: [N, H, W]
        images = images.unsqueeze(1)
    else:  # CIFAR: numpy [N, H, W, C]
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images.contiguous(), labels, source


def _try_torchvision(spec: _Spec, root: Path, *, train: bool, download: bool):
    import torchvision

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        return cls(str(root), train=train, download=download)
    except (RuntimeError, OSError, ValueError):
        # torchvision raises RuntimeError("Dataset not found ...") without files and
        # URLError/OSError or RuntimeError("Error downloading ...") when offline.
        return None


def _install_debian_fashion_mnist(root: Path) -> bool:
    """Decompress the Debian package's four archives into ``<root>/FashionMNIST/raw``.

    Returns False if the package's files are missing.  Each file is written under a temporary
    name in the target folder and renamed into place, so concurrent or interrupted runs never
    see a partial file.
    """
    sources = [DEBIAN_FASHION_MNIST_DIR / f"{stem}.gz" for stem in _IDX_FILES]
    if not all(path.is_file() for path in sources):
        return False
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem, source in zip(_IDX_FILES, sources, strict=True):
        target = raw / stem
        if target.is_file():
            continue
        with gzip.open(source, "rb") as src:
            atomic_write(target, lambda out: shutil.copyfileobj(src, out, length=1 << 20))
    return True
