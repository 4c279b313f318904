"""data=folder: your own images in class folders, a memory-mapped cache, ragged classes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_entry_point
from fixtures_omniglot import fixture_expected_characters, make_omniglot_fixture
from PIL import Image
from test_operations import cli

from metalearn.data import FolderDataModule, OmniglotDataModule
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.sets.folder import find_classes
from metalearn.data.sets.omniglot import omniglot_root, split_characters
from metalearn.data.storage import ClassImages
from metalearn.errors import ConfigError, DataError

SPLIT_CLASSES = {"train": ["a", "b", "c", "d"], "val": ["e", "f", "g"], "test": ["h", "i", "j"]}


def write_image(path: Path, seed: int, size: int = 12, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def make_folder(root: Path, layout: str, per_class: dict[str, int] | None = None) -> dict:
    """Classes of SPLIT_CLASSES with 6 images each (or ``per_class``), in ``layout``:
    ``split_file``, ``subfolders`` or ``csv``. Returns the settings that read it."""
    for split, names in SPLIT_CLASSES.items():
        for name in names:
            for j in range((per_class or {}).get(name, 6)):
                seed = 1000 * (ord(name) - ord("a")) + j
                if layout == "subfolders":
                    write_image(root / split / name / f"{j:03d}.png", seed)
                elif layout == "csv":
                    write_image(root / "images" / f"{name}{j:03d}.png", seed)
                else:
                    write_image(root / name / f"{j:03d}.png", seed)
    if layout == "split_file":
        (root / "split.json").write_text(json.dumps(SPLIT_CLASSES))
        return {"split_file": root / "split.json"}
    if layout == "csv":
        for split, names in SPLIT_CLASSES.items():
            rows = ["filename,label"] + [
                f"images/{name}{j:03d}.png,{name}"
                for name in names
                for j in range((per_class or {}).get(name, 6))
            ]
            (root / "csv").mkdir(exist_ok=True)
            (root / "csv" / f"{split}.csv").write_text("\n".join(rows) + "\n")
        return {"csv_dir": root / "csv"}
    return {}


def module(root: Path, cache: Path, **kwargs) -> FolderDataModule:
    settings = {"ways": 2, "shots": 1, "query_shots": 2, "image_size": 8, "progress": False}
    return FolderDataModule(root=root, cache_dir=cache, **{**settings, **kwargs})


# -- the sampler on classes of different sizes ---------------------------------------------


def test_class_images_sample_the_episodes_of_a_class_tensor():
    images = torch.randint(0, 256, (7, 5, 1, 4, 4), dtype=torch.uint8)
    for disjoint in (True, False):
        a = EpisodeSampler(images, 3, 2, 2, seed=4, split="val", disjoint=disjoint)
        b = EpisodeSampler(ClassImages.from_tensor(images), 3, 2, 2, 4, "val", disjoint)
        for i in range(10):
            assert all(
                np.array_equal(x, y)
                for x, y in zip(a.episode_indices(i), b.episode_indices(i), strict=True)
            )
        first, second = a.sample([0, 3]), b.sample([0, 3])
        assert torch.equal(first.support, second.support) and torch.equal(first.query, second.query)
        # The images are those of the picked classes at the picked positions.
        classes, support, _ = a.episode_indices(3)
        assert torch.equal(first.support[1, 0], images[classes[0], support[0, 0]])


def test_ragged_classes_are_sampled_within_each_class():
    counts = [3, 9, 4, 6]
    images = torch.cat(
        [torch.full((n, 1, 2, 2), c, dtype=torch.uint8) for c, n in enumerate(counts)]
    )
    offsets = np.concatenate([[0], np.cumsum(counts)])
    store = ClassImages(images, offsets, ["p", "q", "r", "s"])
    sampler = EpisodeSampler(store, ways=2, shots=1, query_shots=2, seed=0, split="train")
    seen = set()
    for i in range(50):
        classes, support, query = sampler.episode_indices(i)
        for w, c in enumerate(classes):
            positions = list(support[w]) + list(query[w])
            assert len(set(positions)) == 3 and max(positions) < counts[c]
            seen.update((int(c), int(p)) for p in positions)
        batch = sampler.sample([i])
        labels_of = batch.support[0, :, 0, 0, 0].tolist() + batch.query[0, :, 0, 0, 0].tolist()
        assert sorted(set(labels_of)) == sorted(int(c) for c in classes)
    assert (1, 8) in seen  # the largest class's last image is reachable
    with pytest.raises(
        ConfigError,
        match=r"the 3 images of class 'p' of the 'train' split.*data.min_images_per_class",
    ):
        EpisodeSampler(store, ways=2, shots=1, query_shots=3, seed=0, split="train")


# -- reading folders --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["split_file", "subfolders", "csv"])
def test_every_layout_gives_the_same_classes_and_images(layout, tmp_path):
    reference = make_folder(tmp_path / "ref", "split_file")
    settings = make_folder(tmp_path / layout, layout)
    expected = module(tmp_path / "ref", tmp_path / "cache", **reference).load_splits()
    got = module(tmp_path / layout, tmp_path / "cache", **settings).load_splits()
    for split in SPLIT_CLASSES:
        assert list(got[split].names) == SPLIT_CLASSES[split]
        assert torch.equal(got[split].images, expected[split].images)
        assert got[split].images.shape == (6 * len(SPLIT_CLASSES[split]), 3, 8, 8)


def test_the_cache_is_read_memory_mapped_and_follows_the_files(tmp_path, monkeypatch):
    settings = make_folder(tmp_path / "data", "split_file")
    first = module(tmp_path / "data", tmp_path / "cache", **settings).load_splits()
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 6 and not [e for e in entries if e.startswith(".")]
    import metalearn.data.datamodule as datamodule

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(datamodule, "decode_image", no_decoding)
    again = module(tmp_path / "data", tmp_path / "cache", **settings).load_splits()
    assert torch.equal(again["train"].images, first["train"].images)
    mapped = Path("/proc/self/maps").read_text()  # the cache file is mapped, not read
    assert any(str(tmp_path / "cache" / n) in mapped for n in entries if n.endswith(".npy"))
    monkeypatch.undo()
    write_image(tmp_path / "data" / "a" / "000.png", seed=99)
    changed = module(tmp_path / "data", tmp_path / "cache", **settings).load_splits()
    assert not torch.equal(changed["train"].images[0], first["train"].images[0])
    assert torch.equal(changed["train"].images[1:], first["train"].images[1:])


def test_a_grayscale_copy(tmp_path):
    settings = make_folder(tmp_path / "data", "split_file")
    splits = module(tmp_path / "data", tmp_path / "cache", channels=1, **settings).load_splits()
    rgb = np.array(
        Image.open(tmp_path / "data" / "a" / "000.png")
        .convert("L")
        .resize((8, 8), Image.Resampling.BILINEAR)
    )
    assert torch.equal(splits["train"].images[0, 0], torch.from_numpy(rgb))


def test_folder_errors_name_the_class_or_file(tmp_path, caplog):
    settings = make_folder(tmp_path / "data", "split_file")
    root = tmp_path / "data"
    (root / "empty").mkdir()
    spec = dict(SPLIT_CLASSES, test=["h", "i", "empty"])
    (root / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"class folder .*empty holds no images"):
        find_classes(root, root / "bad.json")
    (root / "bad.json").write_text(json.dumps(dict(SPLIT_CLASSES, test=["h", "nope"])))
    with pytest.raises(DataError, match=r"names the class 'nope'"):
        find_classes(root, root / "bad.json")
    (root / "bad.json").write_text(json.dumps(dict(SPLIT_CLASSES, test=["h", "a"])))
    with pytest.raises(DataError, match=r"class 'a' is in both the train and the test split"):
        find_classes(root, root / "bad.json")
    with pytest.raises(ConfigError, match=r"has no train/, val/, test/ folders: give the split"):
        find_classes(root)
    (root / "b" / "005.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read the image .*b/005.png"):
        module(root, tmp_path / "cache", **settings).load_splits()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_small_classes_are_an_error_or_dropped(tmp_path, caplog):
    settings = make_folder(tmp_path / "data", "split_file", per_class={"c": 2})
    data = module(tmp_path / "data", tmp_path / "cache", **settings)
    with pytest.raises(ConfigError, match=r"the 2 images of class 'c' of the 'train' split"):
        data.setup("fit")
    kept = module(tmp_path / "data", tmp_path / "cache2", min_images_per_class=3, **settings)
    with caplog.at_level(logging.WARNING):
        kept.setup("fit")
    assert "dropping 1 train classes (c)" in caplog.text
    assert kept.samplers["train"].num_classes == 3


def test_train_and_evaluate_on_a_folder_with_only_its_root_and_split_set(tmp_path):
    """`train.py data=folder data.root=... data.split_file=...` and `evaluate.py` as a user
    runs them (the geometry and the images' size and channels are the defaults)."""
    root = tmp_path / "images"
    names = {split: [f"{split}{c}" for c in range(5)] for split in SPLIT_CLASSES}
    for split, classes in names.items():
        for c, name in enumerate(classes):
            for j in range(16):
                write_image(root / name / f"{j}.jpg", 100 * c + j + 7 * len(split), size=20)
    (root / "split.json").write_text(json.dumps(names))
    budget = [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_episodes=2",
        "data.test_episodes=3",
        "logger=none",
    ]
    run = tmp_path / "run"
    args = ["data=folder", f"data.root={root}", f"data.split_file={root / 'split.json'}"]
    result = cli("train.py", [*args, *budget, f"hydra.run.dir={run}"], tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "eval.json").read_text())
    assert (report["ways"], report["shots"], report["episodes"]) == (5, 1, 3)
    evaluated = cli(
        "evaluate.py",
        [f"ckpt_path={report['checkpoint']}", "episodes=3", f"hydra.run.dir={tmp_path / 'e'}"],
        tmp_path,
        tmp_path / "cache",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["accuracy"] == pytest.approx(
        report["accuracy"], abs=1e-6
    )


def test_a_folder_without_its_root_is_one_line(tmp_path, capsys):
    code, stderr = train_entry_point(["data=folder"], tmp_path, tmp_path, tmp_path, capsys)
    (line,) = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert code == 2 and "data.root has no value" in line and "Traceback" not in stderr


def omniglot_as_folder(
    root: Path, names, out: Path, **geometry: int
) -> tuple[FolderDataModule, dict[str, np.ndarray]]:
    """Omniglot's class folders under ``root`` as data=folder with Omniglot's preprocessing
    (grayscale, inverted, box filter to 28 px) and its paper split as a split file, set up
    for training; also the split's character indices."""
    index = split_characters(names, "paper")
    joined = ["/".join(name) for name in names]
    split_file = out / "split.json"
    split_file.write_text(json.dumps({s: [joined[i] for i in index[s]] for s in SPLIT_CLASSES}))
    folder = FolderDataModule(
        root=root,
        split_file=split_file,
        image_size=28,
        channels=1,
        invert=True,
        resample="box",
        cache_dir=out / "cache",
        progress=False,
        **geometry,
    )
    folder.setup("fit")
    return folder, index


def test_omniglot_read_as_a_folder_gives_its_cached_images_and_its_episodes(tmp_path):
    """The official Omniglot layout is class folders: read through data=folder with
    Omniglot's preprocessing (grayscale, inverted, box filter to 28 px) and its split as a
    split file, the images are bit-identical to data=omniglot's cache and the episodes of a
    seed are the same."""
    shape = {"alphabets_per_collection": (4, 3), "characters_per_alphabet": 8}
    data_dir = make_omniglot_fixture(tmp_path / "data", as_zip=False, **shape)
    geometry = {"ways": 2, "shots": 1, "query_shots": 2, "seed": 5, "eval_seed": 2}
    omniglot = OmniglotDataModule(
        data_dir=data_dir,
        cache_dir=tmp_path / "cache",
        rotations=False,
        download=False,
        expected_characters=fixture_expected_characters(**shape),
        **geometry,
    )
    omniglot.setup("fit")
    assert omniglot.characters is not None
    folder, _ = omniglot_as_folder(
        omniglot_root(data_dir), omniglot.characters.names, tmp_path, **geometry
    )
    for split in SPLIT_CLASSES:
        expected = omniglot.samplers[split].images
        got = folder.samplers[split].images
        assert torch.equal(got.images, expected.reshape(-1, *expected.shape[2:]))
        a = omniglot.samplers[split].sample(range(6))
        b = folder.samplers[split].sample(range(6))
        assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query)


@pytest.mark.slow
def test_real_omniglot_exported_as_png_folders_is_read_bit_identically(
    real_omniglot, data_dir, tmp_path
):
    """The official zips extracted into class folders of PNGs and read through data=folder
    (grayscale, inverted, box filter to 28 px): every image of all 1,623 characters equals
    data=omniglot's cache, and the paper split samples the same episodes."""
    import zipfile

    for collection in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(omniglot_root(data_dir) / f"{collection}.zip") as archive:
            archive.extractall(tmp_path / "png")
    folder, index = omniglot_as_folder(tmp_path / "png", real_omniglot.names, tmp_path)
    for split in SPLIT_CLASSES:
        expected = real_omniglot.images[torch.from_numpy(index[split])]
        got = folder.samplers[split].images
        assert torch.equal(got.images[:, 0], expected.reshape(-1, 28, 28))
        reference = EpisodeSampler(expected.unsqueeze(2), 5, 1, 15, seed=0, split=split)
        a, b = reference.sample(range(20)), folder.samplers[split].sample(range(20))
        assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query)
