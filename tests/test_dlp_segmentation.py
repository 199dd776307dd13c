"""Layer pruning (dlp) on segmentation masks: each cell of a coarse grid is a PLS sample labelled
by its share of every class, so a U-Net's encoder blocks are scored and removed like a classifier's."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import secateurs
from secateurs.data import ArrayDataset, Batches
from secateurs.models import create_model
from secateurs.pls import block_features, block_scores


class Probe(nn.Module):
    """``good`` passes the image on (its first channel draws the mask), ``noise`` replaces it by noise."""

    def __init__(self) -> None:
        super().__init__()
        self.good = nn.Identity()
        self.noise = nn.Identity()

    def forward(self, x):
        g = self.good(x)
        n = self.noise(torch.randn(x.shape, generator=torch.Generator().manual_seed(int(x.sum()) % 1000)))
        return g + 0 * n


def _halves(n: int = 12, size: int = 16) -> ArrayDataset:
    """Images whose left half (class 1) is bright in channel 0 and whose right half is background."""
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, size, size, generator=gen) * 60).to(torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    masks[:, :, : size // 2] = 1
    images[:, 0, :, : size // 2] += 150
    return ArrayDataset("halves", images, masks, ["bg", "fg"], task="segmentation")


def test_cells_are_samples_labelled_by_their_class_shares():
    ds = _halves()
    feats, y = block_features(Probe(), ["good"], ds, per_class=None, pool=4)
    assert feats["good"].shape == (12 * 16, 3)  # 12 images x a 4x4 grid, 3 channels
    assert y.shape == (12 * 16, 2)
    # row-major cells of each image: the two left columns of the grid are class 1, the rest class 0
    fg = np.tile(np.tile([1.0, 1.0, 0.0, 0.0], 4), 12)
    np.testing.assert_array_equal(y[:, 1], fg)
    np.testing.assert_array_equal(y[:, 0], 1 - fg)
    # a cell's feature is its mean over the 4x4 pixels it covers (images normalised by the dataset's stats)
    assert (feats["good"][fg == 1, 0].min() > feats["good"][fg == 0, 0].max())


def test_a_cell_on_a_class_border_is_labelled_by_its_share():
    ds = _halves(n=2, size=16)
    ds.targets[:, :, :] = 0
    ds.targets[:, :, :6] = 1  # 6 of the first 8 columns: cells of the first grid column (pool 2) are 3/4 class 1
    _, y = block_features(Probe(), ["good"], ds, per_class=None, pool=2)
    np.testing.assert_allclose(y[:, 1], [0.75, 0.0, 0.75, 0.0] * 2)


def test_unlabelled_pixels_belong_to_no_class():
    """VOC-style void (255) is no third class: no label column, and a cell's shares count only labelled pixels."""
    from secateurs.data import IGNORE_INDEX

    ds = _halves(n=4, size=16)
    ds.targets[:, :, 12:] = IGNORE_INDEX  # the right quarter unlabelled
    ds.targets[2:] = IGNORE_INDEX  # two images with no labelled pixel: they show no class
    _, y = block_features(Probe(), ["good"], ds, per_class=None, pool=4)
    assert y.shape == (4 * 16, 2)
    np.testing.assert_array_equal(y[:32], np.tile([[0, 1], [0, 1], [1, 0], [0, 0]], (8, 1)))
    assert (y[32:] == 0).all()
    _, y = block_features(Probe(), ["good"], ds, per_class=1, pool=4)
    assert len(y) == 16  # one image shows both classes; the void ones add to no class and are not taken


