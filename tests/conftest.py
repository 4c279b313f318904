"""Shared fixtures: real-data locations, an isolated wandb, composed Hydra configs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_omniglot import real_data_dir, shared_cache_dir
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from loopback import LoopbackServer
from omegaconf import DictConfig, open_dict

from metalearn.config import register_configs
from metalearn.data.sets.omniglot import OmniglotCharacters, load_omniglot

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
OMNIGLOT_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("omniglot")]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """wandb offline in a temporary folder; the repository root known to the configs."""
    wandb_dir = tmp_path_factory.mktemp("wandb")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_CACHE_DIR": str(wandb_dir / "cache"),
        "WANDB_CONFIG_DIR": str(wandb_dir / "config"),
        "WANDB_SILENT": "true",
        "METALEARN_ROOT": str(REPO),
    }
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    """A loopback HTTP server for download tests."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "*")  # never send loopback requests through a proxy
    loopback = LoopbackServer().start()
    yield loopback
    loopback.stop()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding the real Omniglot (skips the test when there is none)."""
    path = real_data_dir()
    if path is None:
        pytest.skip("real Omniglot not found (set METALEARN_DATA_DIR or provide ../shared/data)")
    return path


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_cache_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def real_omniglot(data_dir: Path, real_cache_dir: Path) -> OmniglotCharacters:
    return load_omniglot(data_dir, real_cache_dir, download=False, progress=False)


#: Episodes small enough for a one-step run on a tiny copy of a data set.
SMALL_EPISODES = [
    "data.ways=2",
    "data.shots=1",
    "data.query_shots=1",
    "data.meta_batch=1",
    "data.val_episodes=1",
    "data.test_episodes=1",
    "data.eval_meta_batch=1",
]


def compose_config(
    name: str, overrides: list[str], output_dir: Path, data_dir: Path, cache_dir: Path
) -> DictConfig:
    """Compose conf/<name>.yaml as the entry point would, with the run folder in output_dir."""
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name=name,
            overrides=[
                f"paths.data_dir={data_dir}",
                f"paths.cache_dir={cache_dir}",
                f"hydra.run.dir={output_dir}",
                "extras.print_config=false",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def train_entry_point(
    overrides: list[str],
    output_dir: Path,
    data_dir: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str]:
    """Run in-process what ``python train.py OVERRIDES`` runs (the group-choice check,
    composition, the one-line error wrapper around training); return the exit status and
    stderr. Much cheaper than a subprocess; tests that need the script itself use one."""
    from metalearn.pipeline import train
    from metalearn.utils.console import check_group_choices, exit_on_user_error

    capsys.readouterr()
    code = 0
    try:
        check_group_choices(CONF, overrides)
        cfg = compose_config("train", overrides, output_dir, data_dir, cache_dir)
        exit_on_user_error(train)(cfg)
    except SystemExit as exit:
        code = int(exit.code or 0)
    return code, capsys.readouterr().err
