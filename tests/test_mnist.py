"""MNIST files: IDX parsing, errors, checksummed downloads from a loopback server, real data."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_omniglot import real_data_dir
from loopback import LoopbackServer

from metalearn.data.sets.mnist import (
    MNIST_FILES,
    MNIST_FIRST10K_FILES,
    load_mnist,
    mnist_root,
    read_idx,
)
from metalearn.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------
# Generated IDX files (also used by tests/test_hpo.py)
# --------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x00000800 + ndim, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def mnist_like(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable MNIST-shaped data: a fixed random blob pattern per digit plus noise."""
    prototypes = np.random.default_rng(1234).random((10, 28, 28)) ** 3
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = prototypes[labels] * 200 + rng.random((count, 28, 28)) * 55
    return images.astype(np.uint8), labels


def make_mnist_fixture(
    data_dir: Path, n_train: int = 1200, n_test: int = 300, first10k: bool = True
) -> Path:
    """Generated MNIST files under ``data_dir/mnist``: the train files under the first-10k
    names (or the official ones), the test files under the official names."""
    root = mnist_root(data_dir)
    train_names = MNIST_FIRST10K_FILES if first10k else MNIST_FILES["train"]
    for names, (images, labels) in (
        (train_names, mnist_like(n_train, 0)),
        (MNIST_FILES["test"], mnist_like(n_test, 1)),
    ):
        write_idx(root / names[0], images)
        write_idx(root / names[1], labels)
    return data_dir


def one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    name = "x-idx3-ubyte.gz" if compress else "x-idx3-ubyte"
    got = read_idx(write_idx(tmp_path / name, array, compress))
    assert got.dtype == torch.uint8 and tuple(got.shape) == (2, 3, 4)
    assert torch.equal(got, torch.from_numpy(array))
    labels = read_idx(write_idx(tmp_path / "y.gz", np.array([3, 1, 4], dtype=np.uint8)))
    assert labels.tolist() == [3, 1, 4]


def test_read_idx_errors(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    cases = {
        "missing.gz": None,
        "not-gzip.gz": b"plain bytes, not gzip",
        "truncated-gzip.gz": gzip.compress(good)[:-20],
        "bad-magic": b"\x01\x02\x08\x01" + good[4:],
        "int32": bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 1) + b"\0\0\0\0",
        "short-header": bytes([0, 0, 0x08, 3, 0, 0]),
        "short-data": good[:-5],
        "long-data": good + b"\0",
        "empty": b"",
    }
    expected = {
        "missing.gz": "not found",
        "not-gzip.gz": "corrupt",
        "truncated-gzip.gz": "corrupt",
        "bad-magic": "not an IDX file",
        "int32": "unsigned bytes",
        "short-header": "truncated IDX header",
        "short-data": "truncated",
        "long-data": "longer than its header",
        "empty": "not an IDX file",
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(DataError) as err:
            read_idx(path)
        assert expected[name] in one_line(err), (name, str(err.value))
        assert str(path) in str(err.value)


def test_load_prefers_the_official_train_files(tmp_path: Path) -> None:
    make_mnist_fixture(tmp_path, n_train=50, n_test=20, first10k=True)
    train = load_mnist(tmp_path, "train", download=False)
    assert train.images.shape == (50, 28, 28) and train.labels.shape == (50,)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.uint8
    # official 60k-style files beside the first-10k ones win
    images, labels = mnist_like(70, 5)
    root = mnist_root(tmp_path)
    write_idx(root / MNIST_FILES["train"][0], images)
    write_idx(root / MNIST_FILES["train"][1].removesuffix(".gz"), labels, compress=False)
    train = load_mnist(tmp_path, "train", download=False)
    assert len(train.labels) == 70 and torch.equal(train.labels, torch.from_numpy(labels))
    test = load_mnist(tmp_path, "test", download=False)
    assert test.images.shape == (20, 28, 28)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, "test", download=False)
    message = one_line(err)
    assert str(mnist_root(tmp_path)) in message and "METALEARN_DATA_DIR" in message
    with pytest.raises(ConfigError):
        load_mnist(tmp_path, "validation", download=False)  # type: ignore[arg-type]
    root = mnist_root(tmp_path)
    write_idx(root / MNIST_FILES["test"][0], mnist_like(10, 0)[0])
    write_idx(root / MNIST_FILES["test"][1], mnist_like(9, 0)[1])
    with pytest.raises(DataError, match="10 images but .* 9 labels"):
        load_mnist(tmp_path, "test", download=False)
    write_idx(root / MNIST_FILES["test"][1], np.full(10, 11, dtype=np.uint8))
    with pytest.raises(DataError, match="label 11"):
        load_mnist(tmp_path, "test", download=False)
    write_idx(root / MNIST_FILES["test"][0], np.zeros((10, 27, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"not MNIST images"):
        load_mnist(tmp_path, "test", download=False)
    # only one of the two test files: the other is named
    (root / MNIST_FILES["test"][0]).unlink()
    with pytest.raises(DataError, match="missing t10k-images"):
        load_mnist(tmp_path, "test", download=False)


# --------------------------------------------------------------------------------------
# Downloads from a loopback server
# --------------------------------------------------------------------------------------


def _serve_test_split(server: LoopbackServer, count: int = 12) -> tuple[str, dict[str, str]]:
    images, labels = mnist_like(count, 3)
    md5 = {}
    for name, array in zip(MNIST_FILES["test"], (images, labels), strict=True):
        body = gzip.compress(idx_bytes(array), mtime=0)
        url = server.serve(f"/mnist/{name}", body)
        md5[name] = hashlib.md5(body, usedforsecurity=False).hexdigest()
    return url.rsplit("/", 1)[0] + "/", md5


def test_download_good(tmp_path: Path, server: LoopbackServer) -> None:
    base, md5 = _serve_test_split(server)
    test = load_mnist(tmp_path, "test", base_url=base, md5=md5, progress=False)
    assert test.images.shape == (12, 28, 28)
    root = mnist_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == sorted(MNIST_FILES["test"])
    # present files are not downloaded again
    load_mnist(tmp_path, "test", base_url=base, md5=md5, progress=False)
    assert len(server.requests) == 2


def test_download_wrong_md5_saves_nothing(tmp_path: Path, server: LoopbackServer) -> None:
    base, md5 = _serve_test_split(server)
    md5[MNIST_FILES["test"][0]] = "0" * 32
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, "test", base_url=base, md5=md5, progress=False)
    assert "checksum mismatch" in one_line(err) and "download" in str(err.value)
    assert not mnist_root(tmp_path).exists()  # the data root is left as it was


def test_download_interrupted_saves_nothing(tmp_path: Path, server: LoopbackServer) -> None:
    images, _ = mnist_like(5, 0)
    body = gzip.compress(idx_bytes(images), mtime=0)
    name = MNIST_FILES["test"][0]
    url = server.serve(f"/m/{name}", body[:100], declared=len(body))
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, "test", base_url=url.rsplit("/", 1)[0], md5={}, progress=False)
    assert "interrupted" in one_line(err) or "could not download" in str(err.value)
    assert not mnist_root(tmp_path).exists()  # the data root is left as it was


