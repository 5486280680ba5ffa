"""Datasets: real Fashion-MNIST from the Debian package, seeded splits, loaders, errors."""

from __future__ import annotations

import gzip

import pytest
import torch

from dmoe_torch import data
from dmoe_torch.data import DataUnavailableError, build_datasets, make_loader

DEBIAN_FILES = [data.DEBIAN_FASHION_MNIST_DIR / f"{stem}.gz" for stem in data._IDX_FILES]
needs_debian = pytest.mark.skipif(
    not all(p.is_file() for p in DEBIAN_FILES),
    reason="Debian package dataset-fashion-mnist not installed (sudo apt-get install dataset-fashion-mnist)",
)

LIMITS = dict(val_size=100, limit_train=600, limit_test=200)


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def fashion(fashion_root):
    return build_datasets("fashion_mnist", fashion_root, seed=0, download=False, **LIMITS)


def idx_labels(stem: str, count: int) -> torch.Tensor:
    """The first `count` labels of an IDX label archive of the Debian package (8-byte header)."""
    with gzip.open(data.DEBIAN_FASHION_MNIST_DIR / f"{stem}.gz", "rb") as f:
        raw = f.read(8 + count)
    return torch.tensor(list(raw[8:]), dtype=torch.int64)


@needs_debian
def test_fashion_mnist_loads_from_debian_files(fashion, fashion_root):
    train, val, test, info = fashion
    assert (info.name, info.in_channels, info.num_classes, info.image_size) == ("fashion_mnist", 1, 10, 28)
    assert len(info.class_names) == 10
    # limit_train=600 -> validation min(100, 600 // 5) = 100, training 500.
    assert (len(train), len(val), len(test)) == (500, 100, 200)
    image, label, sample_id = test[5]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and isinstance(sample_id, int) and sample_id == 5
    # Labels are the real ones, in file order.
    torch.testing.assert_close(test.labels, idx_labels("t10k-labels-idx1-ubyte", 200))
    train_labels = idx_labels("train-labels-idx1-ubyte", 600)
    torch.testing.assert_close(train.labels, train_labels[train.sample_ids])
    torch.testing.assert_close(val.labels, train_labels[val.sample_ids])
    # Normalised with the dataset's statistics: roughly zero mean, unit spread.
    images = train[torch.arange(len(train))][0]
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1
    # Decompressed into torchvision's layout, atomically (no temporary files left behind).
    raw = fashion_root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data._IDX_FILES)


@needs_debian
def test_split_is_seeded_disjoint_and_complete(fashion, fashion_root):
    train, val, _, _ = fashion
    train_ids, val_ids = set(train.sample_ids.tolist()), set(val.sample_ids.tolist())
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(range(600))
    again = build_datasets("fashion_mnist", fashion_root, seed=0, download=False, **LIMITS)
    assert torch.equal(again[1].sample_ids, val.sample_ids)
    other = build_datasets("fashion_mnist", fashion_root, seed=1, download=False, **LIMITS)
    assert not torch.equal(other[1].sample_ids, val.sample_ids)


@needs_debian
def test_full_sizes_and_limit_test(fashion_root):
    train, val, test, _ = build_datasets("fashion_mnist", fashion_root, val_size=5000, limit_test=37, download=False)
    assert (len(train), len(val), len(test)) == (55000, 5000, 37)
    assert torch.equal(test.sample_ids, torch.arange(37))
    assert train.sample_ids.max() < 60000


@needs_debian
def test_item_and_batch_indexing_agree(fashion):
    train = fashion[0]
    images, labels, ids = train[[3, 0, 7]]
    for row, index in enumerate([3, 0, 7]):
        image, label, sample_id = train[index]
        assert torch.equal(images[row], image)
        assert (labels[row].item(), ids[row].item()) == (label, sample_id)


@needs_debian
def test_loader_is_seeded_and_covers_each_image_once(fashion):
    train = fashion[0]

    def epoch_ids(loader):
        return torch.cat([ids for _, _, ids in loader])

    loader = make_loader(train, 64, shuffle=True, seed=3)
    first_epoch, second_epoch = epoch_ids(loader), epoch_ids(loader)
    assert sorted(first_epoch.tolist()) == sorted(train.sample_ids.tolist())
    assert not torch.equal(first_epoch, second_epoch)  # a new order each epoch
    assert torch.equal(first_epoch, epoch_ids(make_loader(train, 64, shuffle=True, seed=3)))
    assert not torch.equal(first_epoch, epoch_ids(make_loader(train, 64, shuffle=True, seed=4)))
    images, labels, ids = next(iter(make_loader(train, 64, shuffle=False, seed=0)))
    assert images.shape == (64, 1, 28, 28) and labels.shape == ids.shape == (64,)
    assert torch.equal(ids, train.sample_ids[:64])
    sizes = [len(ids) for _, _, ids in make_loader(train, 64, shuffle=False, seed=0, drop_last=True)]
    assert sizes == [64] * (500 // 64)


def test_random_crop_flip_takes_windows_of_the_padded_image():
    B, H, W = 16, 6, 5
    x = torch.arange(B * H * W, dtype=torch.float32).view(B, 1, H, W) + 1  # no zeros inside
    out = data._random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for b in range(B):
        windows = [padded[b, :, dy : dy + H, dx : dx + W] for dy in range(5) for dx in range(5)]
        straight = any(torch.equal(out[b], w) for w in windows)
        mirrored = any(torch.equal(out[b], w.flip(-1)) for w in windows)
        assert straight or mirrored
        flips += mirrored and not straight
    assert 0 < flips < B
    again = data._random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_unknown_dataset_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"data\.name.*fashion_mnist, mnist, cifar10.*'svhn'"):
        build_datasets("svhn", tmp_path)


