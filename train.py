"""Train a model: `python train.py experiment=omniglot_5w1s` (see conf/train.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("METALEARN_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from metalearn.pipeline import train
    from metalearn.utils.console import exit_on_user_error

    metrics = exit_on_user_error(train)(cfg)
    return metrics.get("val/acc_best")  # the value a Hydra sweeper optimizes


if __name__ == "__main__":
    main()
