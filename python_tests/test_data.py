import math
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from stablenets_ext import data as D


# ------------------------------------------------------------- synthetic sets


def test_ellipse_shapes_and_radii():
    d = D.load_dataset("ellipse", seed=3)
    assert d.features == 2 and d.classes == 2 and d.name == "ellipse"
    assert d.train_x.shape == (1000, 2) and d.val_x.shape == (200, 2)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.train_y.bincount().tolist() == [500, 500]
    assert d.val_y.bincount().tolist() == [100, 100]
    for x, y in ((d.train_x, d.train_y), (d.val_x, d.val_y)):
        a = torch.sqrt(x[:, 0] ** 2 + (2 * x[:, 1]) ** 2)  # b = a / 2
        assert a[y == 0].max() <= 1 + 1e-5 and a[y == 1].min() >= 1 - 1e-5
        assert a[y == 1].max() <= 2 + 1e-5
    again = D.load_dataset("ellipse", seed=3)
    assert torch.equal(again.train_x, d.train_x)
    assert not torch.equal(D.load_dataset("ellipse", seed=4).train_x, d.train_x)


def test_swiss_alternates_points_of_two_spirals():
    d = D.load_dataset("swiss")
    assert d.features == 2 and d.classes == 2
    assert d.train_x.shape[0] + d.val_x.shape[0] == 2 * 513
    assert d.train_y.bincount().tolist() == [257, 257]
    assert d.val_y.bincount().tolist() == [256, 256]
    t = torch.linspace(0, 4 * math.pi, 513, dtype=torch.float64)
    for cls, r0 in ((0, 0.0), (1, 0.2)):
        r = torch.linspace(r0, r0 + 1, 513, dtype=torch.float64)
        full = torch.stack([r * torch.cos(t), r * torch.sin(t)], 1).float()
        assert torch.allclose(d.train_x[d.train_y == cls], full[0::2])
        assert torch.allclose(d.val_x[d.val_y == cls], full[1::2])


def test_digits_fixed_stratified_split():
    d = D.load_dataset("digits")
    assert d.features == 64 and d.classes == 10
    assert d.train_x.shape[0] + d.val_x.shape[0] == 1797
    assert 0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1
    frac = d.val_y.bincount().double() / (d.val_y.bincount() + d.train_y.bincount()).double()
    assert torch.allclose(frac, torch.full((10,), 0.2, dtype=torch.float64), atol=0.02)
    assert torch.equal(D.load_dataset("digits").val_y, d.val_y)


def test_unknown_dataset_names_the_argument():
    with pytest.raises(ValueError, match="dataset"):
        D.load_dataset("imagenet")


# ------------------------------------------------------------ image files


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist(root, n_train=12, n_test=6, side=5):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in arrays.items():
        write_idx(raw / name, arr)
    return arrays


