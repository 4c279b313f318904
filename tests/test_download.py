"""Downloads from a loopback HTTP server: metalearn.data.download and the miniImageNet pickles."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_miniimagenet import expected_split, pickle_bytes
from loopback import LoopbackServer

from metalearn.data.download import download_file
from metalearn.data.sets.miniimagenet import (
    MINIIMAGENET_SPLITS,
    MINIIMAGENET_URLS,
    load_miniimagenet,
    miniimagenet_root,
    prepare_miniimagenet,
)
from metalearn.errors import DataError

SMALL = {"train": 3, "val": 2, "test": 2}
PER_CLASS = 4


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------
# download_file
# --------------------------------------------------------------------------------------


def test_download_file_checks(tmp_path: Path, server: LoopbackServer) -> None:
    body = b"0123456789" * 1000
    url = server.serve("/f.bin", body)
    target = tmp_path / "f.bin"
    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    assert download_file(url, target, "a file", "do X", sha256=sha256_of(body), md5=md5) == target
    assert target.read_bytes() == body
    # a wrong md5 is reported even when the sha256 matches; the old file stays as it was
    with pytest.raises(DataError) as err:
        download_file(url, target, "a file", "do X", sha256=sha256_of(body), md5="0" * 32)
    assert "md5" in one_line(err) and md5 in str(err.value) and str(err.value).endswith("do X")
    assert target.read_bytes() == body
    # validate runs on the complete file and may reject it

    def reject(path: Path) -> None:
        assert path.read_bytes() == body and path != target
        raise DataError("no good")

    with pytest.raises(DataError) as err:
        download_file(url, tmp_path / "g.bin", "a file", "do X", validate=reject, progress=False)
    assert "no good" in one_line(err) and "discarded" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_download_file_unwritable_folder(tmp_path: Path, server: LoopbackServer) -> None:
    url = server.serve("/f.bin", b"x")
    with pytest.raises(DataError) as err:
        download_file(url, tmp_path / "absent" / "f.bin", "a file", "do X", progress=False)
    assert str(tmp_path / "absent") in one_line(err) and "writable" in str(err.value)
    assert server.requests == []


# --------------------------------------------------------------------------------------
# miniImageNet pickles
# --------------------------------------------------------------------------------------


def serve_pickles(server: LoopbackServer) -> tuple[dict[str, str], dict[str, bytes]]:
    payloads = {
        split: pickle_bytes(split, SMALL[split], PER_CLASS) for split in MINIIMAGENET_SPLITS
    }
    urls = {split: server.serve(f"/{split}.pkl", data) for split, data in payloads.items()}
    return urls, payloads


def prepare(data_dir: Path, urls: dict[str, str], **kwargs: Any) -> Path:
    return prepare_miniimagenet(
        data_dir,
        urls=urls,
        expected_classes=SMALL,
        images_per_class=PER_CLASS,
        progress=False,
        **kwargs,
    )


def test_download_good_files(tmp_path: Path, server: LoopbackServer) -> None:
    urls, payloads = serve_pickles(server)
    sha256 = {split: sha256_of(data) for split, data in payloads.items()}
    data_dir = tmp_path / "data"
    root = prepare(data_dir, urls, sha256=sha256)
    assert root == miniimagenet_root(data_dir)
    names = [f"mini-imagenet-cache-{split}.pkl" for split in MINIIMAGENET_SPLITS]
    assert sorted(p.name for p in root.iterdir()) == sorted(names)
    for split, name in zip(MINIIMAGENET_SPLITS, names, strict=True):
        assert (root / name).read_bytes() == payloads[split]
    splits = load_miniimagenet(
        data_dir,
        tmp_path / "cache",
        download=False,
        progress=False,
        expected_classes=SMALL,
        images_per_class=PER_CLASS,
    )
    for split in MINIIMAGENET_SPLITS:
        np.testing.assert_array_equal(
            splits[split].images.numpy(), expected_split(split, SMALL[split], PER_CLASS)
        )
    # present now: no second download
    assert len(server.requests) == 3
    prepare(data_dir, urls, sha256=sha256)
    assert len(server.requests) == 3


def test_download_only_absent_splits(tmp_path: Path, server: LoopbackServer) -> None:
    urls, payloads = serve_pickles(server)
    root = miniimagenet_root(tmp_path)
    root.mkdir(parents=True)
    (root / "mini-imagenet-cache-validation.pkl").write_bytes(payloads["val"])
    prepare(tmp_path, urls)
    assert sorted(server.requests) == ["/test.pkl", "/train.pkl"]


def test_download_corrupted_file(tmp_path: Path, server: LoopbackServer) -> None:
    urls, payloads = serve_pickles(server)
    good = sha256_of(payloads["val"])
    corrupted = bytearray(payloads["val"])
    corrupted[len(corrupted) // 2] ^= 0xFF
    urls["val"] = server.serve("/val-corrupted.pkl", bytes(corrupted))
    with pytest.raises(DataError) as err:
        prepare(tmp_path, urls, sha256={"train": None, "val": good, "test": None})
    message = one_line(err)
    assert "checksum mismatch" in message and good in message and urls["val"] in message
    assert "discarded" in message and "by hand" in message
    root = miniimagenet_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["mini-imagenet-cache-train.pkl"]


def test_download_unchecked_garbage_is_rejected(tmp_path: Path, server: LoopbackServer) -> None:
    # without a pinned checksum, the content check still catches a bad file
    urls, _ = serve_pickles(server)
    urls["train"] = server.serve("/moved", b"<html>moved</html>")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, urls)
    message = one_line(err)
    assert "/moved" in message and "discarded (it cannot be read" in message
    assert not miniimagenet_root(tmp_path).exists()  # the data root is left as it was


def test_download_interrupted(tmp_path: Path, server: LoopbackServer) -> None:
    urls, payloads = serve_pickles(server)
    body = payloads["test"]
    urls["test"] = server.serve("/cut.pkl", body[: len(body) // 3], declared=len(body))
    with pytest.raises(DataError) as err:
        prepare(tmp_path, urls)
    message = one_line(err)
    assert "/cut.pkl" in message and ("interrupted" in message or "IncompleteRead" in message)
    names = sorted(p.name for p in miniimagenet_root(tmp_path).iterdir())
    assert names == ["mini-imagenet-cache-train.pkl", "mini-imagenet-cache-val.pkl"]


def test_download_http_error(tmp_path: Path, server: LoopbackServer) -> None:
    urls, _ = serve_pickles(server)
    urls["train"] = urls["train"].replace("/train.pkl", "/gone.pkl")
    with pytest.raises(DataError) as err:
        prepare(tmp_path, urls)
    message = one_line(err)
    assert "404" in message and "by hand" in message and urls["train"] in message
    assert not miniimagenet_root(tmp_path).exists()  # the data root is left as it was


def test_default_urls() -> None:
    assert set(MINIIMAGENET_URLS) == set(MINIIMAGENET_SPLITS)
    assert all(
        url.startswith("https://") and url.endswith(".pkl") for url in MINIIMAGENET_URLS.values()
    )
