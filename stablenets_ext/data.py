"""Datasets and an in-memory batch loader.

``load_dataset(name)`` returns a :class:`Dataset` of float32 features and int64
labels, split into train and validation (the test set, for the image data):

- ``ellipse``: two concentric elliptic annuli in 2-D (semi-axes ``a`` and
  ``b = a/2``; class 0 has ``a`` in [0, 1], class 1 ``a`` in [1, 2]); 500
  training and 100 validation points per class.
- ``swiss``: two interleaved swiss-roll spirals in 2-D (angle 0 to 4 pi, radii
  0 to 1 and 0.2 to 1.2), 513 points per class; alternate points go to
  training and validation.
- ``digits``: scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split.
- ``mnist``, ``cifar10``, ``cifar100``: read from the files torchvision
  downloads (IDX files; pickled batches), downloaded through torchvision when
  online. Images keep their ``(C, H, W)`` shape and are standardised per
  channel with the training mean and standard deviation.

Any dataset can be cached as HDF5 (``cache=``) and read back in one go;
:class:`TensorLoader` then serves batches by indexing the resident tensors, so
no Python decoding happens per batch.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import socket
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

DATASETS = ("ellipse", "swiss", "digits", "mnist", "cifar10", "cifar100")
IMAGE_DATASETS = ("mnist", "cifar10", "cifar100")
DATA_ENV = "STABLENETS_DATA"


@dataclass
class Dataset:
    """Train and validation tensors plus what a model needs to know about them."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    features: int | tuple
    classes: int
    meta: dict = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return isinstance(self.features, tuple)

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.train_x.to(device), self.train_y.to(device),
                       self.val_x.to(device), self.val_y.to(device), self.features,
                       self.classes, dict(self.meta))

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, "
                f"val={tuple(self.val_x.shape)}, features={self.features}, "
                f"classes={self.classes})")


def default_root() -> str:
    return os.path.expanduser(os.environ.get(DATA_ENV, "~/.cache/stablenets/data"))


# --------------------------------------------------------------- synthetic


def ellipse(seed=0, train_per_class=500, val_per_class=100) -> Dataset:
    """Two concentric elliptic annuli; the split is part of the random draw."""
    g = torch.Generator().manual_seed(seed)
    n = train_per_class + val_per_class

    def draw(lo, hi):
        a = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
        theta = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
        return torch.stack([a * torch.cos(theta), 0.5 * a * torch.sin(theta)], 1).float()

    parts = [draw(0.0, 1.0), draw(1.0, 2.0)]
    tr = torch.cat([p[:train_per_class] for p in parts])
    va = torch.cat([p[train_per_class:] for p in parts])
    ytr = torch.arange(2).repeat_interleave(train_per_class)
    yva = torch.arange(2).repeat_interleave(val_per_class)
    return Dataset("ellipse", tr, ytr, va, yva, 2, 2, {"seed": seed})


def swiss(points_per_class=513) -> Dataset:
    """Two interleaved spirals; even-indexed points train, odd ones validate."""
    t = torch.linspace(0, 4 * math.pi, points_per_class, dtype=torch.float64)
    arms = []
    for r0 in (0.0, 0.2):
        r = torch.linspace(r0, r0 + 1.0, points_per_class, dtype=torch.float64)
        arms.append(torch.stack([r * torch.cos(t), r * torch.sin(t)], 1).float())
    tr = torch.cat([a[0::2] for a in arms])
    va = torch.cat([a[1::2] for a in arms])
    ntr, nva = arms[0][0::2].shape[0], arms[0][1::2].shape[0]
    ytr = torch.cat([torch.full((ntr,), c) for c in range(2)])
    yva = torch.cat([torch.full((nva,), c) for c in range(2)])
    return Dataset("swiss", tr, ytr, va, yva, 2, 2, {})