def test_download_rejects_a_file_that_is_not_mnist(tmp_path: Path, server: LoopbackServer) -> None:
    # right length and no md5 to check, but the content is labels where images belong
    name = MNIST_FILES["test"][0]
    url = server.serve(f"/m/{name}", gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(DataError, match="not a valid MNIST"):
        load_mnist(tmp_path, "test", base_url=url.rsplit("/", 1)[0], md5={}, progress=False)
    assert not mnist_root(tmp_path).exists()  # the data root is left as it was


def test_official_train_files_are_downloaded_when_absent(
    tmp_path: Path, server: LoopbackServer
) -> None:
    images, labels = mnist_like(8, 2)
    for name, array in zip(MNIST_FILES["train"], (images, labels), strict=True):
        url = server.serve(f"/mnist/{name}", gzip.compress(idx_bytes(array)))
    train = load_mnist(tmp_path, "train", base_url=url.rsplit("/", 1)[0], md5={}, progress=False)
    assert len(train.labels) == 8
    assert (mnist_root(tmp_path) / MNIST_FILES["train"][0]).is_file()


# --------------------------------------------------------------------------------------
# Real MNIST
# --------------------------------------------------------------------------------------


def real_mnist_dir() -> Path | None:
    """The data root holding the real MNIST (``mnist/t10k-*``), or None."""
    root = real_data_dir()
    if root is None or not (mnist_root(root) / MNIST_FILES["test"][0]).is_file():
        return None
    return root


def test_real_mnist_shapes() -> None:
    root = real_mnist_dir()
    if root is None:
        pytest.skip("real MNIST not found (set METALEARN_DATA_DIR or provide ../shared/data)")
    test = load_mnist(root, "test", download=False)
    assert test.images.shape == (10000, 28, 28) and test.labels.shape == (10000,)
    assert test.labels.bincount().tolist()[:2] == [980, 1135]
    train = load_mnist(root, "train", download=False)
    assert len(train.labels) in (10000, 60000) and train.images.shape[1:] == (28, 28)
    assert train.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the official order
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
