"""Train a model: `python train.py experiment=omniglot_5w1s` (see conf/train.yaml)."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("METALEARN_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from metalearn.pipeline import train
    from metalearn.utils.console import exit_on_user_error

    metrics = exit_on_user_error(train)(cfg)
    return metrics.get("val/acc_best")  # the value a Hydra sweeper optimizes


if __name__ == "__main__":
    from metalearn.config import register_configs
    from metalearn.utils.console import check_group_choices, check_output_dirs

    check_group_choices(ROOT / "conf", sys.argv[1:])
    check_output_dirs(sys.argv[1:], Path(os.environ["METALEARN_ROOT"]) / "logs")
    register_configs()
    main()
