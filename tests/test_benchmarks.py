"""The benchmark experiments (conf/experiment/{tieredimagenet,cifar_fs,fc100,cub}_5w*s.yaml)
compose their settings and train, validate and test one step end to end on small copies
written in each data set's real on-disk format (the readers are tested in test_cifar.py,
test_cub.py and test_tieredimagenet.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import hydra
import pytest
from conftest import SMALL_EPISODES, compose_config
from PIL import Image
from test_cifar import archive_bytes, cifar_files, write_archive
from test_tieredimagenet import write_pickles

from metalearn.data import BenchmarkDataModule
from metalearn.data.sets.cub import cub_root, cub_split
from metalearn.data.sets.tieredimagenet import tieredimagenet_root
from metalearn.errors import ConfigError
from metalearn.pipeline import train


def write_cifar(data_dir: Path) -> list[str]:
    write_archive(data_dir, archive_bytes(cifar_files((3, 1))))
    return ["data.options={images_per_class: [3, 1]}"]


def write_tiered(data_dir: Path) -> list[str]:
    for split in ("train", "val", "test"):
        write_pickles(tieredimagenet_root(data_dir), split)
    return []


def write_cub(data_dir: Path) -> list[str]:
    """The extracted official layout, CUB_200_2011/images/<NNN.Name>/*.jpg, 2 images each."""
    images = cub_root(data_dir) / "CUB_200_2011" / "images"
    for split in ("train", "val", "test"):
        for c, name in enumerate(cub_split(split)):
            (images / name).mkdir(parents=True)
            for j in range(2):
                buffer = io.BytesIO()
                Image.new("RGB", (60 + j, 50), (3 * c % 256, 80 * j, 40)).save(buffer, "JPEG")
                (images / name / f"{name}_{j}.jpg").write_bytes(buffer.getvalue())
    return []


WRITERS = {"cifar_fs": write_cifar, "fc100": write_cifar, "tieredimagenet": write_tiered}
WRITERS["cub"] = write_cub
SPLITS = {"cifar_fs": "bertinetto2019", "fc100": "oreshkin2018", "tieredimagenet": "ren2018"}
SPLITS["cub"] = "chen2019"
SIZES = {"cifar_fs": 32, "fc100": 32, "tieredimagenet": 84, "cub": 84}


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("name", list(WRITERS))
def test_experiment_fast_dev_run(name: str, shots: int, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    extra = WRITERS[name](data_dir)
    experiment = [f"experiment={name}_5w{shots}s"]
    cfg = compose_config("train", experiment, tmp_path, data_dir, tmp_path / "cache")
    # the experiment's settings: 5-way, its shots, ResNet-12 at the benchmark's image side
    assert cfg.data._target_ == "metalearn.data.BenchmarkDataModule" and cfg.data.name == name
    assert (cfg.data.ways, cfg.data.shots, cfg.data.query_shots) == (5, shots, 15)
    assert (cfg.data.meta_batch, cfg.model.inner_steps) == (4, 5)
    assert cfg.model.backbone._target_ == "metalearn.models.ResNet12"
    assert cfg.model.backbone.image_size == cfg.data.image_size == SIZES[name]
    assert hydra.utils.instantiate(cfg.model.backbone).feature_dim == 640
    # one step of everything on the small copy
    overrides = [*experiment, "debug=fast_dev_run", *SMALL_EPISODES, *extra]
    cfg = compose_config("train", overrides, tmp_path, data_dir, tmp_path / "cache")
    metrics = train(cfg)
    assert 0.0 <= metrics["train/acc"] <= 1.0
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["ways"] == 2 and report["split"] == SPLITS[name]


def test_an_unknown_benchmark_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data.name='mini'.*cifar_fs"):
        BenchmarkDataModule(name="mini")
