"""Evaluate a checkpoint on fixed test episodes: `python evaluate.py ckpt_path=PATH` (conf/eval.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("METALEARN_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from metalearn.pipeline import evaluate
    from metalearn.utils.console import exit_on_user_error

    return float(exit_on_user_error(evaluate)(cfg)["accuracy"])


if __name__ == "__main__":
    main()
