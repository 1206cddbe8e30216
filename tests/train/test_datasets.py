"""Dataset loaders on small files written here in exactly the official formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitscope.errors import VitscopeError
from vitscope.train import datasets as D
from vitscope.train.datasets import get_dataset, read_idx, safe_unpickle

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _rng_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _cifar10_members(per_batch: int = 4) -> dict[str, bytes]:
    """Members of cifar-10-batches-py/ as the official archive has them (pickled dicts with bytes keys)."""
    members = {"batches.meta": pickle.dumps(
        {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072},
        protocol=2)}
    for i in range(1, 6):
        members[f"data_batch_{i}"] = pickle.dumps({
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": [(i + j) % 10 for j in range(per_batch)],
            b"data": _rng_images(per_batch, i), b"filenames": [f"f{i}_{j}.png".encode() for j in range(per_batch)],
        }, protocol=2)
    members["test_batch"] = pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4],
                                          b"data": _rng_images(3, 99), b"filenames": [b"a", b"b", b"c"]}, protocol=2)
    return members


def _write_tar(path: Path, folder: str, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_from_official_tar_gz(tmp_path: Path) -> None:
    _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", _cifar10_members())
    train = get_dataset("cifar10", tmp_path, "train")
    test = get_dataset("cifar10", tmp_path, "test")
    assert train.classes == tuple(CIFAR10_NAMES) and len(train) == 20 and len(test) == 3
    # image 2 of data_batch_3 (index 4*2 + 2): channel planes R, G, B of 1024 row-major pixels each
    raw = _rng_images(4, 3)[2]
    image, label = train[4 * 2 + 2]
    assert label == (3 + 2) % 10
    for c, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert image[c, y, x].item() == pytest.approx(raw[c * 1024 + y * 32 + x] / 255)
    assert [test[i][1] for i in range(3)] == [3, 1, 4]
    assert train.mean == D.NORMALIZATION["cifar10"][0]


def test_cifar10_from_extracted_folder_and_resize(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, data in _cifar10_members().items():
        (folder / name).write_bytes(data)
    ds = get_dataset("cifar10", tmp_path, "val", image_size=64)  # val = the official test split
    image, _ = ds[0]
    assert image.shape == (3, 64, 64)
    small = get_dataset("cifar10", tmp_path, "test")[0][0]
    # bilinear 2x upsampling keeps the mean colour of each channel (within interpolation error)
    torch.testing.assert_close(image.mean((1, 2)), small.mean((1, 2)), atol=0.02, rtol=0)


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    fine_names = [f"fine{i}".encode() for i in range(100)]
    coarse_names = [f"coarse{i}".encode() for i in range(20)]
    members = {
        "meta": pickle.dumps({b"fine_label_names": fine_names, b"coarse_label_names": coarse_names}, protocol=2),
        "train": pickle.dumps({b"data": _rng_images(5, 1), b"fine_labels": [99, 0, 5, 7, 42],
                               b"coarse_labels": [19, 0, 1, 2, 3], b"filenames": [b"x"] * 5}, protocol=2),
        "test": pickle.dumps({b"data": _rng_images(2, 2), b"fine_labels": [1, 2], b"coarse_labels": [4, 5]},
                             protocol=2),
    }
    _write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", members)
    fine = get_dataset("cifar100", tmp_path, "train")
    coarse = get_dataset("cifar100", tmp_path, "train", label_mode="coarse")
    assert len(fine.classes) == 100 and fine.classes[99] == "fine99" and len(coarse.classes) == 20
    assert [fine[i][1] for i in range(5)] == [99, 0, 5, 7, 42]
    assert [coarse[i][1] for i in range(5)] == [19, 0, 1, 2, 3]
    assert [get_dataset("cifar100", tmp_path, "test")[i][1] for i in range(2)] == [1, 2]


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2)
    with pytest.raises(VitscopeError, match="refusing to load global"):
        safe_unpickle(payload, "data_batch_1")
    members = _cifar10_members()
    members["data_batch_2"] = payload
    _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(VitscopeError, match="unsafe"):
        get_dataset("cifar10", tmp_path, "train")
    assert not (tmp_path / "pwned").exists()
    # builtins beyond containers are refused too
    with pytest.raises(VitscopeError):
        safe_unpickle(b"cbuiltins\neval\n(S'1+1'\ntR.", "x")


def test_cifar_missing_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(VitscopeError, match=r"cifar-10-python\.tar\.gz"):
        get_dataset("cifar10", tmp_path, "train")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(VitscopeError, match=r"not a readable tar\.gz"):
        get_dataset("cifar10", tmp_path, "train")
    members = _cifar10_members()
    members["data_batch_1"] = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)
    _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(VitscopeError, match="3072"):
        get_dataset("cifar10", tmp_path, "train")
    with pytest.raises(VitscopeError, match="split"):
        get_dataset("cifar10", tmp_path, "holdout")


def test_cifar_download_offline_and_md5_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(VitscopeError, match=r"cannot download https://www\.cs\.toronto\.edu/~kriz/cifar-10-python"):
        get_dataset("cifar10", tmp_path / "new", "train", download=True)

    class Resp(io.BytesIO):
        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Resp(b"tampered"))
    with pytest.raises(VitscopeError, match="md5"):
        D.download_cifar("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()  # the bad download is not kept
    import hashlib

    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert D.md5sum(tmp_path / "f", chunk=7) == hashlib.md5(b"abc" * 1000).hexdigest()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([7, 2, 1, 0, 4, 1], dtype=np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, gz)
    ds = get_dataset("mnist", tmp_path, "test")
    assert len(ds) == 6 and ds.channels == 1 and ds.classes[7] == "7"
    image, label = ds[3]
    assert label == 0 and image.shape == (1, 28, 28)
    assert image[0, 10, 20].item() == pytest.approx(images[3, 10, 20] / 255)
    with pytest.raises(VitscopeError, match="train-images-idx3-ubyte"):
        get_dataset("mnist", tmp_path, "train")


def test_mnist_malformed_idx(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(VitscopeError, match="unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(VitscopeError, match="header says"):
        read_idx(tmp_path / "short")


def test_real_mnist_test_set(shared_data: Path) -> None:
    """The real t10k files: 10,000 digits whose first labels are the well-known 7 2 1 0 4 1 4 9 5 9."""
    ds = get_dataset("mnist", shared_data / "mnist", "test")
    assert len(ds) == 10_000
    assert [ds[i][1] for i in range(10)] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(ds.labels).tolist()[:2] == [980, 1135]  # type: ignore[arg-type]


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander, Salamandra salamandra\n")
    for k, w in enumerate(wnids):
        for j in range(3):
            _png(base / "train" / w / "images" / f"{w}_{j}.JPEG", (k * 200, j * 50, 0))
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    _png(base / "val" / "images" / "val_0.JPEG", (10, 20, 30))
    _png(base / "val" / "images" / "val_1.JPEG", (40, 50, 60))
    (base / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn01629819\t0\t10\t60\t50\nval_1.JPEG\tn01443537\t3\t4\t50\t60\n")
    train = get_dataset("tiny-imagenet", tmp_path, "train", image_size=16)
    assert train.classes == ("goldfish", "European fire salamander") and len(train) == 6
    assert sorted(train[i][1] for i in range(6)) == [0, 0, 0, 1, 1, 1]
    val = get_dataset("tiny-imagenet", tmp_path, "val")
    assert [val[i][1] for i in range(2)] == [1, 0]
    assert val[1][0][:, 0, 0].tolist() == pytest.approx([40 / 255, 50 / 255, 60 / 255])
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(VitscopeError, match="unknown wnid"):
        get_dataset("tiny-imagenet", tmp_path, "val")
    (base / "wnids.txt").unlink()
    with pytest.raises(VitscopeError, match=r"wnids\.txt"):
        get_dataset("tiny-imagenet", tmp_path, "train")


def test_image_folder_with_and_without_split_folders(tmp_path: Path) -> None:
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for j in range(10):
            _png(tmp_path / "flat" / cls / f"{j:02d}.png", colour)
    train = get_dataset("folder", tmp_path / "flat", "train", image_size=(12, 16))
    val = get_dataset("folder", tmp_path / "flat", "val")
    assert train.classes == ("cat", "dog") and len(train) == 18 and len(val) == 2
    assert {p.name for p in val.files} == {"09.png"}  # type: ignore[attr-defined]
    image, label = train[15]
    assert image.shape == (3, 12, 16) and label == 1 and image[2].mean().item() == pytest.approx(1.0)
    _png(tmp_path / "split" / "train" / "a" / "x.png", (0, 0, 0))
    _png(tmp_path / "split" / "val" / "a" / "y.png", (0, 0, 0))
    assert len(get_dataset("folder", tmp_path / "split", "val")) == 1
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(VitscopeError, match="no images"):
        get_dataset("folder", tmp_path / "empty", "train")


def test_unknown_dataset_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(VitscopeError, match="unknown dataset"):
        get_dataset("imagenet", tmp_path)
    with pytest.raises(VitscopeError, match="needs a data folder"):
        get_dataset("mnist")
    with pytest.raises(VitscopeError, match="does not exist"):
        get_dataset("mnist", tmp_path / "nope")
