"""tieredImageNet: the split file, Ren et al.'s pickles (PNG and npz) and the folder form,
the cache, and the errors.

The fixture holds every class of the real split file (608) with two 84x84 images each, in
the real on-disk formats: a pickled list of PNG-byte arrays (as ``cv2.imencode`` returns
them, (L, 1) uint8) with a labels pickle naming the classes by their WordNet lemmas in a
shuffled order, the npz of decoded BGR images, and one folder of PNGs per class.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import cache as cache_module
from metalearn.data.sets import tieredimagenet as tiered
from metalearn.data.sets.tieredimagenet import (
    TIEREDIMAGENET_CLASSES,
    load_tieredimagenet,
    prepare_tieredimagenet,
    tieredimagenet_root,
    tieredimagenet_split,
)
from metalearn.data.storage import SPLIT_NAMES, ClassImages
from metalearn.errors import DataError

PER_CLASS = 2
SPEC = json.loads((Path(tiered.__file__).parents[1] / "splits" / "tieredimagenet.json").read_text())


class RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this pickle runs code",))


def one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def fixture_image(split: str, c: int, j: int) -> np.ndarray:
    """(84, 84, 3) RGB: a colour of class c of split, a bright square at a place set by j."""
    offset = SPLIT_NAMES.index(split) * 1000
    rng = np.random.default_rng(offset + c)
    image = np.empty((84, 84, 3), np.uint8)
    image[:] = rng.integers(0, 200, 3, dtype=np.uint8)
    image[:, :, 0] += np.arange(84, dtype=np.uint8)[None, :] // 2  # a gradient in red only
    image[10 * j : 10 * j + 8, 5:13] = (255, 255, 255)
    return image


def png_array(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8).reshape(-1, 1).copy()


def split_layout(split: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The file's class numbering (a permutation of the split file's classes) and its rows
    (split-file class, image), interleaved: image 0 of every class, then image 1."""
    count = TIEREDIMAGENET_CLASSES[split]
    order = list(np.random.default_rng(7).permutation(count))
    rows = [(c, j) for j in range(PER_CLASS) for c in range(count)]
    return order, rows


def write_pickles(base: Path, split: str, names: str = "words", form: str = "png") -> None:
    """Ren et al.'s ``<split>_images_png.pkl`` (or ``_images.npz``) and ``_labels.pkl``."""
    base.mkdir(parents=True, exist_ok=True)
    wnids = SPEC[split]
    order, rows = split_layout(split)  # file class k is split-file class order[k]
    label_of = {c: k for k, c in enumerate(order)}
    if names == "words":
        label_str = [SPEC["words"][wnids[c]] for c in order]
    else:
        label_str = [wnids[c] for c in order]
    categories = list(dict.fromkeys(SPEC["categories"][w] for w in wnids))
    labels = {
        "label_specific": np.array([label_of[c] for c, _ in rows], np.int32),
        "label_general": np.array(
            [categories.index(SPEC["categories"][wnids[c]]) for c, _ in rows], np.int32
        ),
        "label_specific_str": label_str,
        "label_general_str": [SPEC["words"][c] for c in categories],
    }
    with open(base / f"{split}_labels.pkl", "wb") as handle:
        pickle.dump(labels, handle, protocol=pickle.HIGHEST_PROTOCOL)
    images = [fixture_image(split, c, j) for c, j in rows]
    if form == "png":
        with open(base / f"{split}_images_png.pkl", "wb") as handle:
            pickle.dump([png_array(im) for im in images], handle, protocol=4)
    else:  # Ren et al.'s decompress(): cv2.imdecode, BGR
        np.savez(base / f"{split}_images.npz", images=np.stack(images)[:, :, :, ::-1])


def write_folder(base: Path, split: str) -> None:
    for c, wnid in enumerate(SPEC[split]):
        folder = base / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(PER_CLASS):
            Image.fromarray(fixture_image(split, c, j)).save(folder / f"{wnid}{j + 1:08d}.png")