class Down(Probe):
    """'good' at 16px, 'pool' at 2px, 'vec' a vector [B, 12] per image."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.vec = nn.Flatten()

    def forward(self, x):
        return self.vec(self.pool(self.good(x)))


def test_every_output_is_pooled_onto_the_masks_grid():
    ds = _halves(n=3)
    images = Batches(ds, 3, train=False).normalize(ds.images)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).numpy()  # noqa: E731 (row-major cells)
    feats, y = block_features(Down(), ["good", "pool", "vec"], ds, per_class=None, pool=8)
    assert y.shape == (3 * 64, 2)  # an 8x8 grid over each 16px image
    np.testing.assert_array_equal(y[:, 1], np.tile(np.tile([1.0] * 4 + [0.0] * 4, 8), 3))
    np.testing.assert_allclose(feats["good"], rows(F.avg_pool2d(images, 2)), rtol=1e-5, atol=1e-6)
    # a 2x2 output covers 4x4 cells each: repeated onto them
    np.testing.assert_allclose(feats["pool"], rows(F.interpolate(F.avg_pool2d(images, 8), size=8)), rtol=1e-5, atol=1e-6)
    vec = feats["vec"].reshape(3, 64, 12)
    assert (vec == vec[:, :1]).all()  # one vector per image, on every cell
    # the filters' features: each channel's maximum over each cell
    feats, y = block_features(Down(), ["good"], ds, per_class=None, pool="max")
    np.testing.assert_allclose(feats["good"], rows(F.max_pool2d(images, 2)), rtol=1e-5, atol=1e-6)


def test_masks_with_a_channel_one_hot_labels_and_mixed_data():
    ds = _halves(n=4)
    x = Batches(ds, 4, train=False).normalize(ds.images)
    f3, y3 = block_features(Probe(), ["good"], [(x, ds.targets)], per_class=None, pool=4)
    f4, y4 = block_features(Probe(), ["good"], [(x, ds.targets[:, None])], per_class=None, pool=4)
    np.testing.assert_array_equal(y3, y4)
    np.testing.assert_array_equal(f3["good"], f4["good"])
    one_hot = torch.eye(2)[torch.tensor([0, 1, 1, 1])]  # image-level labels as one-hot rows: as before, per image
    f, y = block_features(Probe(), ["good"], [(x, one_hot)], per_class=1, pool=4)
    assert y.tolist() == [[1.0, 0.0], [0.0, 1.0]] and f["good"].shape == (2, 3 * 16)
    with pytest.raises(ValueError, match="mixes class labels and segmentation masks"):
        block_features(Probe(), ["good"], [(x[:2], torch.tensor([0, 1])), (x[2:], ds.targets[2:])], per_class=None)


def test_per_class_counts_a_mask_for_every_class_it_shows():
    ds = _halves(n=10)
    ds.targets[:6] = 0  # six background-only images, then four with both classes
    shows_fg = lambda y: y[:, 1].reshape(-1, 64).max(1) > 0  # noqa: E731 (per image: 8x8 cells)
    _, y = block_features(Probe(), ["good"], ds, per_class=3, pool="max")
    # images are taken (in a seeded order) until both classes have three: exactly three show class 1
    assert shows_fg(y).sum() == 3 and 3 <= len(shows_fg(y)) <= 6
    batches = [(ds.images[i:i + 2].float(), ds.targets[i:i + 2]) for i in range(0, 10, 2)]
    _, y = block_features(Probe(), ["good"], batches, per_class=3, pool="max")
    assert shows_fg(y).tolist() == [False] * 3 + [True] * 3  # in order: 3 background-only, then 3 with both


def test_vip_finds_the_block_that_draws_the_mask():
    ds = _halves(n=16)
    # one PLS over both blocks (joint): alone, a block's mean VIP only says how evenly its channels share it
    scores = block_scores(Probe(), ["good", "noise"], ds, per_class=None, pool=4, joint=True)
    assert scores["good"] > 1.5 * scores["noise"]
    ds.targets[:] = 0
    with pytest.raises(ValueError, match="single class"):
        block_scores(Probe(), ["good"], ds, per_class=None, pool=4)


smp = pytest.importorskip("segmentation_models_pytorch")


def test_dlp_removes_unet_encoder_blocks_on_masks():
    torch.manual_seed(0)
    model = create_model("smp:Unet:resnet18", classes=2).eval()
    x = torch.randn(1, 3, 64, 64)
    ds = _halves(n=8, size=64)
    before = secateurs.count(model, x)
    pruned, report = secateurs.prune(copy.deepcopy(model), x, "dlp", data=ds,
                                     method_options={"count": 2, "per_class": 8, "min_per_stage": 0})
    gone = list(report["steps"][1]["removed"])
    assert len(gone) == 2 and all(n.startswith("encoder.layer") for n in gone)
    scores = report["method_output"]["block_scores"]
    kept = [n for n in scores if n not in gone]
    assert max(scores[n] for n in gone) <= min(scores[n] for n in kept)  # the lowest-VIP blocks went
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (1, 2, 64, 64)
    assert secateurs.count(pruned, x).macs < before.macs
    with pytest.raises(ValueError, match="mode='truncate'.*segmentation"):
        secateurs.prune(copy.deepcopy(model), x, "dlp", data=ds, method_options={"mode": "truncate"})
