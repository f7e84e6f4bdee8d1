"""Tests of compress.data: IDX/CIFAR/ImageFolder loading, seeded augmentation, sharded batch loading."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress.data import (
    FASHION_MNIST_CLASSES,
    BatchLoader,
    DataInfo,
    Dataset,
    ImageFolderSplit,
    Split,
    TensorSplit,
    calibration_subset,
    load_data,
    read_idx,
)
from compress.data.seeding import augment_params, splitmix64
from lowrank_core.errors import UserInputError

FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs the Debian package dataset-fashion-mnist (make data)",
)
CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]

# ------------------------------------------------------------------------------------------ helpers


def write_idx(path: Path, array: np.ndarray, *, gz: bool | None = None) -> Path:
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    payload = bytes([0, 0, codes[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    gz = path.suffix == ".gz" if gz is None else gz
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_idx_folder(
    root: Path, train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", train)
    write_idx(root / "train-labels-idx1-ubyte", train_labels)  # raw and gz may mix
    write_idx(root / "t10k-images-idx3-ubyte", test)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", test_labels)
    return root


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 ``str`` opcodes, as the real CIFAR files (made with Python 2's cPickle) do."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:  # not memoized: a valid, if longer, pickle
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def dump(path: Path, obj: object, *, py2: bool = False) -> None:
    if not py2:
        path.write_bytes(pickle.dumps(obj, protocol=4))
        return
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # numpy 1 name
    assert b"numpy.core.multiarray\n_reconstruct" in data
    assert b"_codecs" not in data
    path.write_bytes(data)


def make_cifar10(parent: Path, per_batch: int = 4, n_test: int = 6) -> tuple[Path, np.ndarray, list[int]]:
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(10)
    data = rng.integers(0, 256, (5 * per_batch + n_test, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, len(data))]
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        batch = {b"batch_label": b"training batch", b"labels": labels[part], b"data": data[part], b"filenames": []}
        dump(root / f"data_batch_{i + 1}", batch, py2=i == 0)
    dump(root / "test_batch", {b"labels": labels[5 * per_batch :], b"data": data[5 * per_batch :]})
    dump(root / "batches.meta", {b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return root, data, labels


def make_cifar100(parent: Path, n_train: int = 10, n_test: int = 5) -> tuple[Path, np.ndarray, np.ndarray]:
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    rng = np.random.default_rng(100)
    data = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    fine = rng.integers(0, 100, len(data))
    for name, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        batch = {b"data": data[part], b"fine_labels": fine[part].tolist(), b"coarse_labels": (fine[part] // 5).tolist()}
        dump(root / name, batch)
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20}
    dump(root / "meta", meta)
    return root, data, fine


def make_imagefolder(root: Path, eval_name: str = "val") -> Path:
    from PIL import Image

    rng = np.random.default_rng(7)
    for split, count in (("train", 3), (eval_name, 2)):
        for c, cls in enumerate(("cat", "dog", "emu")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 40 + 10 * i, 30 + 7 * c
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs the Debian package dataset-fashion-mnist (make data)")
    return load_data("fashion-mnist")


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, np.ndarray, list[int]]:
    parent = tmp_path_factory.mktemp("c10")
    _, data, labels = make_cifar10(parent)
    return load_data(parent), data, labels


def ranked_batches(split: Split, world_size: int, **kwargs: object) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    out = []
    for rank in range(world_size):
        loader = BatchLoader(split, 16, shuffle=True, seed=3, rank=rank, world_size=world_size, **kwargs)  # type: ignore[arg-type]
        loader.set_epoch(2)
        out.append(list(loader))
    return out


# -------------------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_mnist_real_files(fashion: Dataset) -> None:
    info = fashion.info
    assert (info.name, info.format, info.num_classes, info.channels, info.image_size) == (
        "fashion-mnist",
        "idx",
        10,
        1,
        28,
    )
    assert (info.train_size, info.test_size, len(fashion.train), len(fashion.test)) == (60000, 10000, 60000, 10000)
    assert info.classes == FASHION_MNIST_CLASSES
    assert info.classes[0] == "T-shirt/top"
    assert info.classes[9] == "Ankle boot"
    assert info.mean == (0.2860,)
    assert info.std == (0.3530,)
    assert isinstance(fashion.train, TensorSplit)
    images = fashion.train.images
    assert images.shape == (60000, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert int(images.min()) == 0
    assert int(images.max()) == 255
    assert fashion.train.labels.dtype == torch.int64
    assert torch.bincount(fashion.train.labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.labels).tolist() == [1000] * 10
    assert fashion.train.augment
    assert not fashion.test.augment
    assert fashion.train.flip
    assert fashion.train.pad == 2
    x, y = fashion.train.batch(torch.arange(0, 60000, 6))  # 10k images across the whole split
    assert x.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.02
    assert abs(float(x.std()) - 1) < 0.02
    assert torch.equal(y, fashion.train.labels[::6])


@needs_fashion
def test_fashion_mnist_is_cached(fashion: Dataset) -> None:
    again = load_data("fashion-mnist")
    assert again.train.images.data_ptr() == fashion.train.images.data_ptr()
    assert load_data(FASHION_DIR).info.name == "fashion-mnist"  # the folder itself is recognised too


@needs_fashion
def test_fashion_channels_and_size(fashion: Dataset) -> None:
    idx = torch.arange(8)
    plain, _ = fashion.test.batch(idx)
    rgb = load_data("fashion-mnist", channels=3)
    assert rgb.info.channels == 3
    assert rgb.info.mean == (0.2860,) * 3
    assert rgb.info.std == (0.3530,) * 3
    assert rgb.info.input_shape == (3, 28, 28)
    x, _ = rgb.test.batch(idx)
    assert x.shape == (8, 3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 1])
    assert torch.equal(x[:, 1], x[:, 2])
    assert torch.equal(x[:, :1], plain)
    big = load_data("fashion-mnist", image_size=32, channels=3)
    assert big.info.image_size == 32
    assert big.info.train_size == 60000
    y, _ = big.train.batch(idx, torch.arange(8))
    assert y.shape == (8, 3, 32, 32)
    z, _ = load_data("fashion-mnist", image_size=32).test.batch(idx)
    expected = F.interpolate(plain, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert z.shape == (8, 1, 32, 32)
    assert torch.allclose(z, expected, atol=1e-5)


def test_fashion_mnist_missing_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserInputError, match=r"apt-get install dataset-fashion-mnist.*FASHION_MNIST_DIR") as err:
        load_data("fashion-mnist")
    assert "\n" not in str(err.value)
    assert "nowhere" in str(err.value)


def test_fashion_dir_with_other_data_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.arange(12, dtype=np.uint8)  # 12 classes: not Fashion-MNIST
    root = write_idx_folder(
        tmp_path / "x", np.zeros((12, 28, 28), np.uint8), labels, np.zeros((2, 28, 28), np.uint8), labels[:2]
    )
    monkeypatch.setenv("FASHION_MNIST_DIR", str(root))
    with pytest.raises(UserInputError, match="not Fashion-MNIST"):
        load_data("fashion-mnist")


# ------------------------------------------------------------------------------------------------ IDX


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, (4, 6), dtype=np.int64).astype(np.int32)
    for gz in (False, True):
        got = read_idx(write_idx(tmp_path / f"a{gz}", images, gz=gz))
        assert got.dtype == np.uint8
        assert got.shape == (5, 7, 3)
        assert np.array_equal(got, images)
        got = read_idx(write_idx(tmp_path / f"b{gz}", ints, gz=gz))
        assert got.dtype == np.int32
        assert got.dtype.isnative
        assert np.array_equal(got, ints)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good.gz", np.arange(4000, dtype=np.uint8).reshape(10, 20, 20) % 7, gz=True)
    blob = good.read_bytes()
    cases = {
        "truncated.gz": (blob[: len(blob) // 2], "truncated or corrupt"),
        "corrupt.gz": (blob[:12] + bytes(b ^ 0x5A for b in blob[12:-8]) + blob[-8:], "truncated or corrupt"),
        "magic": (b"\x01\x02\x08\x03" + bytes(100), "not an IDX file"),
        "dtype": (b"\x00\x00\x07\x01" + struct.pack(">I", 3) + bytes(3), "invalid IDX header"),
        "short-header": (b"\x00\x00\x08\x03" + bytes(5), "truncated"),
        "short-raw": (b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(6), "header promises 10 values"),
        "long-raw": (b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(11), "header promises 10 values"),
        "short-payload.gz": (
            gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(6)),
            "truncated or corrupt",
        ),
        "empty": (b"", "not an IDX file"),
        "tiny.gz": (b"\x1f\x8b\x08", "truncated or corrupt"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserInputError, match=message) as err:
            read_idx(tmp_path / name)
        assert "\n" not in str(err.value)
        assert name in str(err.value)
    with pytest.raises(UserInputError, match="not found"):
        read_idx(tmp_path / "missing")


def test_generic_idx_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    test = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    root = write_idx_folder(
        tmp_path / "digits", train, np.arange(50, dtype=np.uint8) % 5, test, np.arange(20, dtype=np.uint8) % 5
    )
    ds = load_data(root)
    info = ds.info
    assert (info.name, info.format, info.num_classes, info.classes) == ("digits", "idx", 5, ("0", "1", "2", "3", "4"))
    assert (info.train_size, info.test_size, info.image_size, info.channels) == (50, 20, 8, 1)
    assert info.mean[0] == pytest.approx(train.mean() / 255, abs=1e-4)
    assert info.std[0] == pytest.approx(train.std() / 255, abs=1e-4)
    assert isinstance(ds.train, TensorSplit)
    assert not ds.train.flip
    assert np.array_equal(ds.test.images[:, 0].numpy(), test)
    x, _ = ds.train.batch(torch.arange(50))
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1) < 0.01
    assert load_data(root, format="idx").info == info


def test_idx_cache_follows_file_changes(tmp_path: Path) -> None:
    labels = np.zeros(3, np.uint8)
    root = write_idx_folder(
        tmp_path / "d", np.zeros((3, 4, 4), np.uint8), labels, np.zeros((3, 4, 4), np.uint8), labels
    )
    first = load_data(root)
    assert load_data(root).train.images.data_ptr() == first.train.images.data_ptr()
    write_idx(root / "train-images-idx3-ubyte.gz", np.full((3, 4, 4), 9, np.uint8))
    os.utime(root / "train-images-idx3-ubyte.gz", ns=(10**18, 10**18))
    assert int(load_data(root).train.images.max()) == 9


def test_non_square_idx_needs_a_size(tmp_path: Path) -> None:
    labels = np.zeros(2, np.uint8)
    root = write_idx_folder(
        tmp_path / "wide", np.zeros((2, 4, 6), np.uint8), labels, np.zeros((2, 4, 6), np.uint8), labels
    )
    with pytest.raises(UserInputError, match="not square"):
        load_data(root)
    x, _ = load_data(root, image_size=5).train.batch([0, 1], torch.tensor([1, 2]))
    assert x.shape == (2, 1, 5, 5)


def test_idx_folder_with_wrong_contents(tmp_path: Path) -> None:
    root = write_idx_folder(
        tmp_path / "bad",
        np.zeros((3, 4, 4), np.uint8),
        np.zeros(2, np.uint8),
        np.zeros((3, 4, 4), np.uint8),
        np.zeros(3, np.uint8),
    )
    with pytest.raises(UserInputError, match="must be 3 integers"):
        load_data(root)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(UserInputError, match="holds no images"):
        load_data(root)
    (root / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(UserInputError, match="lacks t10k-images-idx3-ubyte"):
        load_data(root)


# ---------------------------------------------------------------------------------------------- CIFAR


def test_cifar10(cifar10: tuple[Dataset, np.ndarray, list[int]], tmp_path: Path) -> None:
    ds, data, labels = cifar10
    info = ds.info
    assert (info.name, info.format, info.num_classes, info.channels, info.image_size) == (
        "cifar10",
        "cifar10",
        10,
        3,
        32,
    )
    assert Path(info.root).name == "cifar-10-batches-py"  # detected from the parent folder
    assert info.classes == tuple(n.decode() for n in CIFAR10_NAMES)
    assert (info.train_size, info.test_size) == (20, 6)
    assert info.mean == (0.4914, 0.4822, 0.4465)
    assert info.std == (0.2023, 0.1994, 0.2010)
    images = ds.train.images
    assert images.shape == (20, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert np.array_equal(images.numpy(), data[:20].reshape(20, 3, 32, 32))  # batch 1 is a Python 2 pickle
    assert np.array_equal(ds.test.images.numpy(), data[20:].reshape(6, 3, 32, 32))
    assert ds.train.labels.tolist() == labels[:20]
    assert ds.test.labels.tolist() == labels[20:]
    assert ds.train.pad == 4
    assert ds.train.flip
    again = load_data(Path(info.root))  # the folder itself
    assert again.info == info
    assert again.train.images.data_ptr() == images.data_ptr()
    assert load_data(Path(info.root).parent, format="cifar10").info == info
    assert load_data(info.root, channels=3).info.channels == 3
    with pytest.raises(UserInputError, match="3-channel images but the model wants 1"):
        load_data(info.root, channels=1)
    x, _ = load_data(info.root, image_size=24).test.batch([0, 1])
    assert x.shape == (2, 3, 24, 24)


def test_cifar100(tmp_path: Path) -> None:
    root, data, fine = make_cifar100(tmp_path)
    for where in (tmp_path, root):
        ds = load_data(where)
        assert (ds.info.name, ds.info.format, ds.info.num_classes) == ("cifar100", "cifar100", 100)
        assert ds.info.classes[:2] == ("class0", "class1")
        assert len(ds.info.classes) == 100
        assert ds.info.mean == (0.5071, 0.4865, 0.4409)
        assert ds.info.std == (0.2673, 0.2564, 0.2762)
        assert ds.train.labels.tolist() == fine[:10].tolist()
        assert ds.test.labels.tolist() == fine[10:].tolist()
        assert np.array_equal(ds.train.images.numpy(), data[:10].reshape(10, 3, 32, 32))
        x, y = ds.test.batch(torch.arange(5))
        assert x.shape == (5, 3, 32, 32)
        assert y.dtype == torch.int64


class _Exploit:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.func, (self.arg,))


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec"])
def test_cifar_malicious_pickle_is_not_executed(tmp_path: Path, attack: str) -> None:
    root, _, _ = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    exploit = (
        _Exploit(os.system, f"touch {marker}")
        if attack == "os.system"
        else _Exploit(exec, f"open({str(marker)!r}, 'w').close()")
    )
    payload = pickle.dumps({b"data": exploit, b"labels": [0]}, protocol=4)
    assert attack.split(".")[1].encode() in payload
    (root / "data_batch_3").write_bytes(payload)
    with pytest.raises(
        UserInputError, match=r"data_batch_3 is not a CIFAR python batch \(it asks for .*(system|exec)\)"
    ) as err:
        load_data(tmp_path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_cifar_missing_and_broken_files(tmp_path: Path) -> None:
    root, _, _ = make_cifar10(tmp_path)
    (root / "test_batch").rename(root / "test_batch.bak")
    with pytest.raises(UserInputError, match=r"lacks test_batch; re-extract cifar-10-python.tar.gz"):
        load_data(tmp_path)
    blob = (root / "test_batch.bak").read_bytes()
    (root / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserInputError, match="test_batch is not a readable CIFAR python batch"):
        load_data(root)
    dump(root / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(UserInputError, match=r"no uint8 N×3072 'data'"):
        load_data(root)
    dump(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(UserInputError, match=r"labels outside 0\.\.9"):
        load_data(root)
    dump(root / "test_batch", [1, 2])
    with pytest.raises(UserInputError, match="not a CIFAR dict"):
        load_data(root)


# ---------------------------------------------------------------------------------------- ImageFolder


@pytest.mark.parametrize("eval_name", ["val", "test"])
def test_imagefolder(tmp_path: Path, eval_name: str) -> None:
    root = make_imagefolder(tmp_path / "tiny", eval_name)
    ds = load_data(root, image_size=32)
    info = ds.info
    assert (info.name, info.format, info.classes, info.num_classes) == ("tiny", "imagefolder", ("cat", "dog", "emu"), 3)
    assert (info.train_size, info.test_size, info.channels, info.image_size) == (9, 6, 3, 32)
    assert info.mean == (0.485, 0.456, 0.406)
    assert info.std == (0.229, 0.224, 0.225)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, y = ds.test.batch(torch.arange(6))
    assert x.shape == (6, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    lo = (0 - torch.tensor(info.mean)) / torch.tensor(info.std)
    hi = (1 - torch.tensor(info.mean)) / torch.tensor(info.std)
    assert bool((x.amin(dim=(0, 2, 3)) >= lo - 1e-5).all())
    assert bool((x.amax(dim=(0, 2, 3)) <= hi + 1e-5).all())
    rng_before = torch.get_rng_state()
    seeds = torch.tensor([11, 12, 13, 14])
    a, _ = ds.train.batch([0, 3, 6, 8], seeds)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    b, _ = ds.train.batch([8, 0], seeds[[3, 0]])
    c, _ = ds.train.batch([0, 3, 6, 8], seeds + 100)
    assert a.shape == (4, 3, 32, 32)
    assert torch.equal(a[[3, 0]], b)
    assert all(not torch.equal(a[i], c[i]) for i in range(4))
    plain, _ = ds.train.batch([0, 3])
    assert torch.equal(plain, ds.train.subset([0, 3], augment=False).batch([0, 1], seeds[:2])[0])
    assert load_data(root).info.image_size == 224
    assert isinstance(ds.test, ImageFolderSplit)
    assert Path(ds.test.subset([3]).paths[0]).relative_to(root).as_posix() == f"{eval_name}/dog/1.png"
    assert repr(ds.test) == "ImageFolderSplit(tiny test, 6 images, augment=False)"
    with pytest.raises(UserInputError, match="3-channel images but the model wants 1"):
        load_data(root, channels=1)


def test_imagefolder_workers_match_in_process(tmp_path: Path) -> None:
    ds = load_data(make_imagefolder(tmp_path / "tiny"), image_size=16)
    inline = list(BatchLoader(ds.train, 4, shuffle=True, seed=5))
    workers = list(BatchLoader(ds.train, 4, shuffle=True, seed=5, num_workers=2))
    assert len(inline) == len(workers) == 3
    for (xa, ya), (xb, yb) in zip(inline, workers, strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "tiny")
    for folder in (root / "val").iterdir():
        for file in folder.iterdir():
            file.rename(root / "val" / f"{folder.name}-{file.name}")
        folder.rmdir()
    with pytest.raises(UserInputError, match="has no class folders"):
        load_data(root)
    (root / "val" / "zebra").mkdir()
    (root / "val" / "zebra" / "z.png").write_bytes((root / "val" / "cat-0.png").read_bytes())
    with pytest.raises(UserInputError, match="classes missing from train/: zebra"):
        load_data(root)
    (root / "val").rename(root / "other")
    with pytest.raises(UserInputError, match=r"needs both train/<class>/ and val/<class>/"):
        load_data(root, format="imagefolder")
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "broken.png").write_bytes(b"not a png")
    ds = load_data(root, image_size=16)
    with pytest.raises(UserInputError, match=r"cannot read image .*broken\.png"):
        ds.test.batch([0])
    with pytest.raises(UserInputError, match=r"cannot read image .*broken\.png") as err:
        list(BatchLoader(ds.test, 1, shuffle=False, num_workers=2))
    assert "\n" not in str(err.value)  # not DataLoader's wrapped traceback


# --------------------------------------------------------------------------------------- augmentation


def reference_splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_matches_reference() -> None:
    values = [0, 1, 2, -1, -(2**63), 2**63 - 1, 123456789, *torch.randint(-(2**62), 2**62, (200,)).tolist()]
    got = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [v % 2**64 for v in got] == [reference_splitmix64(v % 2**64) for v in values]
    assert reference_splitmix64(0) == 0xE220A8397B1DCDAF  # published first output of splitmix64(seed 0)


def padded_candidates(image: torch.Tensor, fill: torch.Tensor, pad: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    c, h, w = image.shape
    padded = fill.view(c, 1, 1).expand(c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, pad : pad + h, pad : pad + w] = image
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out[(dy, dx, False)], out[(dy, dx, True)] = crop, crop.flip(-1)
    return out


def check_crops_and_flips(split: TensorSplit, indices: torch.Tensor, seeds: torch.Tensor) -> None:
    plain, _ = split.batch(indices)
    augmented, _ = split.batch(indices, seeds)
    fill = -torch.tensor(split.info.mean) / torch.tensor(split.info.std)  # a zero pixel, normalised
    dy, dx, flips = augment_params(seeds, split.pad, split.flip)
    for i in range(len(indices)):
        candidates = padded_candidates(plain[i], fill, split.pad)
        matches = [key for key, crop in candidates.items() if torch.allclose(crop, augmented[i], atol=1e-5)]
        assert (int(dy[i]), int(dx[i]), bool(flips[i])) in matches


def test_augmentation_is_a_crop_and_flip(cifar10: tuple[Dataset, np.ndarray, list[int]]) -> None:
    train = cifar10[0].train
    assert isinstance(train, TensorSplit)
    check_crops_and_flips(train, torch.arange(20), torch.arange(1000, 1020) * 7919)
    seeds = torch.arange(5000)
    dy, dx, flips = augment_params(seeds, 4, True)
    assert len(set(zip(dy.tolist(), dx.tolist(), flips.tolist(), strict=True))) == 9 * 9 * 2  # every crop and flip
    assert 0.45 < float(flips.float().mean()) < 0.55
    identity = int(seeds[(dy == 4) & (dx == 4) & ~flips][0])  # no shift, no flip: the original exactly
    assert torch.equal(train.batch([5], torch.tensor([identity]))[0], train.batch([5])[0])


def test_augmentation_is_deterministic_per_seed(cifar10: tuple[Dataset, np.ndarray, list[int]]) -> None:
    train = cifar10[0].train
    idx, seeds = torch.arange(20), torch.arange(20) * 31 + 5
    a, la = train.batch(idx, seeds)
    b, _ = train.batch(idx, seeds)
    assert torch.equal(a, b)
    perm = torch.randperm(20)
    c, lc = train.batch(idx[perm], seeds[perm])  # another batch composition
    assert torch.equal(c, a[perm])
    assert torch.equal(lc, la[perm])
    single = torch.cat([train.batch(idx[i : i + 1], seeds[i : i + 1])[0] for i in range(20)])
    assert torch.equal(single, a)
    other, _ = train.batch(idx, seeds + 1)
    assert sum(not torch.equal(a[i], other[i]) for i in range(20)) >= 16


def test_no_seeds_means_plain_normalised_images(cifar10: tuple[Dataset, np.ndarray, list[int]]) -> None:
    ds = cifar10[0]
    idx = torch.tensor([3, 0, 19])
    x, y = ds.train.batch(idx)
    mean, std = torch.tensor(ds.info.mean).view(1, 3, 1, 1), torch.tensor(ds.info.std).view(1, 3, 1, 1)
    expected = (ds.train.images[idx].float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(y, ds.train.labels[idx])
    assert torch.equal(
        ds.test.batch([1, 2], torch.tensor([5, 6]))[0], ds.test.batch([1, 2])[0]
    )  # test: no augmentation
    off = ds.train.subset(idx, augment=False)
    assert torch.equal(off.batch([0, 1, 2], torch.tensor([1, 2, 3]))[0], x)
    empty, labels = ds.train.batch(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    assert empty.shape == (0, 3, 32, 32)
    assert labels.shape == (0,)


@needs_fashion
def test_fashion_augmentation(fashion: Dataset) -> None:
    train = fashion.train
    assert isinstance(train, TensorSplit)
    check_crops_and_flips(train, torch.arange(40) * 1500, torch.arange(40) + 77)


def test_subset_views(cifar10: tuple[Dataset, np.ndarray, list[int]]) -> None:
    train = cifar10[0].train
    sub = train.subset(torch.tensor([4, 2, 9]))
    assert len(sub) == 3
    assert sub.augment
    assert sub.indices.tolist() == [4, 2, 9]
    assert sub.labels.tolist() == train.labels[[4, 2, 9]].tolist()
    nested = sub.subset([2, 0], augment=False)
    assert nested.indices.tolist() == [9, 4]
    assert not nested.augment
    assert train.augment
    assert torch.equal(nested.batch([0, 1])[0], train.batch([9, 4])[0])
    with pytest.raises(IndexError):
        sub.batch([3])


# ----------------------------------------------------------------------------------------- BatchLoader


@pytest.fixture(scope="module")
def small_train(cifar10: tuple[Dataset, np.ndarray, list[int]], tmp_path_factory: pytest.TempPathFactory) -> Split:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (103, 12, 12), dtype=np.uint8)
    labels = (np.arange(103) % 7).astype(np.uint8)
    root = write_idx_folder(tmp_path_factory.mktemp("idx") / "small", images, labels, images[:5], labels[:5])
    return load_data(root).train


def test_loader_covers_every_index_once(small_train: Split) -> None:
    loader = BatchLoader(small_train, 16, shuffle=True, seed=1)
    assert len(loader) == loader.steps_per_epoch == 7
    plan = loader.plan()
    order = torch.cat([indices for indices, _ in plan])
    assert sorted(order.tolist()) == list(range(103))
    assert order.tolist() != list(range(103))
    assert [len(i) for i, _ in plan] == [16] * 6 + [7]
    assert all(len(i) == len(s) for i, s in plan)
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(labels, small_train.labels[order])
    assert torch.equal(torch.cat([i for i, _ in loader.plan()]), order)  # same epoch, same order
    loader.set_epoch(1)
    other = loader.plan()
    assert not torch.equal(torch.cat([i for i, _ in other]), order)
    assert not torch.equal(other[0][1], plan[0][1])  # new augmentation seeds too
    ordered = BatchLoader(small_train, 16, shuffle=False)
    assert torch.equal(torch.cat([i for i, _ in ordered.plan()]), torch.arange(103))
    dropped = BatchLoader(small_train, 16, shuffle=True, drop_last=True)
    assert len(dropped) == 6
    assert all(x.shape == (16, 1, 12, 12) for x, _ in dropped)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_equal_one_process(small_train: Split, world_size: int) -> None:
    single = ranked_batches(small_train, 1)[0]
    ranks = ranked_batches(small_train, world_size)
    assert len(single) == 7
    assert all(len(r) == 7 for r in ranks)
    for step, (images, labels) in enumerate(single):
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), images)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), labels)
    assert [len(r[-1][1]) for r in ranks] == ([4, 3] if world_size == 2 else [2, 2, 2, 1])


def test_rank_with_empty_last_slice_skips_it(small_train: Split) -> None:
    split = small_train.subset(torch.arange(97))  # last global batch: 1 sample
    loaders = [BatchLoader(split, 16, shuffle=True, rank=r, world_size=4) for r in range(4)]
    assert [len(loader) for loader in loaders] == [7, 6, 6, 6]
    assert [len(list(loader)) for loader in loaders] == [7, 6, 6, 6]
    assert loaders[0].steps_per_epoch == 7
    assert sum(len(i) for loader in loaders for i, _ in loader.plan()) == 97


def test_workers_equal_in_process(small_train: Split) -> None:
    inline = ranked_batches(small_train, 2)
    workers = ranked_batches(small_train, 2, num_workers=2)
    for a, b in zip(inline, workers, strict=True):
        assert len(a) == len(b) == 7
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb)
            assert torch.equal(ya, yb)


def test_loader_rejects_bad_sharding(small_train: Split) -> None:
    with pytest.raises(UserInputError, match="does not split over 2 processes"):
        BatchLoader(small_train, 15, shuffle=True, world_size=2)
    with pytest.raises(UserInputError, match=r"rank 2 is not in 0\.\.1"):
        BatchLoader(small_train, 16, shuffle=True, rank=2, world_size=2)
    with pytest.raises(UserInputError, match="num_workers"):
        BatchLoader(small_train, 16, shuffle=True, num_workers=-1)


# ----------------------------------------------------------------------------------------- calibration


def test_calibration_subset(small_train: Split) -> None:
    a = calibration_subset(small_train, 20, seed=4)
    b = calibration_subset(small_train, 20, seed=4)
    assert len(a) == 20
    assert not a.augment
    assert small_train.augment
    assert torch.equal(a.indices, b.indices)
    assert len(set(a.indices.tolist())) == 20
    assert a.indices_sha256 == b.indices_sha256
    assert len(a.indices_sha256) == 64
    assert not torch.equal(calibration_subset(small_train, 20, seed=5).indices, a.indices)
    assert torch.equal(calibration_subset(small_train, 10, seed=4).indices, a.indices[:10])
    x, y = a.batch(torch.arange(20), torch.arange(20))  # seeds are ignored: no augmentation
    assert torch.equal(x, small_train.batch(a.indices)[0])
    assert torch.equal(y, small_train.labels[a.indices])
    assert calibration_subset(small_train, 103).indices.sort().values.tolist() == list(range(103))
    for n in (104, 0):
        with pytest.raises(UserInputError, match="ask for 1 to 103"):
            calibration_subset(small_train, n)
    with pytest.raises(UserInputError, match="must be an integer"):
        calibration_subset(small_train, 2.5)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- load_data


def test_load_data_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="neither a built-in dataset"):
        load_data(tmp_path / "missing")
    with pytest.raises(UserInputError, match=r"no dataset found in .*it is empty.*looked for IDX files"):
        load_data(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(UserInputError, match=r"it holds notes.txt, weights.bin.*CIFAR-10 python batches") as err:
        load_data(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="is a file"):
        load_data(tmp_path / "notes.txt")
    with pytest.raises(UserInputError, match="unknown data format 'png'"):
        load_data(tmp_path, format="png")
    with pytest.raises(UserInputError, match="lacks data_batch_1"):
        load_data(tmp_path, format="cifar10")
    with pytest.raises(UserInputError, match="not cifar10"):
        load_data("fashion-mnist", format="cifar10")
    with pytest.raises(UserInputError, match="use 1 or 3"):
        load_data(tmp_path, channels=2)
    with pytest.raises(UserInputError, match="positive integer"):
        load_data(tmp_path, image_size=0)


def test_both_cifars_in_one_parent_is_ambiguous(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    make_cifar100(tmp_path)
    with pytest.raises(UserInputError, match="both CIFAR-10 and CIFAR-100"):
        load_data(tmp_path)
    assert load_data(tmp_path, format="cifar100").info.num_classes == 100


def test_info_to_dict_is_json(cifar10: tuple[Dataset, np.ndarray, list[int]]) -> None:
    info = cifar10[0].info
    d = json.loads(json.dumps(info.to_dict()))
    assert d["classes"][0] == "airplane"
    assert d["mean"] == [0.4914, 0.4822, 0.4465]
    assert d["train_size"] == 20
    assert DataInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) == info


def test_import_does_not_load_torchvision() -> None:
    code = "import sys, compress.data; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=120)