def expected(split: str) -> ClassImages:
    count = TIEREDIMAGENET_CLASSES[split]
    images = np.stack(
        [fixture_image(split, c, j) for c in range(count) for j in range(PER_CLASS)]
    ).transpose(0, 3, 1, 2)
    offsets = np.arange(count + 1, dtype=np.int64) * PER_CLASS
    return ClassImages(torch.from_numpy(images), offsets, SPEC[split])


def assert_same(a: ClassImages, b: ClassImages) -> None:
    assert list(a.names or []) == list(b.names or [])
    assert np.array_equal(a.offsets, b.offsets)
    assert torch.equal(a.images, b.images)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("tiered-pickle")
    for split in SPLIT_NAMES:
        write_pickles(tieredimagenet_root(data), split)
    return data


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("tiered-folder")
    for split in SPLIT_NAMES:
        write_folder(tieredimagenet_root(data), split)
    return data


# -- the split file ------------------------------------------------------------------------


def test_split_file_is_ren_et_al() -> None:
    counts = {split: len(tieredimagenet_split(split)) for split in SPLIT_NAMES}
    assert counts == {"train": 351, "val": 97, "test": 160} == TIEREDIMAGENET_CLASSES
    all_classes = [w for split in SPLIT_NAMES for w in SPEC[split]]
    assert len(set(all_classes)) == 608 and set(SPEC["categories"]) == set(all_classes)
    categories = {split: {SPEC["categories"][w] for w in SPEC[split]} for split in SPLIT_NAMES}
    assert {s: len(c) for s, c in categories.items()} == {"train": 20, "val": 6, "test": 8}
    assert not (categories["train"] & categories["val"] or categories["val"] & categories["test"])
    assert SPEC["train"][0] == "n01530575" and SPEC["categories"]["n01530575"] == "n01524359"
    assert SPEC["words"]["n01524359"] == "passerine, passeriform bird"
    assert "renmengye/few-shot-ssl-public" in SPEC["source"]


# -- the three forms -----------------------------------------------------------------------


def test_pickles_decode_in_split_file_order(pickled: Path, tmp_path: Path) -> None:
    splits = load_tieredimagenet(pickled, tmp_path / "cache", progress=False)
    for split in SPLIT_NAMES:
        assert_same(splits[split], expected(split))
        assert splits[split].image_shape == (3, 84, 84)


def test_folder_and_npz_forms_equal_the_pickles(
    pickled: Path, folder: Path, tmp_path: Path
) -> None:
    from_pickles = load_tieredimagenet(pickled, tmp_path / "c1", progress=False)
    from_folder = load_tieredimagenet(folder, tmp_path / "c2", progress=False)
    npz = tmp_path / "npz"
    for split in SPLIT_NAMES:
        write_pickles(tieredimagenet_root(npz), split, names="wnids", form="npz")
    from_npz = load_tieredimagenet(npz, tmp_path / "c3", progress=False)
    for split in SPLIT_NAMES:
        assert_same(from_folder[split], from_pickles[split])
        assert_same(from_npz[split], from_pickles[split])


def test_npz_is_memory_mapped_not_read(tmp_path: Path) -> None:
    write_pickles(tmp_path, "val", form="npz")
    images = tiered._npz_images(tmp_path / "val_images.npz")
    assert isinstance(images, np.memmap) and images.shape == (97 * PER_CLASS, 84, 84, 3)
    np.savez_compressed(tmp_path / "small.npz", images=np.ones((2, 84, 84, 3), np.uint8))
    assert tiered._npz_images(tmp_path / "small.npz").sum() == 2 * 84 * 84 * 3


