"""Each official on-disk layout, written here by an independent writer, round-trips exactly."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsbp.data import DATASETS, DatasetCorruptError, DatasetNotFoundError, load_dataset, npz_layouts

PIL = pytest.importorskip("PIL.Image")


# ---- writers for the official layouts (independent of dsbp.data) -------------------------

def write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX: magic 0x00 0x00 0x08 ndim, big-endian uint32 dims, raw bytes; gzip if .gz."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_fashion(folder: Path, rng: np.random.Generator, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    d = {
        "x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 12).astype(np.uint8),
        "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 5).astype(np.uint8),
    }
    write_idx(folder / f"train-images-idx3-ubyte{sfx}", d["x_train"])
    write_idx(folder / f"train-labels-idx1-ubyte{sfx}", d["y_train"])
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", d["x_test"])
    write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", d["y_test"])
    return d


def make_cifar(root: Path, rng: np.random.Generator, per_batch: int = 4,
               legacy: bool = False) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        # protocol 2, bytes keys, like the originals
        blob = pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                             b"filenames": [b"f.png"] * per_batch}, protocol=2)
        if legacy:  # the originals were written by numpy 1.x, which spells numpy.core
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(blob)
        xs.append(data)
        ys.append(labels)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
             b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return {"x_train": np.concatenate(xs[:5]), "y_train": np.concatenate(ys[:5]),
            "x_test": xs[5], "y_test": np.asarray(ys[5]), "names": names}


def jpeg_bytes(img: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(img, mode=mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(PIL.open(io.BytesIO(data)).convert("RGB"))


def nchw(x: np.ndarray) -> torch.Tensor:
    """Reference NHWC/NHW -> NCHW conversion written without dsbp."""
    if x.ndim == 3:
        x = x[..., None]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ---- Fashion-MNIST IDX ------------------------------------------------------------------

@pytest.mark.parametrize("sub,gz", [("fashion_mnist", True), ("FashionMNIST/raw", True),
                                    ("fashion_mnist", False)])
def test_fashion_idx_roundtrip(isolated: Path, sub: str, gz: bool) -> None:
    d = make_fashion(isolated / sub, np.random.default_rng(0), gz=gz)
    ds = load_dataset("fashion_mnist", root=isolated)
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (12, 1, 28, 28)
    assert torch.equal(ds.x_train, nchw(d["x_train"]))
    assert torch.equal(ds.x_test, nchw(d["x_test"]))
    assert torch.equal(ds.y_train, torch.from_numpy(d["y_train"].astype(np.int64)))
    assert torch.equal(ds.y_test, torch.from_numpy(d["y_test"].astype(np.int64)))
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    # mean/std: the train split's pixel statistics, in [0, 1] units (population std).
    assert ds.mean[0] == pytest.approx(d["x_train"].mean() / 255, abs=1e-12)
    assert ds.std[0] == pytest.approx(d["x_train"].std() / 255, abs=1e-12)


def test_fashion_bad_magic_is_corrupt(isolated: Path) -> None:
    make_fashion(isolated / "fashion_mnist", np.random.default_rng(0))
    bad = isolated / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[2] = 0x0D  # type code float instead of ubyte
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetCorruptError, match="magic") as e:
        load_dataset("fashion_mnist", root=isolated)
    assert str(bad) in str(e.value)


def test_fashion_truncated_is_corrupt(isolated: Path) -> None:
    make_fashion(isolated / "fashion_mnist", np.random.default_rng(0))
    bad = isolated / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion_mnist", root=isolated)


# ---- CIFAR-10 pickles ---------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_cifar_pickles_roundtrip(isolated: Path, legacy: bool) -> None:
    d = make_cifar(isolated, np.random.default_rng(1), legacy=legacy)
    ds = load_dataset("cifar10", root=isolated)
    # Row layout: 1024 R, then 1024 G, then 1024 B, each 32x32 row-major.
    ref = torch.from_numpy(d["x_train"].reshape(-1, 3, 32, 32))
    assert torch.equal(ds.x_train, ref)
    assert torch.equal(ds.x_test, torch.from_numpy(d["x_test"].reshape(-1, 3, 32, 32)))
    assert ds.x_train[0, 1, 0, 5] == d["x_train"][0, 1024 + 5]  # green plane, row 0, col 5
    assert ds.y_train.tolist() == d["y_train"].tolist()
    assert ds.y_test.tolist() == d["y_test"].tolist()
    assert ds.classes == [n.decode() for n in d["names"]]
    px = d["x_train"].reshape(-1, 3, 1024) / 255.0
    for c in range(3):
        assert ds.mean[c] == pytest.approx(px[:, c].mean(), abs=1e-12)
        assert ds.std[c] == pytest.approx(px[:, c].std(), abs=1e-12)


def test_cifar_pickle_with_foreign_global_is_refused(isolated: Path) -> None:
    make_cifar(isolated, np.random.default_rng(1))

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(isolated / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetCorruptError, match="refusing to load posix.getcwd|refusing"):
        load_dataset("cifar10", root=isolated)


def test_cifar_garbage_batch_is_corrupt(isolated: Path) -> None:
    make_cifar(isolated, np.random.default_rng(1))
    bad = isolated / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetCorruptError) as e:
        load_dataset("cifar10", root=isolated)
    assert "cifar-10-batches-py" in str(e.value)


# ---- MedMNIST npz -------------------------------------------------------------------------

@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist_official_npz_roundtrip(isolated: Path, rgb: bool) -> None:
    rng = np.random.default_rng(2)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for s, n in (("train", 9), ("val", 3), ("test", 4)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 7, (n, 1)).astype(np.uint8)  # (N, 1) as saved
    np.savez_compressed(isolated / "dermamnist.npz", **arrays)
    ds = load_dataset("medmnist:dermamnist", root=isolated)
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(ds, f"x_{s}"), nchw(arrays[f"{s}_images"]))
        assert getattr(ds, f"y_{s}").tolist() == arrays[f"{s}_labels"][:, 0].tolist()
    assert ds.in_channels == (3 if rgb else 1)
    assert ds.num_classes == 7  # dermamnist has 7 classes even if a label is absent here


def test_medmnist_multilabel_and_3d_rejected(isolated: Path) -> None:
    with pytest.raises(ValueError, match="multi-label"):
        load_dataset("medmnist:chestmnist", root=isolated)
    with pytest.raises(ValueError, match="3-D"):
        load_dataset("medmnist:organmnist3d", root=isolated)
    with pytest.raises(ValueError, match="bad MedMNIST flag"):
        load_dataset("medmnist:../etc", root=isolated)


def test_medmnist_missing_arrays_is_corrupt(isolated: Path) -> None:
    np.savez(isolated / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetCorruptError, match="lacks arrays"):
        load_dataset("medmnist:breastmnist", root=isolated)


# ---- Tiny ImageNet folder -----------------------------------------------------------------

def make_tiny(root: Path, rng: np.random.Generator) -> dict:
    """A 3-class tiny-imagenet-200 tree with real 16x16 JPEGs (one grayscale)."""
    top = root / "tiny-imagenet-200"
    wnids = ["n0003", "n0001", "n0002"]  # not sorted: label = line index
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (top / "words.txt").write_text("n0001\tone, uno\nn0002\ttwo\nn0003\tthree\nn9999\tother\n")
    train_bytes, train_y = [], []
    for label, w in enumerate(wnids):
        (top / "train" / w / "images").mkdir(parents=True)
        (top / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in (0, 1, 10):  # numeric order 0, 1, 10 (not the string order 0, 1, 10 -> same)
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            b = jpeg_bytes(img) if (label, i) != (1, 1) else jpeg_bytes(img[..., 0], "L")
            (top / "train" / w / "images" / f"{w}_{i}.JPEG").write_bytes(b)
            train_bytes.append(b)
            train_y.append(label)
    val_rows, val_bytes, val_y = [], [], []
    for k, label in enumerate([2, 0, 1, 0]):
        b = jpeg_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        (top / "val" / "images" / f"val_{k}.JPEG").write_bytes(b)
        val_rows.append(f"val_{k}.JPEG\t{wnids[label]}\t0\t0\t15\t15")
        val_bytes.append(b)
        val_y.append(label)
    (top / "val" / "val_annotations.txt").write_text("\n".join(val_rows) + "\n")
    return {"train": train_bytes, "y_train": train_y, "test": val_bytes, "y_test": val_y,
            "names": ["three", "one, uno", "two"]}


def test_tiny_imagenet_folder_roundtrip(isolated: Path) -> None:
    d = make_tiny(isolated, np.random.default_rng(3))
    ds = load_dataset("tiny_imagenet", root=isolated)
    ref_train = np.stack([pillow_rgb(b) for b in d["train"]])
    ref_test = np.stack([pillow_rgb(b) for b in d["test"]])
    assert torch.equal(ds.x_train, nchw(ref_train))
    assert torch.equal(ds.x_test, nchw(ref_test))
    assert ds.y_train.tolist() == d["y_train"] and ds.y_test.tolist() == d["y_test"]
    assert ds.classes == d["names"]
    assert ds.x_val is None
    # The grayscale JPEG became RGB with three equal channels.
    gray = ds.x_train[4]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # Second load is served from the decoded cache: it must not decode again.
    cached = list((isolated.parent / "cache").glob("tiny_imagenet_folder-*.npz"))
    assert len(cached) == 1
    import dsbp.data.tiny_imagenet as ti

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    orig = ti.decode_files
    ti.decode_files = boom
    try:
        again = load_dataset("tiny_imagenet", root=isolated)
    finally:
        ti.decode_files = orig
    assert torch.equal(again.x_train, ds.x_train)


def test_tiny_imagenet_broken_jpeg_is_corrupt(isolated: Path) -> None:
    make_tiny(isolated, np.random.default_rng(3))
    bad = isolated / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG"
    bad.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DatasetCorruptError, match="val_2.JPEG"):
        load_dataset("tiny_imagenet", root=isolated)


# ---- the two shared npz layouts, written tiny here ----------------------------------------

def test_jpeg_bytes_npz_roundtrip_and_cache(isolated: Path, monkeypatch) -> None:
    rng = np.random.default_rng(4)
    splits = {}
    for s, n in (("train", 6), ("test", 3)):
        blobs = [jpeg_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        blobs[1] = jpeg_bytes(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        splits[s] = (blobs, offsets, rng.integers(0, 10, n).astype(np.int64))
    path = isolated / "cifar10_jpeg.npz"
    np.savez(path, **{k: v for s, (blobs, off, y) in splits.items() for k, v in (
        (f"jpeg_{s}", np.frombuffer(b"".join(blobs), np.uint8)), (f"offsets_{s}", off),
        (f"y_{s}", y))})
    ds = load_dataset("cifar10", root=isolated)
    for s, (blobs, _, y) in splits.items():
        assert torch.equal(getattr(ds, f"x_{s}"), nchw(np.stack([pillow_rgb(b) for b in blobs])))
        assert getattr(ds, f"y_{s}").tolist() == y.tolist()
    assert ds.classes[0] == "airplane"
    assert "lossy" in ds.source.lower()
    cache = isolated.parent / "cache"
    assert len(list(cache.glob("cifar10_jpeg-*.npz"))) == 1
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temp file behind
    # A cache hit decodes nothing.
    monkeypatch.setattr(npz_layouts, "decode_concatenated",
                        lambda *a, **k: pytest.fail("decoded again despite the cache"))
    assert torch.equal(load_dataset("cifar10", root=isolated).x_train, ds.x_train)
    # A changed source file (new mtime) misses the cache.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        load_dataset("cifar10", root=isolated)


def test_pixel_npz_with_sidecar(isolated: Path) -> None:
    rng = np.random.default_rng(5)
    a = {"x_train": rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8),
         "y_train": np.array([0, 1, 1, 0]), "x_val": rng.integers(0, 256, (2, 28, 28, 1),
                                                                   dtype=np.uint8),
         "y_val": np.array([1, 0]), "x_test": rng.integers(0, 256, (3, 28, 28, 1),
                                                           dtype=np.uint8),
         "y_test": np.array([0, 0, 1])}
    np.savez(isolated / "medmnist_breastmnist.npz", **a)
    (isolated / "medmnist_breastmnist.json").write_text('{"class_names": ["bad", "good"]}')
    ds = load_dataset("medmnist:breastmnist", root=isolated)
    assert torch.equal(ds.x_val, nchw(a["x_val"])) and ds.y_val.tolist() == [1, 0]
    assert ds.classes == ["bad", "good"]


# ---- search order, missing data, downloads ------------------------------------------------

def test_missing_lists_every_place(isolated: Path, monkeypatch) -> None:
    env = isolated.parent / "envdata"
    monkeypatch.setenv("DSBP_DATA", str(env))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", root=isolated)
    msg = str(e.value)
    home = isolated.parent / "home"
    for place in (isolated, env, home / "work" / "data", home / "shared" / "data",
                  home / ".cache" / "dsbp"):
        assert str(place / "cifar-10-batches-py") in msg
        assert str(place / "cifar10_jpeg.npz") in msg
    assert "download=True" in msg and "cifar-10-python.tar.gz" in msg
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "bundled"])
def test_every_name_reports_missing(isolated: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError, match="Looked in"):
        load_dataset(name, root=isolated)


def test_search_order(isolated: Path, monkeypatch) -> None:
    env = isolated.parent / "envdata"
    a = make_fashion(isolated / "fashion_mnist", np.random.default_rng(10))
    b = make_fashion(env / "fashion_mnist", np.random.default_rng(11))
    monkeypatch.setenv("DSBP_DATA", str(env))
    assert torch.equal(load_dataset("fashion_mnist", root=isolated).x_test, nchw(a["x_test"]))
    assert torch.equal(load_dataset("fashion_mnist").x_test, nchw(b["x_test"]))
    monkeypatch.delenv("DSBP_DATA")
    c = make_fashion(Path("data") / "fashion_mnist", np.random.default_rng(12))  # ./data
    assert torch.equal(load_dataset("fashion_mnist").x_test, nchw(c["x_test"]))


def test_download_without_package_never_touches_network(isolated: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    monkeypatch.setitem(sys.modules, "medmnist", None)
    with pytest.raises(DatasetNotFoundError, match=r"dsbp\[download\]"):
        load_dataset("fashion_mnist", root=isolated, download=True)
    with pytest.raises(DatasetNotFoundError, match=r"dsbp\[download\]"):
        load_dataset("medmnist:pathmnist", root=isolated, download=True)
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200.zip"):
        load_dataset("tiny_imagenet", root=isolated, download=True)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("mnist")


def test_import_is_light() -> None:
    import subprocess

    code = ("import sys, dsbp.data, dsbp.data.loader, dsbp.data.shifts; "
            "print('PIL' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_image_dataset_validates() -> None:
    from dsbp.data import ImageDataset

    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    ok = dict(name="t", x_train=x, y_train=y, x_test=x, y_test=y, classes=["a", "b"],
              mean=(0.0,), std=(1.0,), source="test")
    ds = ImageDataset(**ok)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (2, 1, (2, 2))
    for bad, match in ((dict(x_train=x.float()), "uint8"), (dict(y_test=y.int()), "int64"),
                       (dict(classes=["a"]), "labels in"), (dict(mean=(0.0, 0.0)), "channel"),
                       (dict(x_val=x), "both")):
        with pytest.raises(ValueError, match=match):
            ImageDataset(**{**ok, **bad})


def test_truncated_npz_is_corrupt_with_instructions(isolated: Path) -> None:
    rng = np.random.default_rng(6)
    path = isolated / "fashion_mnist.npz"
    np.savez_compressed(path, x_train=rng.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8),
                        y_train=np.zeros(50, np.int64), x_test=np.zeros((5, 28, 28, 1), np.uint8),
                        y_test=np.zeros(5, np.int64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetCorruptError) as e:
        load_dataset("fashion_mnist", root=isolated)
    msg = str(e.value)
    assert str(path) in msg and "download=True" in msg
    assert str(isolated / "fashion_mnist" / "train-images-idx3-ubyte.gz") in msg  # tried before


def test_threaded_decode_matches_serial() -> None:
    from dsbp.data.jpeg import decode_concatenated

    rng = np.random.default_rng(7)
    blobs = [jpeg_bytes(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(23)]
    buf = np.frombuffer(b"".join(blobs), np.uint8)
    off = np.cumsum([0] + [len(b) for b in blobs])
    ref = np.stack([pillow_rgb(b) for b in blobs])
    assert np.array_equal(decode_concatenated(buf, off, workers=1), ref)
    assert np.array_equal(decode_concatenated(buf, off, workers=3), ref)
    with pytest.raises(ValueError, match="offsets must run"):
        decode_concatenated(buf, off[:-1])
