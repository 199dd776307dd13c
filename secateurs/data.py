"""Datasets decoded once into memory, and batches augmented as tensors.

One name per dataset (``cifar10``, ``cifar100``, ``fashion-mnist``, ``digits``, ``isbi2012``,
``hela``, ``imagefolder:PATH``, ``segfolder:PATH``) and one way to say where data lives: the
``root`` argument, else ``$SECATEURS_DATA``, else ``../shared/data`` beside the working directory,
else ``~/.cache/secateurs``. Decoding happens once per dataset: the uint8 tensors are cached as
``.npz`` under the cache directory, so an epoch never touches an image file.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ._validation import check_choice, check_scalar

__all__ = ["ArrayDataset", "Batches", "load_dataset", "list_datasets", "data_roots", "augment", "pad_to_multiple",
           "IGNORE_INDEX"]

IGNORE_INDEX = 255
"""Mask value of unlabelled pixels (Pascal VOC's void borders, Cityscapes' ignore label): they add
nothing to the loss, the metrics or the PLS samples of ``dlp``."""

ENV = "SECATEURS_DATA"
CACHE_ENV = "SECATEURS_CACHE"


@dataclass
class ArrayDataset:
    """Images as uint8 ``[N, C, H, W]``; targets as int64 ``[N]`` (classes) or ``[N, H, W]`` (masks)."""

    name: str
    images: torch.Tensor
    targets: torch.Tensor
    classes: list[str] = field(default_factory=list)
    task: str = "classification"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n: int | None, seed: int = 0) -> "ArrayDataset":
        """``n`` samples of a fixed shuffle, class-balanced when possible (the class counts differ by at
        most one when ``n`` is not a multiple of the classes)."""
        check_scalar(n, "n", int, min_val=0, allow_none=True)
        if n is None or n >= len(self):
            return self
        return self._take(self._subset_index(n, torch.Generator().manual_seed(seed)))


    def _subset_index(self, n: int, gen: torch.Generator) -> torch.Tensor:
        perm = torch.randperm(len(self), generator=gen)
        if self.task == "classification" and self.num_classes:  # (no class names: a plain shuffle)
            per, shuffled = max(1, n // self.num_classes), self.targets[perm]
            extra = n - per * self.num_classes  # n not a multiple of the classes: one more from that many, drawn
            more = set(torch.randperm(self.num_classes, generator=gen)[:extra].tolist()) if extra > 0 else set()
            idx = torch.cat([perm[shuffled == c][:per + (c in more)] for c in range(self.num_classes)])[:n]
            return idx[torch.randperm(len(idx), generator=gen)]
        return perm[:n]

    def holdout(self, n: int, seed: int = 0) -> tuple["ArrayDataset", "ArrayDataset"]:
        """(rest, held-out): ``n`` samples set aside, class-balanced, by a fixed seeded shuffle;
        for segmentation the last ``n`` (serial sections and time-lapse frames are correlated with
        their neighbours: a contiguous block leaks less than a shuffle).

        Anything that picks or stops on a metric (tolerances, latency searches, early stopping)
        reads the held-out part, so the test set is only ever reported, never tuned on.
        """
        check_scalar(n, "n", int, min_val=1, max_val=len(self) - 1)
        idx = (self._subset_index(n, torch.Generator().manual_seed(seed)) if self.task == "classification"
               else torch.arange(len(self) - n, len(self)))
        mask = torch.ones(len(self), dtype=torch.bool)
        mask[idx] = False
        keep = mask.nonzero().squeeze(1)
        return self._take(keep), self._take(idx)

    def _take(self, idx: torch.Tensor) -> "ArrayDataset":
        return ArrayDataset(self.name, self.images[idx], self.targets[idx], self.classes, self.task, self.mean, self.std)


class DataNotFound(FileNotFoundError):
    """Raised with the places searched and how to get the data."""


def data_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Where datasets are looked for, in order."""
    roots = []
    if root is not None:
        roots.append(Path(root))
    if os.environ.get(ENV):
        roots.append(Path(os.environ[ENV]))
    roots += [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data", _cache_dir()]
    return roots


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "secateurs"))


def _find(rel: str, roots: list[Path]) -> Path | None:
    for r in roots:
        if (r / rel).exists():
            return r / rel
    return None