def test_tar_subfolder_and_resized_images(pickled: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tieredimagenet_root(pickled), tieredimagenet_root(data) / "tiered-imagenet")
    splits = load_tieredimagenet(data, tmp_path / "cache", image_size=42, progress=False)
    val = splits["val"]
    assert val.image_shape == (3, 42, 42) and list(val.names or []) == SPEC["val"]
    reference = Image.fromarray(fixture_image("val", 3, 1)).resize(
        (42, 42), Image.Resampling.BILINEAR
    )
    assert np.array_equal(
        val.images[3 * PER_CLASS + 1].numpy(), np.asarray(reference).transpose(2, 0, 1)
    )


def test_class_names_from_the_distributed_synset_table(tmp_path: Path) -> None:
    """Labels named as in ``class_names.txt`` (not WordNet's lemmas) are found through the
    ``synsets.txt`` / ``class_names.txt`` pair of the distribution."""
    root = tieredimagenet_root(tmp_path)
    write_pickles(root, "test", names="wnids")
    path = root / "test_labels.pkl"
    with open(path, "rb") as handle:
        labels = pickle.load(handle)
    labels["label_specific_str"] = [f"class {w}" for w in labels["label_specific_str"]]
    with open(path, "wb") as handle:
        pickle.dump(labels, handle)
    (root / "synsets.txt").write_text("\n".join(SPEC["test"]) + "\n")
    (root / "class_names.txt").write_text("\n".join(f"class {w}" for w in SPEC["test"]) + "\n")
    source = tiered._locate(root, "test")
    assert source is not None
    rows, count = tiered._class_rows(source)
    assert [w for w, _ in rows] == SPEC["test"] and count == 160 * PER_CLASS
    order, layout = split_layout("test")
    assert rows[5][1].tolist() == [i for i, (c, _) in enumerate(layout) if c == 5]
    (root / "class_names.txt").unlink()
    with pytest.raises(DataError) as err:
        tiered._class_rows(source)
    assert "class 0" in one_line(err) and str(path) in str(err.value)
    assert f"'class {SPEC['test'][order[0]]}'" in str(err.value)


# -- the cache -----------------------------------------------------------------------------


