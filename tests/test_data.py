"""Datasets: real files from ../shared/data where present, decoded once; batched augmentation."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs import data
from secateurs.data import ArrayDataset, Batches, DataNotFound, augment, load_dataset, read_idx


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


def test_unknown_and_missing_datasets_say_where_they_looked(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; available: cifar10"):
        load_dataset("mnist")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFound, match="looked for .*isbi2012-membranes"):
        load_dataset("isbi2012", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="`split` must be 'train' or 'test'"):
        load_dataset("digits", "val")


def test_jpeg_tar_layout_is_decoded_and_cached(tmp_path, monkeypatch):
    from PIL import Image

    buf = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(buf, "w:gz") as tar:
        for split, n in (("train", 3), ("test", 2)):
            for cls, value in (("cat", 10), ("dog", 200)):
                for i in range(n):
                    b = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(b, format="JPEG", quality=95)
                    info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{i:04d}.jpg")
                    info.size = len(b.getvalue())
                    tar.addfile(info, io.BytesIO(b.getvalue()))
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert ds.images.shape == (6, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert abs(int(ds.images[0].float().mean()) - 10) <= 2 and abs(int(ds.images[-1].float().mean()) - 200) <= 2
    assert ds.name == "CIFAR-10 (JPEG)"
    assert len(list((Path(data._cache_dir())).glob("cifar10-jpeg.npz"))) == 1
    buf.unlink()  # second load comes from the cache
    assert torch.equal(load_dataset("cifar10", "test", root=tmp_path).targets, torch.tensor([0, 0, 1, 1]))


def test_idx_reader(tmp_path):
    import gzip

    payload = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], dtype=">i4").tobytes() + payload.tobytes()
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "x.gz"), payload)


@pytest.mark.shared_data()
def test_fashion_mnist_from_shared():
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.targets.bincount().tolist() == [1000] * 10


@pytest.mark.shared_data()
def test_segmentation_sets_from_shared():
    isbi = load_dataset("isbi2012", "train")
    assert isbi.images.shape == (24, 1, 512, 512) and isbi.task == "segmentation"
    assert 0.1 < isbi.targets.float().mean() < 0.4  # membranes are a minority class
    hela = load_dataset("hela", "test")
    assert hela.images.shape == (4, 1, 700, 1100) and hela.images.dtype == torch.uint8
    assert 0.01 < hela.targets.float().mean() < 0.5


def test_digits_and_balanced_subset():
    ds = load_dataset("digits", "train")
    assert ds.images.shape == (1437, 1, 8, 8) and ds.images.max() == 255
    sub = ds.subset(100)
    assert len(sub) == 100 and sub.targets.bincount().tolist() == [10] * 10
    odd = ds.subset(105)  # not a multiple of the 10 classes: all 105, five classes with one more
    assert len(odd) == 105 and sorted(odd.targets.bincount().tolist()) == [10] * 5 + [11] * 5
    assert torch.equal(odd.images, ds.subset(105).images)
    # a dataset built without class names (the field's default) is a plain seeded shuffle, not an error
    bare = ArrayDataset("bare", ds.images, ds.targets)
    assert len(bare.subset(100)) == 100 and torch.equal(bare.subset(100).images, bare.subset(100).images)


def test_holdout_is_disjoint_balanced_and_fixed():
    ds = load_dataset("digits", "train")
    rest, held = ds.holdout(100)
    assert len(rest) + len(held) == len(ds) and held.targets.bincount().tolist() == [10] * 10
    # disjoint and complete: every image lands on exactly one side
    key = lambda d: sorted(map(bytes, d.images.flatten(1).numpy()))  # noqa: E731
    assert key(rest) + key(held) != [] and sorted(key(rest) + key(held)) == key(ds)
    assert torch.equal(ds.holdout(100)[1].images, held.images)  # the same split every time
    with pytest.raises(ValueError, match="n"):
        ds.holdout(len(ds))
    isbi = load_dataset("isbi2012", "train")  # slices 0-23: the last 4 sections are held out, in order
    rest, held = isbi.holdout(4)
    assert torch.equal(held.images, isbi.images[20:]) and torch.equal(rest.targets, isbi.targets[:20])


def test_augment_crops_and_flips_whole_batches_consistently():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4).view(2, 1, 4, 4)
    y = x[:, 0].clone()  # the mask is the image: it must stay aligned
    xa, ya = augment(x, y, gen, pad=1, flip=True)
    padded = ya == data.IGNORE_INDEX  # the border the crop took in is no class: the loss and metrics skip it
    assert xa.shape == x.shape and padded.any() and torch.equal(xa[:, 0], torch.where(padded, 0, ya))
    assert (xa[:, 0][padded] == 0).all()
    xc, yc = augment(x, y, gen, pad=0, flip=False, crop=2)
    assert xc.shape == (2, 1, 2, 2) and torch.equal(xc[:, 0], yc)


def test_batches_shard_the_global_batch():
    ds = load_dataset("digits", "train")
    full = list(Batches(ds, 64, train=True, seed=5, pad=0, flip=False))
    parts = [list(Batches(ds, 64, train=True, seed=5, rank=r, world=2, pad=0, flip=False)) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(full, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        Batches(ds, 63, train=True, world=2)


def test_cutout_blanks_one_square_to_the_mean_per_sample():
    gen = torch.Generator().manual_seed(0)
    mask = data.cutout_mask(500, 12, 12, 4, gen)
    blanked = (mask == 0).sum((1, 2, 3))
    # a square centred inside the border keeps all 16 pixels; one at a corner keeps a quarter
    assert blanked.max() == 16 and blanked.min() == 4 and set(mask.unique().tolist()) == {0.0, 1.0}
    for m in mask[:20, 0]:  # the zeros form one axis-aligned rectangle
        rows, cols = (m == 0).nonzero().unbind(1)
        assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    ds = load_dataset("digits", "train")
    plain = list(Batches(ds, 64, train=True, seed=5, pad=0, flip=False))
    cut = list(Batches(ds, 64, train=True, seed=5, pad=0, flip=False, cutout=4))
    for (x, y), (xc, yc) in zip(plain, cut):
        assert torch.equal(y, yc)
        hole = (xc == 0).all(1)  # blanked to 0 after normalisation: the dataset mean
        assert (hole.sum((1, 2)) >= 4).all() and torch.equal(xc[~hole.unsqueeze(1).expand_as(xc)],
                                                               x[~hole.unsqueeze(1).expand_as(x)])
    # the squares are drawn for the global batch: two processes see one process's batch split in two
    parts = [list(Batches(ds, 64, train=True, seed=5, rank=r, world=2, pad=0, flip=False, cutout=4)) for r in range(2)]
    for (x, _), (x0, _), (x1, _) in zip(cut, *parts):
        assert torch.equal(torch.cat([x0, x1]), x)


def test_cifar100_python_layout_is_read(tmp_path, monkeypatch):
    """The download path's on-disk format (pickled batches), built by hand: no network needed."""
    import pickle

    import torchvision

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "fine_labels": [i % 3 for i in range(n)]}
        (folder / split).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bee", "cup"]}))
    # torchvision verifies md5 sums of the real files; these are stand-ins
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    ds = load_dataset("cifar100", "test", root=tmp_path)
    assert ds.images.shape == (4, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.targets.tolist() == [0, 1, 2, 0] and ds.classes == ["apple", "bee", "cup"]
    with pytest.raises(DataNotFound, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path / "nowhere")