def _missing(name: str, rel: str, roots: list[Path], how: str) -> DataNotFound:
    where = ", ".join(str(r / rel) for r in roots)
    return DataNotFound(f"dataset '{name}' not found; looked for {where}. {how}")


def _cached(key: str, build) -> dict[str, np.ndarray]:
    path = _cache_dir() / f"{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a killed decode leaves no half cache
    return arrays


# -- classification ---------------------------------------------------------------------------
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _decode_jpeg_tar(path: Path) -> dict[str, np.ndarray]:
    """Decode ``split/class/file.jpg`` members in one streaming pass (seeking a .tar.gz is quadratic)."""
    from PIL import Image

    found: list[tuple[str, str, str, np.ndarray]] = []
    with tarfile.open(path, "r|gz") as tar:
        for m in tar:
            if not (m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))):
                continue
            parts = m.name.split("/")
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
            found.append((parts[-3], parts[-2], m.name, np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))
    found.sort(key=lambda f: f[2])
    classes = sorted({f[1] for f in found})
    arrays: dict[str, np.ndarray] = {"classes": np.asarray(classes)}
    for split in sorted({f[0] for f in found}):
        rows = [f for f in found if f[0] == split]
        arrays[f"{split}_x"] = np.stack([f[3] for f in rows])
        arrays[f"{split}_y"] = np.asarray([classes.index(f[1]) for f in rows], dtype=np.int64)
    return arrays


def _cifar(name: str, split: str, roots: list[Path], download: bool) -> ArrayDataset:
    if name == "cifar10":
        tar = _find("cifar10-jpeg.tar.gz", roots)
        if tar is not None:
            a = _cached("cifar10-jpeg", lambda: _decode_jpeg_tar(tar))
            return ArrayDataset("CIFAR-10 (JPEG)", torch.from_numpy(a[f"{split}_x"]), torch.from_numpy(a[f"{split}_y"]),
                                [str(c) for c in a["classes"]], mean=CIFAR_MEAN, std=CIFAR_STD)
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    base = next((r for r in roots if (r / folder).exists()), None)
    if base is None and not download:
        raise _missing(name, folder if name == "cifar100" else "cifar10-jpeg.tar.gz", roots,
                       "Pass download=True (--download) to fetch it with torchvision.")
    base = base or _cache_dir()
    ds = cls(str(base), train=split == "train", download=download and base == _cache_dir())
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(name.upper().replace("CIFAR", "CIFAR-"), x, torch.as_tensor(ds.targets), list(ds.classes),
                        mean=CIFAR_MEAN, std=CIFAR_STD)


def read_idx(path: Path) -> np.ndarray:
    """IDX files (MNIST family): big-endian magic whose last byte is the rank, then the dims."""
    with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion(split: str, roots: list[Path], download: bool) -> ArrayDataset:
    prefix = "train" if split == "train" else "t10k"
    folder = _find(f"fashion-mnist/{prefix}-images-idx3-ubyte.gz", roots)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    if folder is not None:
        x = read_idx(folder)
        y = read_idx(folder.parent / f"{prefix}-labels-idx1-ubyte.gz")
    elif download:
        import torchvision

        ds = torchvision.datasets.FashionMNIST(str(_cache_dir()), train=split == "train", download=True)
        x, y = ds.data.numpy(), ds.targets.numpy()
    else:
        raise _missing("fashion-mnist", "fashion-mnist/", roots, "Pass download=True to fetch it with torchvision.")
    return ArrayDataset("Fashion-MNIST", torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)),
                        classes, mean=(0.2860,), std=(0.3530,))


def _digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    n_train = 1437  # the first 80%: a fixed, documented split
    sl = slice(0, n_train) if split == "train" else slice(n_train, None)
    return ArrayDataset("digits (scikit-learn)", x[sl], y[sl], [str(i) for i in range(10)], mean=(0.3,), std=(0.38,))


def _image_folder(path: Path, split: str) -> ArrayDataset:
    from PIL import Image

    if not path.is_dir():
        raise DataNotFound(f"imagefolder: {str(path)!r} is not a folder")
    base = path / split if (path / split).exists() else path
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataNotFound(f"imagefolder: no class folders under {base}")

    def build():
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for f in sorted((base / c).iterdir()):
                if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
                    xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
                    ys.append(ci)
        return {"x": np.stack(xs), "y": np.asarray(ys, dtype=np.int64)}

    a = _cached(f"imagefolder-{abs(hash(str(base.resolve())))}-{split}", build)
    return ArrayDataset(f"imagefolder:{path}", torch.from_numpy(a["x"]), torch.from_numpy(a["y"]), classes)