def test_cache_reused_memory_mapped_and_rebuilt_on_change(
    pickled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    shutil.copytree(pickled, data)
    cache = tmp_path / "cache"
    first = load_tieredimagenet(data, cache, progress=False)
    assert len(list(cache.glob("tieredimagenet_*.npy"))) == 3

    modes: list[object] = []
    real_load = np.load

    def spy(*args: object, **kwargs: object) -> object:
        modes.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    def no_decoding(*args: object) -> None:
        raise AssertionError("the images pickle was opened although the cache exists")

    with monkeypatch.context() as patch:
        patch.setattr(cache_module.np, "load", spy)
        patch.setattr(tiered, "_png_decoder", no_decoding)
        again = load_tieredimagenet(data, cache, progress=False)
    assert modes == ["c", "c", "c"]
    for split in SPLIT_NAMES:
        assert_same(again[split], first[split])

    # a changed pickle (other pixels, new mtime) decodes again into a new entry
    root = tieredimagenet_root(data)
    images = pickle.loads((root / "val_images_png.pkl").read_bytes())
    images[0] = png_array(np.zeros((84, 84, 3), np.uint8))
    (root / "val_images_png.pkl").write_bytes(pickle.dumps(images))
    stat = (root / "val_images_png.pkl").stat()
    os.utime(root / "val_images_png.pkl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_tieredimagenet(data, cache, progress=False)
    assert split_layout("val")[1][0] == (0, 0)  # row 0: image 0 of the first class
    assert int(changed["val"].images[0].sum()) == 0
    assert torch.equal(changed["val"].images[1:], first["val"].images[1:])
    assert len(list(cache.glob("tieredimagenet_val_*.npy"))) == 2


# -- errors --------------------------------------------------------------------------------


def test_absent_data_says_where_the_files_come_from(tmp_path: Path) -> None:
    for download in (True, False):
        with pytest.raises(DataError) as err:
            load_tieredimagenet(tmp_path, tmp_path / "cache", download=download)
        message = one_line(err)
        assert str(tieredimagenet_root(tmp_path)) in message and "train, val, test" in message
        assert "renmengye/few-shot-ssl-public" in message and "_images_png.pkl" in message
    write_pickles(tieredimagenet_root(tmp_path), "train")
    with pytest.raises(DataError) as err:
        prepare_tieredimagenet(tmp_path)
    assert "(val, test) not found" in one_line(err)


def test_images_pickle_without_labels(tmp_path: Path) -> None:
    root = tieredimagenet_root(tmp_path)
    write_pickles(root, "val")
    (root / "val_labels.pkl").unlink()
    with pytest.raises(DataError) as err:
        prepare_tieredimagenet(tmp_path)
    assert str(root / "val_labels.pkl") in one_line(err)


def test_folder_missing_class_names_it(folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    wnid = SPEC["test"][17]
    shutil.rmtree(tieredimagenet_root(data) / "test" / wnid)
    with pytest.raises(DataError) as err:
        load_tieredimagenet(data, tmp_path / "cache", progress=False)
    assert wnid in one_line(err) and "test split" in str(err.value)


def test_corrupt_png_names_the_row_and_file(tmp_path: Path) -> None:
    root = tieredimagenet_root(tmp_path)
    write_folder(root, "train")  # forms may differ between splits
    write_pickles(root, "val")
    write_pickles(root, "test")
    path = root / "test_images_png.pkl"
    with open(path, "rb") as handle:
        images = pickle.load(handle)
    images[3] = images[3][:100]  # a truncated PNG
    with open(path, "wb") as handle:
        pickle.dump(images, handle)
    with pytest.raises(DataError) as err:
        load_tieredimagenet(tmp_path, tmp_path / "cache", progress=False)
    assert "row 3" in one_line(err) and str(path) in str(err.value)
    assert not list((tmp_path / "cache").glob("tieredimagenet_test_*"))  # nothing half-written


def test_unsafe_or_mismatched_pickles(tmp_path: Path) -> None:
    root = tieredimagenet_root(tmp_path)
    write_pickles(root, "val")
    source = tiered._locate(root, "val")
    assert source is not None
    # a pickle that would run code is refused
    (root / "val_labels.pkl").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(DataError) as err:
        tiered._class_rows(source)
    assert "refusing" in one_line(err) and "val_labels.pkl" in str(err.value)
    # a labels pickle of another split
    write_pickles(root, "test")
    shutil.copy(root / "test_labels.pkl", root / "val_labels.pkl")
    with pytest.raises(DataError) as err:
        tiered._class_rows(source)
    assert "not one of the 97 val classes" in one_line(err)
    # an images pickle that does not match its labels
    write_pickles(root, "val")
    with open(root / "val_images_png.pkl", "wb") as handle:
        pickle.dump([png_array(fixture_image("val", 0, 0))], handle)
    with pytest.raises(DataError) as err, tiered._png_decoder(source.images, 194, 84):
        pass
    assert "holds 1 images" in one_line(err)


def test_npz_of_the_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "val_images.npz"
    np.savez(path, images=np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(DataError) as err, tiered._npz_decoder(path, 3, 84):
        pass
    assert "expected uint8 (3, 84, 84, 3)" in one_line(err)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("other.npy", b"")
    with pytest.raises(DataError) as err, tiered._npz_decoder(path, 3, 84):
        pass
    assert str(path) in one_line(err)


def test_labels_without_class_names(tmp_path: Path) -> None:
    """A repack whose labels pickle only numbers the classes (``labels``) cannot be matched
    to the split: the message says so and which file to use instead."""
    root = tieredimagenet_root(tmp_path)
    write_pickles(root, "val")
    (root / "val_labels.pkl").write_bytes(pickle.dumps({"labels": [0, 1, 2]}))
    source = tiered._locate(root, "val")
    assert source is not None
    with pytest.raises(DataError) as err:
        tiered._class_rows(source)
    assert "holds only 'labels'" in one_line(err) and "label_specific_str" in str(err.value)
