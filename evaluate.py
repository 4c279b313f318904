"""Evaluate a checkpoint on fixed test episodes: `python evaluate.py ckpt_path=PATH` (conf/eval.yaml)."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("METALEARN_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from metalearn.pipeline import evaluate
    from metalearn.utils.console import exit_on_user_error

    return float(exit_on_user_error(evaluate)(cfg)["accuracy"])


if __name__ == "__main__":
    from metalearn.config import register_configs
    from metalearn.utils.console import check_group_choices, check_output_dirs

    check_group_choices(
        ROOT / "conf",
        sys.argv[1:],
        fixed={"data": "the data set comes from the checkpoint; set single keys as data.KEY=VALUE"},
    )
    check_output_dirs(sys.argv[1:], Path(os.environ["METALEARN_ROOT"]) / "logs")
    register_configs()
    main()