# -- segmentation -----------------------------------------------------------------------------
def _isbi(split: str, roots: list[Path]) -> ArrayDataset:
    from PIL import Image

    base = _find("isbi2012-membranes", roots)
    if base is None:
        raise _missing("isbi2012", "isbi2012-membranes", roots,
                       "Get the ISBI 2012 EM segmentation training set (30 slices, image/N.png and label/N.png).")
    idx = range(0, 24) if split == "train" else range(24, 30)  # slices 0-23 train, 24-29 validation
    x = np.stack([np.asarray(Image.open(base / "image" / f"{i}.png").convert("L")) for i in idx])[:, None]
    # label: 255 = cell interior, 0 = membrane; class 1 = membrane (the structure to find)
    y = np.stack([(np.asarray(Image.open(base / "label" / f"{i}.png")) < 128).astype(np.int64) for i in idx])
    return ArrayDataset("ISBI 2012 membranes", torch.from_numpy(x), torch.from_numpy(y), ["cell", "membrane"],
                        task="segmentation", mean=(0.5,), std=(0.2,))


def _hela(split: str, roots: list[Path]) -> ArrayDataset:
    path = _find("hela-nuclei/hela-nuclei.npz", roots)
    if path is None:
        raise _missing("hela", "hela-nuclei/hela-nuclei.npz", roots,
                       "Get Fluo-N2DL-HeLa sequence 02 from the Cell Tracking Challenge.")
    with np.load(path) as z:
        img, lab = z["image"].astype(np.float32), z["labels"]
    lo, hi = np.percentile(img, 1), np.percentile(img, 99.8)
    img = np.clip((img - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    sl = slice(0, 16) if split == "train" else slice(16, 20)  # frames 0-15 train, 16-19 test (split by time)
    return ArrayDataset("HeLa nuclei (CTC Fluo-N2DL-HeLa 02)", torch.from_numpy(img[sl][:, None].copy()),
                        torch.from_numpy((lab[sl] > 0).astype(np.int64)), ["background", "nucleus"],
                        task="segmentation", mean=(0.2,), std=(0.25,))


def _seg_folder(path: Path, split: str) -> ArrayDataset:
    from PIL import Image

    base = path / split if (path / split).exists() else path
    if not (base / "image").exists() or not (base / "label").exists():
        raise DataNotFound(f"segfolder: expected {base}/image/* and {base}/label/* with matching names")
    names = sorted(f.name for f in (base / "image").iterdir())
    x = np.stack([np.asarray(Image.open(base / "image" / n).convert("L")) for n in names])[:, None]
    y = np.stack([np.asarray(Image.open(base / "label" / n)) > 0 for n in names]).astype(np.int64)
    return ArrayDataset(f"segfolder:{path}", torch.from_numpy(x), torch.from_numpy(y), ["background", "foreground"],
                        task="segmentation", mean=(0.5,), std=(0.25,))


_NAMES = ["cifar10", "cifar100", "fashion-mnist", "digits", "isbi2012", "hela", "imagefolder:PATH", "segfolder:PATH"]


def list_datasets() -> list[str]:
    return list(_NAMES)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = False) -> ArrayDataset:
    """Load a dataset split into memory (decoded once, cached).

    ``split`` is ``"train"`` or ``"test"`` (the validation split for segmentation).
    """
    check_choice(split, "split", ("train", "test"))
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a dataset name (str), one of {', '.join(_NAMES)}; got {type(name).__name__}")
    roots = data_roots(root)
    kind, _, arg = name.partition(":")
    if kind in ("cifar10", "cifar100") and not arg:
        return _cifar(kind, split, roots, download)
    if kind == "fashion-mnist":
        return _fashion(split, roots, download)
    if kind == "digits":
        return _digits(split)
    if kind == "isbi2012":
        return _isbi(split, roots)
    if kind == "hela":
        return _hela(split, roots)
    if kind == "imagefolder" and arg:
        return _image_folder(Path(arg), split)
    if kind == "segfolder" and arg:
        return _seg_folder(Path(arg), split)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(_NAMES)}")