def digits(test_fraction=0.2, split_seed=0) -> Dataset:
    """scikit-learn's 8x8 digits scaled to [0, 1]; the stratified split is fixed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    xtr, xva, ytr, yva = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    return Dataset("digits", torch.from_numpy(xtr), torch.from_numpy(ytr),
                   torch.from_numpy(xva), torch.from_numpy(yva), 64, 10,
                   {"split_seed": split_seed, "test_fraction": test_fraction})


# ------------------------------------------------------------------ images

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "val_x": "t10k-images-idx3-ubyte",
    "val_y": "t10k-labels-idx1-ubyte",
}
CIFAR = {
    "cifar10": {"folder": "cifar-10-batches-py", "classes": 10, "label": b"labels",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "tv": "CIFAR10"},
    "cifar100": {"folder": "cifar-100-python", "classes": 100, "label": b"fine_labels",
                 "train": ["train"], "test": ["test"], "tv": "CIFAR100"},
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of the MNIST files."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, "
                         f"found {data.size}")
    return data.reshape(dims)


def _find(root, candidates, name):
    """The first existing ``<dir>/<name>[.gz]`` among the candidate folders."""
    for d in candidates:
        for suffix in ("", ".gz"):
            p = os.path.join(root, d, name + suffix)
            if os.path.exists(p):
                return p
    return None


def _mnist_paths(root):
    found = {k: _find(root, ("MNIST/raw", "mnist", "MNIST", ""), v) for k, v in MNIST_FILES.items()}
    return None if any(p is None for p in found.values()) else found


def _cifar_dir(root, name):
    d = os.path.join(root, CIFAR[name]["folder"])
    spec = CIFAR[name]
    ok = all(os.path.exists(os.path.join(d, f)) for f in spec["train"] + spec["test"])
    return d if ok else None


def _online(host="www.cs.toronto.edu", timeout=3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _missing(name, root, where, why):
    return FileNotFoundError(
        f"dataset {name!r}: files not found under {root!r} and {why}. Put {where} there "
        f"(or pass root=/ --data-root, or set ${DATA_ENV}), or run once where the machine is "
        f"online with torchvision installed to download them."
    )


def _download(name, root, download):
    """Fetch through torchvision; None means 'if online'. Returns a reason on failure."""
    if download is False:
        return "download=False"
    try:
        installed = importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):  # ValueError: a None entry in sys.modules
        installed = False
    if not installed:
        return "torchvision is not installed (pip install torchvision) to download them"
    if download is None and not _online("ossci-datasets.s3.amazonaws.com" if name == "mnist" else "www.cs.toronto.edu"):
        return "the machine is offline"
    try:
        import torchvision.datasets as tvd

        cls = getattr(tvd, "MNIST" if name == "mnist" else CIFAR[name]["tv"])
        for train in (True, False):
            cls(root, train=train, download=True)
    except Exception as exc:  # network errors come in many types
        return f"downloading failed ({type(exc).__name__}: {exc})"
    return None


def _standardise(train, val):
    dims = (0, 2, 3)
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (val - mean) / std, mean.flatten().tolist(), std.flatten().tolist()


def mnist(root=None, download=None) -> Dataset:
    root = root or default_root()
    paths = _mnist_paths(root)
    if paths is None:
        why = _download("mnist", root, download)
        paths = _mnist_paths(root)
        if paths is None:
            where = ", ".join(MNIST_FILES.values()) + " (IDX files, optionally .gz) in MNIST/raw/"
            raise _missing("mnist", root, where, why or "torchvision did not write them")
    arr = {k: read_idx(p) for k, p in paths.items()}
    tr = torch.from_numpy(arr["train_x"].astype(np.float32) / 255.0).unsqueeze(1)
    va = torch.from_numpy(arr["val_x"].astype(np.float32) / 255.0).unsqueeze(1)
    tr, va, mean, std = _standardise(tr, va)
    ytr = torch.from_numpy(arr["train_y"].astype(np.int64))
    yva = torch.from_numpy(arr["val_y"].astype(np.int64))
    return Dataset("mnist", tr, ytr, va, yva, tuple(tr.shape[1:]), 10, {"mean": mean, "std": std})


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def cifar(name, root=None, download=None) -> Dataset:
    root = root or default_root()
    spec = CIFAR[name]
    d = _cifar_dir(root, name)
    if d is None:
        why = _download(name, root, download)
        d = _cifar_dir(root, name)
        if d is None:
            where = f"{spec['folder']}/ with {', '.join(spec['train'] + spec['test'])} (python pickles)"
            raise _missing(name, root, where, why or "torchvision did not write them")

    def read(files):
        xs, ys = [], []
        for f in files:
            batch = _unpickle(os.path.join(d, f))
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[spec["label"]], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
        return x, torch.from_numpy(np.concatenate(ys))

    tr, ytr = read(spec["train"])
    va, yva = read(spec["test"])
    tr, va, mean, std = _standardise(tr, va)
    return Dataset(name, tr, ytr, va, yva, (3, 32, 32), spec["classes"], {"mean": mean, "std": std})


# ------------------------------------------------------------------- cache


def save_hdf5(data: Dataset, path) -> None:
    """Write a dataset to one HDF5 file (atomically: a temporary file, then a rename)."""
    import h5py
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        for key in ("train_x", "train_y", "val_x", "val_y"):
            f.create_dataset(key, data=getattr(data, key).numpy())
        f.attrs["name"] = data.name
        f.attrs["features"] = json.dumps(data.features)
        f.attrs["classes"] = data.classes
        f.attrs["meta"] = json.dumps(data.meta)
    os.replace(tmp, path)


def load_hdf5(path) -> Dataset:
    """Read a dataset written by :func:`save_hdf5`, wholly into memory."""
    import h5py
    import json

    with h5py.File(path, "r") as f:
        t = {k: torch.from_numpy(f[k][()]) for k in ("train_x", "train_y", "val_x", "val_y")}
        features = json.loads(f.attrs["features"])
        features = tuple(features) if isinstance(features, list) else int(features)
        return Dataset(str(f.attrs["name"]), t["train_x"], t["train_y"], t["val_x"], t["val_y"],
                       features, int(f.attrs["classes"]), json.loads(f.attrs["meta"]))


def load_dataset(name, *, root=None, seed=0, download=None, cache=None) -> Dataset:
    """Load a dataset by name.

    ``root``: folder of the image files (default ``$STABLENETS_DATA`` or
    ``~/.cache/stablenets/data``). ``seed``: draw of the random synthetic sets
    (ellipse). ``download``: True, False or None (download when online, image
    sets only). ``cache``: an HDF5 path, True (``<root>/<name>[-seed].h5``), or
    None/False for none: an existing cache is read, else it is written."""
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {name!r}")
    path = None
    if cache:
        stem = f"{name}-seed{seed}" if name == "ellipse" else name
        path = os.path.join(root or default_root(), f"{stem}.h5") if cache is True else os.fspath(cache)
        if os.path.exists(path):
            data = load_hdf5(path)
            if data.name != name:
                raise ValueError(f"cache: {path!r} holds dataset {data.name!r}, not {name!r}")
            return data
    if name == "ellipse":
        data = ellipse(seed)
    elif name == "swiss":
        data = swiss()
    elif name == "digits":
        data = digits()
    elif name == "mnist":
        data = mnist(root, download)
    else:
        data = cifar(name, root, download)
    if path is not None:
        save_hdf5(data, path)
    return data


# ------------------------------------------------------------------ loader


class TensorLoader:
    """Batches of resident tensors: one index per batch, no per-item work.

    On a CUDA device the tensors are staged once through pinned memory and kept
    on the GPU. ``shuffle`` draws a fresh permutation per epoch from
    ``(seed, epoch)`` alone, so a resumed run sees the same batches as an
    uninterrupted one; call :meth:`set_epoch` (the trainers do) to pick it."""

    def __init__(self, x, y, batch_size, shuffle=False, seed=0, device=None, drop_last=False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x, y: expected the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        device = torch.device(device) if device is not None else x.device
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        self.x, self.y, self.device = x, y, device
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.epoch = drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = self.x.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.device)
        else:
            order = None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min(n, (i + 1) * self.batch_size)
            if order is None:
                yield self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)
