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
  channel with the training mean and standard deviation. Validation is a
  fixed split held out of the training files (``val_fraction``, 1/12: 5000
  MNIST images); the test files become ``test_x``/``test_y``, which the CLI
  evaluates once, at the end.

Files that are not what they should be (truncated, bad gzip, wrong shape,
labels out of range, a foreign pickle) raise :class:`DataError`, one line
naming the file.

Any dataset can be cached as HDF5 (``cache=``) and read back in one go; the
cache records every parameter that shapes the data (a cache of other data is
refused, naming the parameters; an unreadable one is rebuilt with a warning);
:class:`TensorLoader` then serves batches by indexing the resident tensors, so
no Python decoding happens per batch.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import pickle
import socket
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

DATASETS = ("ellipse", "swiss", "digits", "mnist", "cifar10", "cifar100")
IMAGE_DATASETS = ("mnist", "cifar10", "cifar100")
DATA_ENV = "STABLENETS_DATA"
IMAGE_VAL_FRACTION = 1 / 12  # MNIST: 5000 of the 60000 training images
CACHE_VERSION = 2


class DataError(ValueError):
    """A data file that is not what it should be; the message names it."""


@dataclass
class Dataset:
    """Train and validation tensors plus what a model needs to know about them:
    what every trainer takes as ``data``.

    :func:`load_dataset` returns one; build one yourself to train on your own
    tensors. The trainers read ``train_x``/``train_y`` (shuffled batches),
    ``val_x``/``val_y`` (evaluated after every epoch), ``classes`` and the
    shape of one example; ``test_x``/``test_y`` are only evaluated by the
    command line, once, at the end. No argument is checked here
    (:func:`~stablenets_ext.training.train` refuses an empty training or
    validation split).

    Args:
        name (str): a label for messages and caches (``"mnist"``, ``"toy"``...).
        train_x (Tensor): training examples, ``(N, features)`` rows or
            ``(N, C, H, W)`` images, float32.
        train_y (Tensor): their labels, ``(N,)`` int64 in ``0 .. classes - 1``.
        val_x (Tensor): validation examples, shaped like ``train_x``.
        val_y (Tensor): their labels, ``(M,)`` int64.
        features (int or tuple): the size of one example: an int for rows,
            ``(C, H, W)`` for images (then :attr:`is_image` is true).
        classes (int): the number of classes.
        meta (dict): free-form facts about the data (default empty):
            ``image_shape`` marks flat rows that are pictures (see
            :meth:`as_images`); the image sets record their ``mean``, ``std``
            and ``val_fraction``.
        test_x (Tensor or None): held-out test examples, or None (default).
        test_y (Tensor or None): their labels, or None (default).

    Example:
        >>> import torch
        >>> from stablenets_ext.data import Dataset
        >>> x = torch.randn(64, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> Dataset("toy", x[:48], y[:48], x[48:], y[48:], features=2, classes=2)
        Dataset('toy', train=(48, 2), val=(16, 2), features=2, classes=2)
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    features: int | tuple
    classes: int
    meta: dict = field(default_factory=dict)
    test_x: torch.Tensor | None = None  # image sets: the test files, evaluated once at the end
    test_y: torch.Tensor | None = None

    @property
    def is_image(self) -> bool:
        return isinstance(self.features, tuple)

    def as_images(self) -> "Dataset":
        """Flat rows that are pictures (``meta["image_shape"]``, e.g. digits' 1x8x8)
        reshaped into ``(C, H, W)`` images, for the convolutional architectures.

        Returns a new :class:`Dataset` sharing the tensors' storage (this one if it
        already holds images); raises ValueError when the rows are not pictures
        (no ``meta["image_shape"]``)."""
        if self.is_image:
            return self
        shape = self.meta.get("image_shape")
        if shape is None:
            raise ValueError(f"dataset {self.name!r}: its rows are not images "
                             f"({self.features} features)")
        shape = tuple(shape)
        view = (lambda t: None if t is None else t.reshape(t.shape[0], *shape))
        return Dataset(self.name, view(self.train_x), self.train_y, view(self.val_x),
                       self.val_y, shape, self.classes, dict(self.meta), view(self.test_x),
                       self.test_y)

    def to(self, device) -> "Dataset":
        """A new :class:`Dataset` with every tensor moved to ``device``."""
        move = (lambda t: None if t is None else t.to(device))
        return Dataset(self.name, self.train_x.to(device), self.train_y.to(device),
                       self.val_x.to(device), self.val_y.to(device), self.features,
                       self.classes, dict(self.meta), move(self.test_x), move(self.test_y))

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
                   {"split_seed": split_seed, "test_fraction": test_fraction,
                    "image_shape": (1, 8, 8)})


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
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read ({'truncated or corrupt gzip: ' if str(path).endswith('.gz') else ''}"
                        f"{type(exc).__name__}: {exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file (the header promises {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    itemsize = np.dtype(_IDX_DTYPES[raw[2]]).itemsize
    count = (len(raw) - header) // itemsize
    if count != int(np.prod(dims)):
        raise DataError(f"{path}: truncated or padded IDX file: expected {int(np.prod(dims))} "
                        f"values for shape {dims}, found {count}")
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header, count=count)
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


def _check_labels(labels, classes, path):
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise DataError(f"{path}: labels must lie in 0..{classes - 1}, found "
                        f"{int(labels.min())}..{int(labels.max())}")


def _held_out(name, images, labels, test_x, test_y, classes, val_fraction) -> Dataset:
    """Validation = a fixed random ``val_fraction`` of the training images;
    standardised with the remaining training images' statistics."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {val_fraction!r}")
    n = images.shape[0]
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    tr_i, va_i = perm[n_val:].sort().values, perm[:n_val].sort().values
    tr, va = images[tr_i], images[va_i]
    tr, va, mean, std = _standardise(tr, va)
    te = (test_x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return Dataset(name, tr, labels[tr_i], va, labels[va_i], tuple(tr.shape[1:]), classes,
                   {"mean": mean, "std": std, "val_fraction": val_fraction}, te, test_y)


def mnist(root=None, download=None, val_fraction=IMAGE_VAL_FRACTION) -> Dataset:
    root = root or default_root()
    paths = _mnist_paths(root)
    if paths is None:
        why = _download("mnist", root, download)
        paths = _mnist_paths(root)
        if paths is None:
            where = ", ".join(MNIST_FILES.values()) + " (IDX files, optionally .gz) in MNIST/raw/"
            raise _missing("mnist", root, where, why or "torchvision did not write them")
    arr = {k: read_idx(p) for k, p in paths.items()}
    for part in ("train", "val"):
        images, labels = arr[f"{part}_x"], arr[f"{part}_y"]
        if images.ndim != 3:
            raise DataError(f"{paths[part + '_x']}: expected images (N, H, W), found an array of "
                            f"shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{paths[part + '_y']}: expected {images.shape[0]} labels (one per "
                            f"image in {os.path.basename(paths[part + '_x'])}), found shape "
                            f"{labels.shape}")
        _check_labels(labels, 10, paths[part + "_y"])
        least = 2 if part == "train" else 1  # train: one image held out for validation
        if images.shape[0] < least:
            raise DataError(f"{paths[part + '_x']}: holds {images.shape[0]} image"
                            f"{'' if images.shape[0] == 1 else 's'}; the "
                            f"{'training' if part == 'train' else 'test'} split needs at least "
                            f"{least}" + (" (one is held out for validation)" if least == 2
                                          else ""))
    images = torch.from_numpy(arr["train_x"].astype(np.float32) / 255.0).unsqueeze(1)
    te = torch.from_numpy(arr["val_x"].astype(np.float32) / 255.0).unsqueeze(1)
    labels = torch.from_numpy(arr["train_y"].astype(np.int64))
    yte = torch.from_numpy(arr["val_y"].astype(np.int64))
    return _held_out("mnist", images, labels, te, yte, 10, val_fraction)


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as exc:
        raise DataError(f"{path}: not a CIFAR batch (truncated or another format: "
                        f"{type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    return batch


def cifar(name, root=None, download=None, val_fraction=IMAGE_VAL_FRACTION) -> Dataset:
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
            path = os.path.join(d, f)
            batch = _unpickle(path)
            if b"data" not in batch or spec["label"] not in batch:
                raise DataError(f"{path}: not a {name} batch (no {b'data'!r} or "
                                f"{spec['label']!r} entry)")
            data = np.asarray(batch[b"data"])
            labels = np.asarray(batch[spec["label"]], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
                raise DataError(f"{path}: expected (N, 3072) images and N labels, found "
                                f"{data.shape} and {labels.shape}")
            _check_labels(labels, spec["classes"], path)
            xs.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
            ys.append(labels)
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
        return x, torch.from_numpy(np.concatenate(ys))

    images, labels = read(spec["train"])
    te, yte = read(spec["test"])
    return _held_out(name, images, labels, te, yte, spec["classes"], val_fraction)


# ------------------------------------------------------------------- cache


TENSORS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def data_key(name, seed=0) -> dict:
    """Every parameter that shapes a dataset: what a cache must match."""
    key = {"name": name, "version": CACHE_VERSION}
    if name == "ellipse":
        key.update(seed=int(seed), train_per_class=500, val_per_class=100)
    elif name == "swiss":
        key.update(points_per_class=513)
    elif name == "digits":
        key.update(test_fraction=0.2, split_seed=0)
    else:
        key.update(val_fraction=IMAGE_VAL_FRACTION, split_seed=0)
    return key


def save_hdf5(data: Dataset, path, key: dict | None = None) -> None:
    """Write a dataset to one HDF5 file (atomically: a temporary file, then a rename)."""
    import h5py

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for k in TENSORS:
                t = getattr(data, k)
                if t is not None:
                    f.create_dataset(k, data=t.numpy())
            f.attrs["name"] = data.name
            f.attrs["features"] = json.dumps(data.features)
            f.attrs["classes"] = data.classes
            f.attrs["meta"] = json.dumps(data.meta)
            f.attrs["key"] = json.dumps(key if key is not None else {"name": data.name})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CacheUnreadable(DataError):
    """A cache file that cannot be read (truncated, not HDF5)."""


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _hdf5_or_empty(path) -> bool:
    """An HDF5 file (a damaged cache may be rebuilt) or an empty one."""
    with open(path, "rb") as f:
        head = f.read(len(HDF5_SIGNATURE))
    return head in (b"", HDF5_SIGNATURE)


def load_hdf5(path, with_key=False):
    """Read a dataset written by :func:`save_hdf5`, wholly into memory
    (``with_key``: also return the parameters it was written with)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            t = {k: torch.from_numpy(f[k][()]) if k in f else None for k in TENSORS}
            features = json.loads(f.attrs["features"])
            features = tuple(features) if isinstance(features, list) else int(features)
            if "key" not in f.attrs:
                raise KeyError("written by an older version, without its data parameters")
            key = json.loads(f.attrs["key"])
            data = Dataset(str(f.attrs["name"]), t["train_x"], t["train_y"], t["val_x"],
                           t["val_y"], features, int(f.attrs["classes"]),
                           json.loads(f.attrs["meta"]), t["test_x"], t["test_y"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        why = str(exc).strip("'\"").splitlines()[0] if str(exc) else type(exc).__name__
        raise CacheUnreadable(f"cache {os.fspath(path)!r} cannot be used ({why})") from None
    if any(t is None for t in (data.train_x, data.train_y, data.val_x, data.val_y)):
        raise CacheUnreadable(f"cache {os.fspath(path)!r} is incomplete")
    return (data, key) if with_key else data


def load_dataset(name, *, root=None, seed=0, download=None, cache=None) -> Dataset:
    """Load one of the package's datasets by name.

    Args:
        name (str): ``"ellipse"``, ``"swiss"``, ``"digits"`` (generated or
            bundled: no files needed; ``digits`` needs scikit-learn), ``"mnist"``,
            ``"cifar10"`` or ``"cifar100"`` (read from files, see ``root``).
        root (str or None): folder of the image files, and of the default cache
            (default ``$STABLENETS_DATA``, else ``~/.cache/stablenets/data``).
            MNIST is looked for as its four IDX files (optionally ``.gz``) in
            ``MNIST/raw/``, ``mnist/``, ``MNIST/`` or ``root`` itself; CIFAR as
            the ``cifar-10-batches-py/`` or ``cifar-100-python/`` folder of
            python pickles.
        seed (int): the random draw of ``"ellipse"`` (default 0); the other
            sets are fixed and ignore it.
        download (bool or None): image sets whose files are missing:
            True downloads them through torchvision, False never downloads,
            None (default) downloads only when the machine is online. Ignored
            by the other sets.
        cache (str, bool or None): an HDF5 file to read the dataset from and
            write it to (needs h5py): a path, True for
            ``<root>/<name>.h5`` (``<root>/ellipse-seed<seed>.h5``), or
            None/False (default) for no cache. An existing cache is read when it
            was written with the same parameters; a missing one is written
            (atomically); an unreadable HDF5 (or empty) file is rebuilt with a
            warning.

    Returns:
        Dataset: float32 examples and int64 labels, split into training and
        validation (the image sets also carry ``test_x``/``test_y``: the test
        files; validation is a fixed 1/12 of the training files).

    Raises:
        ValueError: an unknown ``name``; a cache holding another dataset or
            data made with other parameters (the message names them).
        FileNotFoundError: image files missing and not downloaded (the
            message says where they were looked for and why no download).
        DataError: a data file that is not what it should be (truncated, bad
            gzip, wrong shape, labels out of range, a foreign pickle); a
            ``cache`` path that is a folder, or an existing file that is not an
            HDF5 cache (it is never overwritten). DataError is a ValueError.

    Example:
        >>> from stablenets_ext.data import load_dataset
        >>> data = load_dataset("swiss")
        >>> data
        Dataset('swiss', train=(514, 2), val=(512, 2), features=2, classes=2)
        >>> data.train_y.unique().tolist()
        [0, 1]
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {name!r}")
    key = data_key(name, seed)
    path = None
    if cache:
        stem = f"{name}-seed{seed}" if name == "ellipse" else name
        path = os.path.join(root or default_root(), f"{stem}.h5") if cache is True else os.fspath(cache)
        if os.path.isdir(path):
            raise DataError(f"cache: {path!r} is a folder; give a file name")
        if os.path.exists(path):
            try:
                data, found = load_hdf5(path, with_key=True)
            except CacheUnreadable as exc:
                if not _hdf5_or_empty(path):  # never overwrite a file this package did not write
                    raise DataError(f"cache: {path!r} exists and is not an HDF5 cache; it "
                                    f"would be overwritten: give another --cache path or "
                                    f"remove it first") from None
                warnings.warn(f"{exc}: it is rebuilt", stacklevel=2)
            else:
                if data.name != name:
                    raise ValueError(f"cache: {path!r} holds dataset {data.name!r}, not {name!r}")
                differ = sorted(k for k in set(key) | set(found) if key.get(k) != found.get(k))
                if differ:
                    raise ValueError(
                        f"cache: {path!r} holds {name} data made with other parameters ("
                        + ", ".join(f"{k} {found.get(k)!r}, not {key.get(k)!r}" for k in differ)
                        + "); give another --cache path or remove it")
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
        save_hdf5(data, path, key)
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