def test_bad_val_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"data\.val_size"):
        build_datasets("fashion_mnist", tmp_path, val_size=-1)


def test_missing_data_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-such-package")
    empty_root = tmp_path / "empty"
    with pytest.raises(DataUnavailableError) as caught:
        build_datasets("fashion_mnist", empty_root, download=False)
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(empty_root) in message and "no-such-package" in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)


def test_missing_mnist_without_download(tmp_path):
    with pytest.raises(DataUnavailableError, match="'mnist' not found"):
        build_datasets("mnist", tmp_path, download=False)


@needs_debian
def test_augmented_training_set_is_reproducible_with_workers(fashion_root):
    import numpy as np

    def first_batches(num_workers):
        train = build_datasets("fashion_mnist", fashion_root, seed=0, augment=True, download=False, **LIMITS)[0]
        loader = make_loader(train, 100, shuffle=True, seed=1, num_workers=num_workers)
        return [(images, ids) for images, _, ids in loader][:3], train

    (batches, train), (again, _) = first_batches(2), first_batches(2)
    for (images, ids), (images_again, ids_again) in zip(batches, again, strict=True):
        assert torch.equal(ids, ids_again) and torch.equal(images, images_again)
    # The same images without augmentation: look the batch's sample ids up by position.
    positions = (train.sample_ids[None, :] == batches[0][1][:, None]).nonzero()[:, 1]
    train.augment = False
    plain = train[positions][0]
    assert plain.shape == batches[0][0].shape
    assert not torch.equal(batches[0][0], plain)
    # A numpy integer indexes one item like an int.
    assert torch.equal(train[np.int64(4)][0], train[4][0])


# --------------------------------------------------------------------------------------------
# Where the data came from, and what a failed attempt leaves behind


def write_fake_debian_package(folder, n_train=20, n_test=10):
    """The four gzipped IDX files of the Debian package, with tiny random images."""
    import struct

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.numpy().tobytes())


def test_the_data_source_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    write_fake_debian_package(tmp_path / "debian")
    root = tmp_path / "root"
    root.mkdir()
    with caplog.at_level("INFO", logger="dmoe_torch.data"):
        train, val, test, _ = build_datasets("fashion_mnist", root, val_size=4, download=False)
    assert (len(train), len(val), len(test)) == (16, 4, 10)
    assert f"from {root / 'FashionMNIST' / 'raw'} (unpacked from {tmp_path / 'debian'}" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="dmoe_torch.data"):
        build_datasets("fashion_mnist", root, val_size=4, download=False)  # already unpacked: read as is
    assert caplog.text.rstrip().endswith(f"from {root / 'FashionMNIST' / 'raw'}")


def fake_failed_download(spec, root, *, train, download):
    """What torchvision leaves after a failed download: its folders and a partial archive."""
    if download:
        raw = root / spec.folder
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz.part").write_bytes(b"partial")
    return None


def test_a_failed_attempt_removes_what_it_created(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_try_torchvision", fake_failed_download)
    fresh = tmp_path / "fresh"
    with pytest.raises(DataUnavailableError):
        build_datasets("mnist", fresh, download=True)
    assert not fresh.exists()  # created by the attempt: removed
    # An existing root keeps what it held, and loses what the attempt added.
    root = tmp_path / "root"
    (root / "MNIST").mkdir(parents=True)
    (root / "keep.txt").write_text("mine")
    with pytest.raises(DataUnavailableError):
        build_datasets("mnist", root, download=True)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["MNIST", "keep.txt"]


@needs_debian
@pytest.mark.parametrize("val_size,limit_train", [(100, 600), (5000, 7), (5000, 2), (3, 1000), (0, None)])
def test_split_sizes_are_the_sizes_build_datasets_makes(fashion_root, val_size, limit_train):
    """config.py checks a split with split_sizes before any data is read: the same rule."""
    train, val, _, _ = build_datasets(
        "fashion_mnist", fashion_root, val_size=val_size, limit_train=limit_train, limit_test=1, download=False
    )
    available = data.DATASET_TRAIN_SIZES["fashion_mnist"]
    assert data.split_sizes(available, val_size, limit_train) == (len(train), len(val))


def test_numpy_integers_are_accepted_as_sizes(fashion_root):
    import numpy as np

    if not all(p.is_file() for p in DEBIAN_FILES):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    train, val, test, _ = build_datasets(
        "fashion_mnist",
        fashion_root,
        val_size=np.int64(10),
        limit_train=np.int32(60),
        limit_test=np.int64(5),
        seed=np.int64(0),
        download=False,
    )
    assert (len(train), len(val), len(test)) == (50, 10, 5)
    with pytest.raises(ValueError, match="data.limit_train must be a positive int"):
        build_datasets("fashion_mnist", fashion_root, limit_train=np.float64(60.0), download=False)