# -- batches ----------------------------------------------------------------------------------
def augment(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, pad: int = 4, flip: bool = True,
            crop: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crop (after zero padding, or to ``crop`` pixels) and horizontal flip, per sample,
    for a whole uint8/float batch at once; masks ``y`` follow their images."""
    n, _, h, w = x.shape
    th, tw = (crop, crop) if crop else (h, w)
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        if y is not None and y.dim() == 3:
            y = torch.nn.functional.pad(y, (pad, pad, pad, pad), value=IGNORE_INDEX)  # padding is no class
    H, W = x.shape[-2:]
    oy = torch.randint(0, H - th + 1, (n,), generator=gen)
    ox = torch.randint(0, W - tw + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(th))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(tw))[:, None, None, :]
    bidx = torch.arange(n)[:, None, None, None]
    x = x[bidx, torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if y is not None and y.dim() == 3:
        y = y[bidx[:, 0], rows[:, 0], cols[:, 0]]
    if flip:
        f = torch.rand(n, generator=gen) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
        if y is not None and y.dim() == 3:
            y = torch.where(f[:, None, None], y.flip(-1), y)
    return x, y


def cutout_mask(n: int, h: int, w: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, h, w) float mask with one ``size`` x ``size`` square of zeros per sample, centred
    anywhere in the image (so it may be cut by the border), as in DeVries & Taylor 2017. Applied
    after normalisation it blanks to the dataset mean: the regulariser that lets small CIFAR
    ResNets stop memorising the training set."""
    cy = torch.randint(0, h, (n,), generator=gen)[:, None, None]
    cx = torch.randint(0, w, (n,), generator=gen)[:, None, None]
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    lo, hi = size // 2, size - size // 2
    inside = (rows >= cy - lo) & (rows < cy + hi) & (cols >= cx - lo) & (cols < cx + hi)
    return (~inside).float()[:, None]


class Batches:
    """Shuffled, augmented mini-batches of an :class:`ArrayDataset`, shared out across processes.

    ``batch_size`` is the *global* batch. The order and the augmentation of epoch ``e`` depend
    only on ``(seed, e)``: a run resumed at epoch ``e`` sees exactly the batches an uninterrupted
    run saw, and ``world`` processes each taking their slice of every global batch see exactly the
    samples one process would (so distributed training matches single-process training).
    """

    def __init__(self, ds: ArrayDataset, batch_size: int, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 pad: int = 4, crop: int | None = None, flip: bool = True, cutout: int = 0) -> None:
        if train and batch_size % world:
            raise ValueError(f"`batch_size` ({batch_size}) must be a multiple of the number of processes ({world})")
        self.ds, self.batch_size, self.train, self.seed = ds, batch_size, train, seed
        self.rank, self.world, self.pad, self.crop, self.flip = rank, world, pad, crop, flip
        self.cutout = cutout
        mean = torch.tensor(ds.mean or (0.5,) * ds.images.shape[1]).view(1, -1, 1, 1)
        std = torch.tensor(ds.std or (0.25,) * ds.images.shape[1]).view(1, -1, 1, 1)
        self._scale, self._shift = 1 / (255 * std), mean / std
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self._scale - self._shift

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.ds)
        if self.train:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            idx = torch.arange(n)
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + 1)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.ds.images[sel], self.ds.targets[sel]
            if self.train and (self.pad or self.crop or self.flip):
                x, y = augment(x, y, gen, pad=self.pad, flip=self.flip, crop=self.crop)
            # drawn for the global batch, before the split, so every world size sees the same squares
            mask = cutout_mask(len(x), *x.shape[-2:], self.cutout, gen) if self.train and self.cutout else None
            if self.world > 1:  # this process's share of the global batch
                per = -(-len(x) // self.world)
                part = slice(self.rank * per, (self.rank + 1) * per)
                x, y, mask = x[part], y[part], mask[part] if mask is not None else None
            x = self.normalize(x)
            yield (x * mask if mask is not None else x), y


def pad_to_multiple(x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Pad H and W at the bottom and right up to a multiple of ``multiple``, reflecting the image (an
    encoder-decoder halves the size at every level, and its skips must meet the upsampled path)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
