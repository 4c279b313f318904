"""Tests of metalearn.data.sets.miniimagenet: both on-disk formats, cache, errors, augmentation, DataModule."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra.utils
import numpy as np
import pytest
import torch
from conftest import SMALL_EPISODES, compose_config
from fixtures_miniimagenet import (
    FIXTURE_CLASSES,
    FIXTURE_IMAGES,
    expected_split,
    fixture_class_ids,
    fixture_image,
    make_folder_fixture,
    make_pickle_fixture,
    pickle_bytes,
)
from omegaconf import OmegaConf
from PIL import Image

from metalearn.data import EpisodeBatch, MiniImageNetDataModule, augment, augment_episodes
from metalearn.data.sets import miniimagenet as mini
from metalearn.data.sets.miniimagenet import (
    MINIIMAGENET_SPLITS,
    load_miniimagenet,
    load_miniimagenet_image,
    miniimagenet_root,
    prepare_miniimagenet,
    preprocess_miniimagenet,
)
from metalearn.errors import ConfigError, DataError
from metalearn.pipeline import train

SPLITS = MINIIMAGENET_SPLITS


def one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def load_fixture(
    data_dir: Path, cache_dir: Path, **kwargs: Any
) -> dict[str, mini.MiniImageNetSplit]:
    kwargs.setdefault("expected_classes", FIXTURE_CLASSES)
    kwargs.setdefault("images_per_class", FIXTURE_IMAGES)
    return load_miniimagenet(data_dir, cache_dir, download=False, progress=False, **kwargs)


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.npy"))


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pickle_fixture(tmp_path_factory.mktemp("mini-pickle"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_fixture(tmp_path_factory.mktemp("mini-folder"))


# --------------------------------------------------------------------------------------
# Both formats decode to the same uint8 tensors; the cache is reused
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["pickle", "folder"])
def test_load_fixture(
    layout: str, pickled: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = pickled if layout == "pickle" else folder
    cache_dir = tmp_path / "cache" / "nested"
    splits = load_fixture(data_dir, cache_dir)
    assert list(splits) == list(SPLITS)
    for split in SPLITS:
        loaded = splits[split]
        assert loaded.images.dtype == torch.uint8
        assert loaded.images.shape == (FIXTURE_CLASSES[split], FIXTURE_IMAGES, 3, 84, 84)
        assert loaded.classes == fixture_class_ids(split, FIXTURE_CLASSES[split])
        np.testing.assert_array_equal(loaded.images.numpy(), expected_split(split))
    # one cache file per split, reused without decoding, no temporary file left behind
    caches = cache_files(cache_dir)
    indexes = [cache.with_suffix(".json") for cache in caches]
    assert len(caches) == 3 and sorted(cache_dir.iterdir()) == sorted(caches + indexes)
    mtimes = [c.stat().st_mtime_ns for c in caches]

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded although a valid cache exists")

    monkeypatch.setattr(mini, "_decode_pickle", fail)
    monkeypatch.setattr(mini, "_decode_folder", fail)
    again = load_fixture(data_dir, cache_dir)
    for split in SPLITS:
        assert torch.equal(again[split].images, splits[split].images)
        assert again[split].classes == splits[split].classes
    assert [c.stat().st_mtime_ns for c in cache_files(cache_dir)] == mtimes
    # nothing was written into the data folder
    assert not any(p.name.startswith(".") for p in miniimagenet_root(data_dir).rglob("*"))


def test_validation_file_name_and_mixed_formats(tmp_path: Path) -> None:
    # learn2learn names the val pickle "validation"; a split may also come as a CSV
    data_dir = make_pickle_fixture(tmp_path, val_name="validation", splits=("train", "val"))
    make_folder_fixture(tmp_path, splits=("test",))
    splits = load_fixture(data_dir, tmp_path / "cache")
    for split in SPLITS:
        np.testing.assert_array_equal(splits[split].images.numpy(), expected_split(split))


def test_pickle_wins_over_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_pickle_fixture(tmp_path)
    make_folder_fixture(tmp_path)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded the folder although the pickles are present")

    monkeypatch.setattr(mini, "_decode_folder", fail)
    load_fixture(tmp_path, tmp_path / "cache")


def test_folder_images_are_resized(tmp_path: Path) -> None:
    data_dir = make_folder_fixture(
        tmp_path, classes={"train": 2, "val": 2, "test": 2}, per_class=3, size=(120, 90)
    )
    counts = {"train": 2, "val": 2, "test": 2}
    splits = load_fixture(data_dir, tmp_path / "cache", expected_classes=counts, images_per_class=3)
    image = Image.fromarray(fixture_image("val", 1, 2, (120, 90)))
    expected = preprocess_miniimagenet(image).transpose(2, 0, 1)
    np.testing.assert_array_equal(splits["val"].images[1, 2].numpy(), expected)
    png = miniimagenet_root(data_dir) / "images" / "n0000010200000003.png"
    as_float = load_miniimagenet_image(png)
    assert as_float.shape == (3, 84, 84) and as_float.dtype == torch.float32
    assert torch.equal(as_float, torch.from_numpy(expected).float() / 255)
    # another image_size: its own cache, from either format
    small = load_fixture(
        data_dir, tmp_path / "cache", expected_classes=counts, images_per_class=3, image_size=32
    )
    assert small["train"].images.shape == (2, 3, 3, 32, 32)
    assert len(cache_files(tmp_path / "cache")) == 6


def test_pickle_at_another_image_size(pickled: Path, tmp_path: Path) -> None:
    small = load_fixture(pickled, tmp_path / "cache", image_size=21)
    image = Image.fromarray(fixture_image("test", 2, 5))
    expected = preprocess_miniimagenet(image, 21).transpose(2, 0, 1)
    np.testing.assert_array_equal(small["test"].images[2, 5].numpy(), expected)


def test_preprocess_converts_to_rgb() -> None:
    gray = Image.new("L", (100, 50), 77)
    out = preprocess_miniimagenet(gray)
    assert out.shape == (84, 84, 3) and out.dtype == np.uint8 and (out == 77).all()
    with pytest.raises(DataError) as err:
        load_miniimagenet_image("/nonexistent/x.jpg")
    assert "/nonexistent/x.jpg" in one_line(err)


def test_cache_rebuilt_when_source_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = make_pickle_fixture(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    # a copy: the loaded images are mapped from the files this test overwrites in place
    first = load_fixture(data_dir, cache_dir)["train"].images.clone()
    path = miniimagenet_root(data_dir) / "mini-imagenet-cache-test.pkl"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_fixture(data_dir, cache_dir)
    assert len(cache_files(cache_dir)) == 4
    # an unreadable cache is ignored and rebuilt
    for cache in cache_files(cache_dir):
        cache.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger=mini.__name__):
        again = load_fixture(data_dir, cache_dir)
    for split in SPLITS:
        assert caplog.text.count(f"Ignoring the unusable miniImageNet {split} cache") == 1
    assert torch.equal(again["train"].images, first)


def test_unwritable_cache_dir(pickled: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(DataError) as err:
        load_fixture(pickled, blocker / "cache")
    assert str(blocker / "cache") in one_line(err) and "METALEARN_CACHE_DIR" in str(err.value)


# --------------------------------------------------------------------------------------
# Errors: one line, naming the file and what to do
# --------------------------------------------------------------------------------------


def test_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        prepare_miniimagenet(tmp_path, download=False)
    message = one_line(err)
    root = str(miniimagenet_root(tmp_path))
    assert root in message and "mini-imagenet-cache-" in message and "train.csv" in message
    assert "no official host" in message and "data.download" in message
    assert "METALEARN_DATA_DIR" in message
    assert not miniimagenet_root(tmp_path).exists()  # nothing created
    make_pickle_fixture(tmp_path, splits=("train", "test"))
    with pytest.raises(DataError) as err:
        load_fixture(tmp_path, tmp_path / "cache")
    assert "lacks the split val" in one_line(err) and root in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not_a_dict", "code"])
def test_unreadable_pickle(tmp_path: Path, damage: str) -> None:
    data_dir = make_pickle_fixture(tmp_path)
    path = miniimagenet_root(data_dir) / "mini-imagenet-cache-val.pkl"
    content = path.read_bytes()
    path.write_bytes(
        {
            "garbage": b"<html>404</html>",
            "truncated": content[: len(content) // 2],
            "empty": b"",
            "not_a_dict": pickle.dumps([1, 2, 3]),
            "code": pickle.dumps({"image_data": os.getcwd, "class_dict": {}}),
        }[damage]
    )
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    message = one_line(err)
    assert f"the miniImageNet pickle {path} cannot be read" in message and "replace" in message
    if damage == "code":
        assert "refusing" in message
    left = list((tmp_path / "cache").iterdir())
    # whole entries of the other splits only: no temporary file, no entry of the broken one
    assert [p.name for p in left if p.suffix not in (".npy", ".json") or "_val_" in p.name] == []


def test_wrong_image_size_in_pickle(tmp_path: Path) -> None:
    root = miniimagenet_root(make_pickle_fixture(tmp_path))
    (root / "mini-imagenet-cache-test.pkl").write_bytes(pickle_bytes("test", size=64))
    with pytest.raises(DataError) as err:
        load_fixture(tmp_path, tmp_path / "cache")
    message = one_line(err)
    assert "mini-imagenet-cache-test.pkl" in message and "(60, 64, 64, 3)" in message
    assert "84x84" in message


def test_wrong_class_count(pickled: Path, folder: Path, tmp_path: Path) -> None:
    for data_dir, name in ((pickled, "mini-imagenet-cache-train.pkl"), (folder, "train.csv")):
        with pytest.raises(DataError) as err:
            load_miniimagenet(data_dir, tmp_path / "cache", download=False, progress=False)
        message = one_line(err)  # the official counts
        assert name in message and "5 classes" in message and "64" in message


def test_wrong_images_per_class(pickled: Path, folder: Path, tmp_path: Path) -> None:
    for data_dir, name in ((pickled, "mini-imagenet-cache-train.pkl"), (folder, "train.csv")):
        with pytest.raises(DataError) as err:
            load_fixture(data_dir, tmp_path / "cache", images_per_class=600)
        message = one_line(err)
        assert name in message and "20 images of class" in message and "600" in message


def test_folder_missing_image(tmp_path: Path) -> None:
    data_dir = make_folder_fixture(tmp_path)
    missing = miniimagenet_root(data_dir) / "images" / "n0000010200000007.png"
    missing.unlink()
    with pytest.raises(DataError) as err:
        prepare_miniimagenet(
            data_dir, download=False, expected_classes=FIXTURE_CLASSES, images_per_class=20
        )
    message = one_line(err)
    assert str(missing) in message and "val.csv" in message and "incomplete" in message


def test_folder_errors(tmp_path: Path) -> None:
    data_dir = make_folder_fixture(tmp_path)
    root = miniimagenet_root(data_dir)
    csv_path = root / "test.csv"
    csv_path.write_text("image,class\na.png,n1\n")
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    assert str(csv_path) in one_line(err) and "filename,label" in str(err.value)
    csv_path.write_text("filename,label\na.png\n")
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    assert "line 2" in one_line(err)
    # an undecodable image is named, and no cache or temporary file is left
    make_folder_fixture(tmp_path, splits=("test",))
    broken = root / "images" / "n0000020100000004.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    assert str(broken) in one_line(err)
    left = sorted(p.name.split("_")[1] + p.suffix for p in (tmp_path / "cache").iterdir())
    assert left == ["train.json", "train.npy", "val.json", "val.npy"]  # train and val only
    shutil.rmtree(root / "images")
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    assert str(root / "images") in one_line(err)


def test_hyperparameters_load_with_weights_only(tmp_path: Path) -> None:
    # Hydra passes mappings as DictConfig; checkpoints must hold plain containers
    dm = MiniImageNetDataModule(
        expected_classes=OmegaConf.create(FIXTURE_CLASSES),
        urls=OmegaConf.create({"train": "http://x"}),
        sha256=OmegaConf.create({"train": None}),
        ways=3,
    )
    buffer = io.BytesIO()
    torch.save(dict(dm.hparams), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["expected_classes"] == FIXTURE_CLASSES and loaded["split"] == "ravi"
    assert loaded["ways"] == 3 and dm.expected_classes == FIXTURE_CLASSES


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_fixture(tmp_path, tmp_path / "cache", image_size=0)
    with pytest.raises(ConfigError):
        MiniImageNetDataModule(split="vinyals")
    with pytest.raises(ConfigError):
        MiniImageNetDataModule(augment_padding=-1)


# --------------------------------------------------------------------------------------
# DataModule and augmentation
# --------------------------------------------------------------------------------------


def datamodule(data_dir: Path, cache_dir: Path, **kwargs: Any) -> MiniImageNetDataModule:
    settings: dict[str, Any] = {
        "expected_classes": FIXTURE_CLASSES,
        "images_per_class": FIXTURE_IMAGES,
        "download": False,
        "ways": 3,
        "shots": 2,
        "query_shots": 4,
        "meta_batch": 2,
        "val_episodes": 3,
        "test_episodes": 3,
        "eval_meta_batch": 2,
    }
    settings.update(kwargs)
    return MiniImageNetDataModule(data_dir=data_dir, cache_dir=cache_dir, **settings)


def test_datamodule_batches(pickled: Path, tmp_path: Path) -> None:
    dm = datamodule(pickled, tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes["val"] == fixture_class_ids("val", 3)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, EpisodeBatch)
    assert batch.support.shape == (2, 6, 3, 84, 84) and batch.support.dtype == torch.uint8
    assert batch.query.shape == (2, 12, 3, 84, 84)
    assert batch.support_labels.tolist()[0] == [0, 0, 1, 1, 2, 2]
    val = list(dm.val_dataloader())
    assert [len(b.episode_ids) for b in val] == [2, 1]
    assert dm.hparams["split"] == "ravi" and dm.split == "ravi"
    with pytest.raises(ConfigError) as err:  # more ways than the 3 val classes
        datamodule(pickled, tmp_path / "cache", ways=4).setup("fit")
    assert "'val'" in one_line(err)


def fake_batch(batch: int = 2, support: int = 3, query: int = 4, side: int = 12) -> EpisodeBatch:
    generator = torch.Generator().manual_seed(0)
    return EpisodeBatch(
        support=torch.randint(
            0, 256, (batch, support, 3, side, side), dtype=torch.uint8, generator=generator
        ),
        support_labels=torch.zeros(batch, support, dtype=torch.int64),
        query=torch.randint(
            0, 256, (batch, query, 3, side, side), dtype=torch.uint8, generator=generator
        ),
        query_labels=torch.zeros(batch, query, dtype=torch.int64),
        episode_ids=torch.arange(10, 10 + batch),
        ways=1,
    )


def _is_crop(out: torch.Tensor, image: torch.Tensor, padding: int) -> bool:
    """Whether ``out`` is a (possibly mirrored) crop of ``image`` zero-padded by ``padding``."""
    side = image.shape[-1]
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + side, dx : dx + side]
            if torch.equal(out, crop) or torch.equal(out, crop.flip(-1)):
                return True
    return False


def test_augment_episodes() -> None:
    batch = fake_batch()
    out = augment_episodes(batch, seed=3, padding=4)
    assert out.support.shape == batch.support.shape and out.support.dtype == torch.uint8
    assert out.query.shape == batch.query.shape
    assert torch.equal(out.support_labels, batch.support_labels)
    assert not torch.equal(out.support, batch.support)
    for images, augmented in ((batch.support, out.support), (batch.query, out.query)):
        for b in range(images.shape[0]):
            for m in range(images.shape[1]):
                assert _is_crop(augmented[b, m], images[b, m], 4)
    # reproducible: a function of (seed, episode id) only
    again = augment_episodes(batch, seed=3, padding=4)
    assert torch.equal(again.support, out.support) and torch.equal(again.query, out.query)
    other = augment_episodes(batch, seed=4, padding=4)
    assert not torch.equal(other.query, out.query)
    single = augment_episodes(
        batch._replace(
            support=batch.support[1:], query=batch.query[1:], episode_ids=batch.episode_ids[1:]
        ),
        seed=3,
        padding=4,
    )
    assert torch.equal(single.query[0], out.query[1])  # independent of the batch it is in
    # no padding, no flip: the identity; no padding with flip: mirror images only
    same = augment_episodes(batch, seed=3, padding=0, flip=False)
    assert torch.equal(same.support, batch.support) and torch.equal(same.query, batch.query)
    flipped = augment_episodes(batch, seed=3, padding=0)
    for b in range(2):
        for m in range(4):
            q, f = batch.query[b, m], flipped.query[b, m]
            assert torch.equal(f, q) or torch.equal(f, q.flip(-1))


def test_augmentation_only_for_training_batches(pickled: Path, tmp_path: Path) -> None:
    batch = fake_batch()
    off = datamodule(pickled, tmp_path / "cache")
    off.trainer = SimpleNamespace(training=True)  # type: ignore[assignment]
    assert off.on_after_batch_transfer(batch, 0) is batch
    on = datamodule(pickled, tmp_path / "cache", augment=True, seed=5)
    on.trainer = SimpleNamespace(training=False)  # type: ignore[assignment]
    assert on.on_after_batch_transfer(batch, 0) is batch
    on.trainer = SimpleNamespace(training=True)  # type: ignore[assignment]
    out = on.on_after_batch_transfer(batch, 0)
    assert torch.equal(out.query, augment_episodes(batch, 5, 8, True).query)
    assert not torch.equal(out.query, batch.query)


# --------------------------------------------------------------------------------------
# The experiment configs run on the fixture
# --------------------------------------------------------------------------------------

FIXTURE_OVERRIDES = [
    "data.expected_classes={train:5,val:3,test:3}",
    f"data.images_per_class={FIXTURE_IMAGES}",
    "data.download=false",
]
# The SNAIL ResNet on 84x84 is slow on a CPU: tiny episodes keep the run short.


@pytest.mark.parametrize(
    ("experiment", "shots", "layout"),
    [("miniimagenet_5w1s", 1, "pickle"), ("miniimagenet_5w5s", 5, "folder")],
)
def test_experiment_fast_dev_run(
    experiment: str,
    shots: int,
    layout: str,
    pickled: Path,
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir = pickled if layout == "pickle" else folder
    overrides = [f"experiment={experiment}", "debug=fast_dev_run", *FIXTURE_OVERRIDES]
    cfg = compose_config("train", overrides, tmp_path, data_dir, tmp_path / "cache")
    # the paper's settings
    assert cfg.data._target_ == "metalearn.data.MiniImageNetDataModule"
    assert (cfg.data.ways, cfg.data.shots, cfg.data.query_shots) == (5, shots, 15)
    assert (cfg.data.meta_batch, cfg.model.inner_steps) == (4, 5)
    assert (cfg.model.optimizer.lr, cfg.model.lr_decay) == (1e-3, 1e-5)
    assert cfg.data.augment is False
    assert hydra.utils.instantiate(cfg.model.backbone).feature_dim == 512
    # one step of everything (augmentation on for the 5-shot run, to exercise the hook)
    extra = ["data.augment=true"] if shots == 5 else []
    cfg = compose_config(
        "train", overrides + SMALL_EPISODES + extra, tmp_path, data_dir, tmp_path / "cache"
    )
    augmented: list[int] = []

    def counting(batch: EpisodeBatch, *args: Any) -> EpisodeBatch:
        augmented.append(len(batch.episode_ids))
        return augment_episodes(batch, *args)

    monkeypatch.setattr(augment, "augment_episodes", counting)
    metrics = train(cfg)
    assert augmented == ([1] if extra else [])  # the one training batch, not val / test
    assert 0.0 <= metrics["train/acc"] <= 1.0
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["split"] == "ravi" and report["ways"] == 2
