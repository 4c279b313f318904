"""CIFAR-FS and FC100 from a small archive in the official CIFAR-100 python format."""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import pickle
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loopback import LoopbackServer
from PIL import Image

from metalearn.data.sets.cifar import (
    CIFAR100_ARCHIVE,
    CIFAR100_FOLDER,
    CIFAR100_MD5,
    CIFAR100_URL,
    cifar100_root,
    load_cifar_fs,
    load_fc100,
    prepare_cifar100,
)
from metalearn.data.storage import SPLIT_NAMES, ClassImages
from metalearn.errors import DataError

# The 20 superclasses of CIFAR-100 and their fine classes, as in the table of
# https://www.cs.toronto.edu/~kriz/cifar.html (names as in the archive's meta file).
SUPERCLASSES: dict[str, list[str]] = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
COARSE_NAMES = sorted(SUPERCLASSES)  # label order of the archive: alphabetical
FINE_NAMES = sorted(name for names in SUPERCLASSES.values() for name in names)
COARSE_OF = {fine: COARSE_NAMES.index(c) for c, names in SUPERCLASSES.items() for fine in names}

PER_FILE = (3, 1)  # images per class in the small train and test files
PER_CLASS = sum(PER_FILE)


def one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def split_file(name: str) -> dict[str, Any]:
    resource = importlib.resources.files("metalearn.data") / "splits" / f"{name}.json"
    return dict(json.loads(resource.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------------------
# A small archive in the official format
# --------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch can be changed
    """Writes byte strings the way Python 2's cPickle wrote ``str`` (SHORT_BINSTRING /
    BINSTRING), and numpy globals under ``numpy.core``, as the official files have them.
    (Python 3's protocol 2 would write bytes as calls of ``_codecs.encode`` instead.)"""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core") :]
            qualname = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(payload: Any) -> bytes:
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(payload)
    return out.getvalue()


def image(label: int, k: int) -> np.ndarray:
    """The k-th image (in pooled order: train file, then test file) of fine class ``label``,
    (3, 32, 32) uint8: distinct for every (label, k), channel and pixel."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((c * 85 + y * 7 + x * 3 + label * 11 + k * 53) % 256).astype(np.uint8)


def file_order(per: int, seed: int) -> list[int]:
    """Fine labels of a file's rows: each class ``per`` times, classes interleaved."""
    labels = np.repeat(np.arange(100), per)
    return [int(label) for label in np.random.default_rng(seed).permutation(labels)]


def cifar_files(
    per_file: tuple[int, int] = PER_FILE, edit: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, dict[bytes, Any]]:
    """The unpickled ``train``, ``test`` and ``meta`` (bytes keys, as Python 2 wrote them)."""
    files: dict[str, dict[bytes, Any]] = {}
    start = 0
    for name, per, seed in (("train", per_file[0], 1), ("test", per_file[1], 2)):
        labels = file_order(per, seed)
        seen = [0] * 100
        rows = []
        for label in labels:
            rows.append(image(label, start + seen[label]).reshape(-1))  # R, G, B planes
            seen[label] += 1
        files[name] = {
            b"filenames": [
                f"{FINE_NAMES[label]}_{i}.png".encode() for i, label in enumerate(labels)
            ],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [COARSE_OF[FINE_NAMES[label]] for label in labels],
            b"data": np.stack(rows).astype(np.uint8),
        }
        start += per
    files["meta"] = {
        b"fine_label_names": [name.encode() for name in FINE_NAMES],
        b"coarse_label_names": [name.encode() for name in COARSE_NAMES],
    }
    if edit is not None:
        edit(files)
    return files


def archive_bytes(
    files: dict[str, dict[bytes, Any]], dump: Callable[[Any], bytes] = py2_pickle
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        folder = tarfile.TarInfo(CIFAR100_FOLDER)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name in ("meta", "test", "train"):
            body = dump(files[name])
            info = tarfile.TarInfo(f"{CIFAR100_FOLDER}/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


@pytest.fixture(scope="module")
def archive() -> bytes:
    return archive_bytes(cifar_files())


def write_archive(data_dir: Path, body: bytes) -> Path:
    root = cifar100_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / CIFAR100_ARCHIVE).write_bytes(body)
    return root / CIFAR100_ARCHIVE


def extract(data_dir: Path, body: bytes) -> Path:
    root = cifar100_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        tar.extractall(root, filter="data")
    return root / CIFAR100_FOLDER


def load(
    loader: Callable[..., dict[str, ClassImages]], data_dir: Path, **kwargs: Any
) -> dict[str, ClassImages]:
    return loader(
        data_dir,
        data_dir / "cache",
        download=False,
        progress=False,
        images_per_class=PER_FILE,
        **kwargs,
    )


def assert_same(a: dict[str, ClassImages], b: dict[str, ClassImages]) -> None:
    assert list(a) == list(b) == list(SPLIT_NAMES)
    for split in SPLIT_NAMES:
        assert torch.equal(a[split].images, b[split].images)
        np.testing.assert_array_equal(a[split].offsets, b[split].offsets)
        assert list(a[split].names or []) == list(b[split].names or [])


# --------------------------------------------------------------------------------------
# Split files
# --------------------------------------------------------------------------------------


def test_the_fixture_writes_python2_pickles(archive: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        handle = tar.extractfile(f"{CIFAR100_FOLDER}/train")
        assert handle is not None
        body = handle.read()
    assert body.startswith(b"\x80\x02}")  # protocol 2, a dict
    assert b"U\x04data" in body and b"cnumpy.core.multiarray\n_reconstruct\n" in body
    assert b"_codecs" not in body
    assert pickle.loads(body, encoding="bytes")[b"fine_labels"] == file_order(PER_FILE[0], 1)


def test_cifar_fs_split_file() -> None:
    split = split_file("cifar_fs")
    assert "Bertinetto" in split["source"] and "pytorch-meta" in split["source"]
    assert {name: len(split[name]) for name in SPLIT_NAMES} == {"train": 64, "val": 16, "test": 20}
    classes = [name for s in SPLIT_NAMES for name in split[s]]
    assert len(set(classes)) == 100 and sorted(classes) == FINE_NAMES  # disjoint, all covered


def test_fc100_split_file() -> None:
    split = split_file("fc100")
    assert "Oreshkin" in split["source"] and "pytorch-meta" in split["source"]
    assert {name: len(split[name]) for name in SPLIT_NAMES} == {"train": 60, "val": 20, "test": 20}
    supers = split["superclasses"]
    assert {name: len(supers[name]) for name in SPLIT_NAMES} == {"train": 12, "val": 4, "test": 4}
    assert sorted(name for s in SPLIT_NAMES for name in supers[s]) == COARSE_NAMES
    for s in SPLIT_NAMES:
        # whole superclasses, superclass by superclass, CIFAR-100 label order within one
        assert split[s] == [fine for c in supers[s] for fine in SUPERCLASSES[c]]
    # TADAM's class_split, by coarse label id
    ids = {s: sorted(COARSE_NAMES.index(c) for c in supers[s]) for s in SPLIT_NAMES}
    assert ids == {
        "train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19],
        "val": [8, 11, 13, 16],
        "test": [0, 7, 12, 14],
    }


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loader", "name", "counts"),
    [(load_cifar_fs, "cifar_fs", (64, 16, 20)), (load_fc100, "fc100", (60, 20, 20))],
)
def test_archive_and_folder_give_the_same_splits(
    tmp_path: Path,
    archive: bytes,
    loader: Callable[..., dict[str, ClassImages]],
    name: str,
    counts: tuple[int, ...],
) -> None:
    packed, unpacked = tmp_path / "packed", tmp_path / "unpacked"
    write_archive(packed, archive)
    folder = extract(unpacked, archive)
    assert prepare_cifar100(packed, download=False) == cifar100_root(packed) / CIFAR100_ARCHIVE
    assert prepare_cifar100(unpacked, download=False) == folder
    splits = load(loader, packed)
    assert_same(splits, load(loader, unpacked))
    files = split_file(name)
    for split, count in zip(SPLIT_NAMES, counts, strict=True):
        classes = splits[split]
        assert classes.num_classes == count and list(classes.names or []) == files[split]
        assert classes.images.shape == (count * PER_CLASS, 3, 32, 32)
        assert classes.images.dtype == torch.uint8
        np.testing.assert_array_equal(classes.counts, np.full(count, PER_CLASS))
    assert not (tmp_path / "packed" / "cache").exists()  # no cache is written
    # both present: the extracted folder is read (the archive may even be broken)
    write_archive(unpacked, b"not a tar.gz")
    assert_same(splits, load(loader, unpacked))


def test_images_are_decoded_in_order(tmp_path: Path, archive: bytes) -> None:
    write_archive(tmp_path, archive)
    splits = load(load_cifar_fs, tmp_path)
    for split in SPLIT_NAMES:
        classes = splits[split]
        for c, name in enumerate(classes.names or []):
            label = FINE_NAMES.index(name)
            got = classes.images[classes.offsets[c] : classes.offsets[c + 1]].numpy()
            # train-file images in file order, then the test-file image
            expected = np.stack([image(label, k) for k in range(PER_CLASS)])
            np.testing.assert_array_equal(got, expected)
    # the channel layout: a row is 1024 red, 1024 green, 1024 blue values, rows of 32
    row = image(FINE_NAMES.index("apple"), 0).reshape(-1)
    # apple: the 14th train class of CIFAR-FS, its first image
    apple = splits["train"].images[splits["train"].offsets[13]].numpy()
    assert splits["train"].name(13) == "apple"
    assert apple[0, 0, 1] == row[1] and apple[0, 1, 0] == row[32]
    assert apple[1, 0, 0] == row[1024] and apple[2, 31, 31] == row[3071]


def test_resize_is_pil_bilinear(tmp_path: Path, archive: bytes) -> None:
    write_archive(tmp_path, archive)
    splits = load(load_fc100, tmp_path, image_size=20)
    test = splits["test"]
    assert test.images.shape == (20 * PER_CLASS, 3, 20, 20)
    label = FINE_NAMES.index(test.name(0))
    pil = Image.fromarray(image(label, 3).transpose(1, 2, 0)).resize(
        (20, 20), Image.Resampling.BILINEAR
    )
    np.testing.assert_array_equal(test.images[3].numpy(), np.asarray(pil).transpose(2, 0, 1))


def test_python3_pickles_with_bytes_keys_are_read(tmp_path: Path, archive: bytes) -> None:
    write_archive(tmp_path / "py2", archive)
    write_archive(
        tmp_path / "py3", archive_bytes(cifar_files(), lambda p: pickle.dumps(p, protocol=4))
    )
    assert_same(load(load_fc100, tmp_path / "py2"), load(load_fc100, tmp_path / "py3"))


# --------------------------------------------------------------------------------------
# Bad copies
# --------------------------------------------------------------------------------------


def test_corrupt_archive(tmp_path: Path, archive: bytes) -> None:
    path = write_archive(tmp_path, archive[: len(archive) // 2])
    with pytest.raises(DataError) as err:
        load(load_cifar_fs, tmp_path)
    message = one_line(err)
    assert str(path) in message and CIFAR100_URL in message and "delete it" in message


def test_not_a_tar_archive(tmp_path: Path) -> None:
    path = write_archive(tmp_path, b"<html>moved</html>")
    with pytest.raises(DataError) as err:
        load(load_fc100, tmp_path)
    assert str(path) in one_line(err) and "corrupt" in str(err.value)


def test_incomplete_folder(tmp_path: Path, archive: bytes) -> None:
    folder = extract(tmp_path, archive)
    (folder / "meta").unlink()
    with pytest.raises(DataError) as err:
        load(load_cifar_fs, tmp_path)
    message = one_line(err)
    assert str(folder) in message and "lacks meta" in message


def test_class_missing_from_meta(tmp_path: Path) -> None:
    def rename(files: dict[str, dict[bytes, Any]]) -> None:
        files["meta"][b"fine_label_names"][FINE_NAMES.index("whale")] = b"whales"

    write_archive(tmp_path, archive_bytes(cifar_files(edit=rename)))
    with pytest.raises(DataError) as err:
        load(load_cifar_fs, tmp_path)
    message = one_line(err)
    assert "'whale'" in message and "cifar_fs.json" in message and CIFAR100_URL in message


def test_wrong_image_counts(tmp_path: Path, archive: bytes) -> None:
    path = write_archive(tmp_path, archive)
    with pytest.raises(DataError) as err:  # the official counts are 500 + 100
        load_cifar_fs(tmp_path, tmp_path / "cache", download=False)
    message = one_line(err)
    assert (
        str(path) in message
        and "3 images of class apple in its train file, expected 500" in message
    )

    def drop(files: dict[str, dict[bytes, Any]]) -> None:
        test = files["test"]
        test[b"data"] = test[b"data"][1:]
        for key in (b"fine_labels", b"coarse_labels", b"filenames"):
            test[key] = test[key][1:]

    write_archive(tmp_path, archive_bytes(cifar_files(edit=drop)))
    with pytest.raises(DataError) as err:
        load(load_fc100, tmp_path)
    assert "0 images of class" in one_line(err) and "test file, expected 1" in str(err.value)


def test_wrong_superclasses(tmp_path: Path) -> None:
    def move(files: dict[str, dict[bytes, Any]]) -> None:  # whale filed under fish
        for name in ("train", "test"):
            part = files[name]
            whale, fish = FINE_NAMES.index("whale"), COARSE_NAMES.index("fish")
            part[b"coarse_labels"] = [
                fish if f == whale else c
                for f, c in zip(part[b"fine_labels"], part[b"coarse_labels"], strict=True)
            ]

    write_archive(tmp_path, archive_bytes(cifar_files(edit=move)))
    load(load_cifar_fs, tmp_path)  # CIFAR-FS does not use superclasses
    with pytest.raises(DataError) as err:
        load(load_fc100, tmp_path)
    assert "superclasses" in one_line(err) and "fc100.json" in str(err.value)


def test_bad_data_array(tmp_path: Path) -> None:
    def flatten(files: dict[str, dict[bytes, Any]]) -> None:
        files["train"][b"data"] = files["train"][b"data"].reshape(-1, 32, 96)

    write_archive(tmp_path, archive_bytes(cifar_files(edit=flatten)))
    with pytest.raises(DataError) as err:
        load(load_cifar_fs, tmp_path)
    assert "expected uint8 (N, 3072)" in one_line(err)


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


def md5_of(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def test_download(tmp_path: Path, server: LoopbackServer, archive: bytes) -> None:
    url = server.serve("/cifar-100-python.tar.gz", archive)
    data_dir = tmp_path / "data"
    path = prepare_cifar100(data_dir, url=url, md5=md5_of(archive), progress=False)
    assert path == cifar100_root(data_dir) / CIFAR100_ARCHIVE and path.read_bytes() == archive
    assert [p.name for p in cifar100_root(data_dir).iterdir()] == [CIFAR100_ARCHIVE]
    splits = load(load_fc100, data_dir)
    assert [splits[s].num_classes for s in SPLIT_NAMES] == [60, 20, 20]
    prepare_cifar100(data_dir, url=url, md5=md5_of(archive), progress=False)
    assert server.requests == ["/cifar-100-python.tar.gz"]  # present: not downloaded again


def test_download_bad_checksum(tmp_path: Path, server: LoopbackServer, archive: bytes) -> None:
    url = server.serve("/cifar-100-python.tar.gz", archive)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as err:
        prepare_cifar100(data_dir, url=url, progress=False)  # the official md5
    message = one_line(err)
    assert "checksum mismatch" in message and CIFAR100_MD5 in message and url in message
    assert "by hand" in message
    assert not data_dir.exists()  # the folders the download created are gone


def test_download_not_an_archive(tmp_path: Path, server: LoopbackServer) -> None:
    url = server.serve("/moved", b"<html>moved</html>")
    with pytest.raises(DataError) as err:
        prepare_cifar100(tmp_path, url=url, md5=None, progress=False)
    message = one_line(err)
    assert "not a valid" in message and "not a gzip-compressed tar archive" in message
    assert not cifar100_root(tmp_path).exists()


def test_absent_without_download(tmp_path: Path, server: LoopbackServer) -> None:
    for loader in (load_cifar_fs, load_fc100):
        with pytest.raises(DataError) as err:
            loader(tmp_path, tmp_path / "cache", download=False)
        message = one_line(err)
        assert str(cifar100_root(tmp_path)) in message and CIFAR100_URL in message
        assert CIFAR100_ARCHIVE in message and "data.download=true" in message
    assert not cifar100_root(tmp_path).exists() and server.requests == []