def test_read_idx_round_trip_and_gzip(tmp_path):
    import gzip

    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr)
    assert np.array_equal(D.read_idx(tmp_path / "a"), arr)
    with open(tmp_path / "a", "rb") as f, gzip.open(tmp_path / "b.gz", "wb") as g:
        g.write(f.read())
    assert np.array_equal(D.read_idx(tmp_path / "b.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        D.read_idx(tmp_path / "bad")


def test_mnist_from_self_written_idx_files(tmp_path):
    arrays = write_mnist(tmp_path)
    d = D.load_dataset("mnist", root=str(tmp_path), download=False)
    assert d.features == (1, 5, 5) and d.classes == 10
    # validation is held out of the training files; the test files are kept apart
    assert d.train_x.shape == (11, 1, 5, 5) and d.val_x.shape == (1, 1, 5, 5)
    assert d.test_x.shape == (6, 1, 5, 5)
    assert d.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    labels = sorted(d.train_y.tolist() + d.val_y.tolist())
    assert labels == sorted(arrays["train-labels-idx1-ubyte"].tolist())
    assert abs(float(d.train_x.mean())) < 1e-5 and abs(float(d.train_x.std()) - 1) < 0.05
    # standardisation is monotone: the pixel order is the file's
    flat = arrays["t10k-images-idx3-ubyte"].reshape(-1)
    order = np.argsort(flat, kind="stable")
    assert np.all(np.diff(d.test_x.reshape(-1).numpy()[order]) >= -1e-6)


def write_cifar(root, name, n=4):
    spec = D.CIFAR[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, f in enumerate(spec["train"] + spec["test"]):
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 spec["label"]: [(i + k) % spec["classes"] for k in range(n)]}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)


@pytest.mark.parametrize("name,train", [("cifar10", 20), ("cifar100", 4)])
def test_cifar_from_self_written_pickles(tmp_path, name, train):
    write_cifar(tmp_path, name)
    d = D.load_dataset(name, root=str(tmp_path), download=False)
    assert d.features == (3, 32, 32) and d.classes == D.CIFAR[name]["classes"]
    n_val = max(1, round(train / 12))
    assert d.train_x.shape == (train - n_val, 3, 32, 32) and d.val_x.shape == (n_val, 3, 32, 32)
    assert d.test_x.shape == (4, 3, 32, 32)
    assert d.train_y.dtype == torch.int64
    assert torch.allclose(d.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_offline_missing_files_say_where_to_put_them(tmp_path, name, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        D.load_dataset(name, root=str(tmp_path), download=False)
    msg = str(err.value)
    assert str(tmp_path) in msg and name in msg
    assert ("t10k-images-idx3-ubyte" in msg) if name == "mnist" else (D.CIFAR[name]["folder"] in msg)
    # download=None: offline is detected and reported, nothing hangs
    monkeypatch.setattr(D, "_online", lambda *a, **k: False)
    with pytest.raises(FileNotFoundError, match="offline|torchvision"):
        D.load_dataset(name, root=str(tmp_path), download=None)


def test_missing_torchvision_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(FileNotFoundError, match="torchvision is not installed"):
        D.load_dataset("mnist", root=str(tmp_path), download=True)


# ------------------------------------------------------------ cache, loader


@pytest.mark.parametrize("name", ["swiss", "mnist"])
def test_hdf5_cache_round_trip(tmp_path, name):
    if name == "mnist":
        write_mnist(tmp_path)
    path = tmp_path / "cache" / f"{name}.h5"
    first = D.load_dataset(name, root=str(tmp_path), download=False, cache=str(path))
    assert path.exists()
    if name == "mnist":  # the cache is what is read now, not the raw files
        for f in (tmp_path / "MNIST" / "raw").iterdir():
            f.unlink()
    second = D.load_dataset(name, root=str(tmp_path), download=False, cache=str(path))
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        a, b = getattr(first, key), getattr(second, key)
        assert (a is None and b is None) or torch.equal(a, b)
    assert second.features == first.features and second.classes == first.classes
    with pytest.raises(ValueError, match="cache"):
        D.load_dataset("ellipse", cache=str(path))


def test_hdf5_cache_default_location(tmp_path):
    D.load_dataset("ellipse", root=str(tmp_path), seed=2, cache=True)
    assert (tmp_path / "ellipse-seed2.h5").exists()


def test_tensor_loader_batches_and_shuffles_by_epoch():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.arange(10)
    loader = D.TensorLoader(x, y, 4, shuffle=False)
    assert len(loader) == 3
    assert [b[1].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    sh = D.TensorLoader(x, y, 4, shuffle=True, seed=1)
    e0 = torch.cat([b[1] for b in sh])
    assert sorted(e0.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[0][:, 0] for b in sh]).long(), torch.cat([b[1] for b in sh]))
    assert torch.equal(e0, torch.cat([b[1] for b in sh]))  # same epoch, same order
    sh.set_epoch(1)
    assert not torch.equal(e0, torch.cat([b[1] for b in sh]))
    assert len(D.TensorLoader(x, y, 4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        D.TensorLoader(x, y, 0)


# ------------------------------------------------------- hostile inputs


def test_cache_is_keyed_by_every_data_parameter(tmp_path):
    path = tmp_path / "e.h5"
    zero = D.load_dataset("ellipse", cache=str(path), seed=0)
    with pytest.raises(ValueError, match=r"seed 0, not 1"):
        D.load_dataset("ellipse", cache=str(path), seed=1)
    assert torch.equal(D.load_dataset("ellipse", cache=str(path), seed=0).train_x, zero.train_x)
    # the default location keys the file name by the seed
    one = D.load_dataset("ellipse", root=str(tmp_path), cache=True, seed=1)
    assert not torch.equal(one.train_x, zero.train_x)


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_unreadable_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    path = tmp_path / "s.h5"
    good = D.load_dataset("swiss", cache=str(path))
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[:len(raw) // 3], "empty": b""}[damage])
    with pytest.warns(UserWarning, match=r"cache .*s\.h5.* rebuilt"):
        again = D.load_dataset("swiss", cache=str(path))
    assert torch.equal(again.train_x, good.train_x)
    assert torch.equal(D.load_dataset("swiss", cache=str(path)).train_x, good.train_x)


def _damage_mnist(root, kind):
    raw = root / "MNIST" / "raw"
    name = "train-images-idx3-ubyte"
    if kind == "truncated":
        data = (raw / name).read_bytes()
        (raw / name).write_bytes(data[:len(data) - 7])
        return name
    if kind == "bad-gzip":
        (raw / name).unlink()
        (raw / (name + ".gz")).write_bytes(b"\x1f\x8b\x08\x00garbage")
        return name + ".gz"
    if kind == "2-d images":
        write_idx(raw / name, np.zeros((12, 25)))
        return name
    if kind == "labels out of range":
        write_idx(raw / "train-labels-idx1-ubyte", np.full(12, 11))
        return "train-labels-idx1-ubyte"
    if kind == "label count":
        write_idx(raw / "train-labels-idx1-ubyte", np.zeros(5))
        return "train-labels-idx1-ubyte"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "bad-gzip", "2-d images", "labels out of range",
                                  "label count"])
def test_corrupt_mnist_files_are_named(tmp_path, kind):
    write_mnist(tmp_path)
    name = _damage_mnist(tmp_path, kind)
    with pytest.raises(D.DataError) as err:
        D.load_dataset("mnist", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert name in msg and "\n" not in msg


def test_corrupt_cifar_batch_is_named(tmp_path):
    write_cifar(tmp_path, "cifar10")
    bad = tmp_path / D.CIFAR["cifar10"]["folder"] / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.load_dataset("cifar10", root=str(tmp_path), download=False)
    with open(bad, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, fh)
    with pytest.raises(D.DataError, match=r"data_batch_3.*0\.\.9"):
        D.load_dataset("cifar10", root=str(tmp_path), download=False)


def test_cache_of_an_older_version_is_rebuilt(tmp_path):
    import h5py

    path = tmp_path / "old.h5"
    good = D.load_dataset("swiss", cache=str(path))
    with h5py.File(path, "a") as f:
        del f.attrs["key"]
    with pytest.warns(UserWarning, match="older version.*rebuilt"):
        again = D.load_dataset("swiss", cache=str(path))
    assert torch.equal(again.train_x, good.train_x)
