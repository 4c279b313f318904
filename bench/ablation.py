"""Controlled short training runs, one change at a time; one JSON line per run.

Each variant is `train.py` with the shared base overrides plus its own, the same seed and
step budget, tested on the same fixed test episodes. Results are appended to
``--out`` (JSON lines: name, overrides, test accuracy ± CI, best val accuracy, final train
accuracy, inner lr, steps, wall seconds) and printed as a markdown table at the end.

    python bench/ablation.py --suite omniglot_5w1s --steps 2000
    python bench/ablation.py --suite omniglot_5w1s --only base inner_lr_1 --steps 2000
    python bench/ablation.py --suite baselines --experiment omniglot_5w5s \
        --out bench/results/baselines.jsonl
    python bench/ablation.py --suite protocols --out bench/results/protocols.jsonl
    python bench/ablation.py --suite guard --out bench/results/guard.jsonl
    python bench/ablation.py --collect support_10k=logs/repro/omniglot_5w1s_support \
        --hardware "2 CPU threads" --out bench/results/protocols.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SUITES: dict[str, dict[str, list[str]]] = {
    "omniglot_5w1s": {
        "base": [],
        "inner_lr_0.5": ["model.inner_lr=0.5"],
        "inner_lr_1": ["model.inner_lr=1.0"],
        "inner_lr_fixed": ["model.learn_inner_lr=false"],
        "softplus_lr_1": ["model.inner_lr=1.0", "model.inner_lr_param=softplus"],
        "bn_split": ["model.batch_stats=split"],
        "bn_meta_batch": ["model.batch_stats=meta_batch"],
        "bn_scale": ["model.backbone.bn_scale=true"],
        "T10": ["model.inner_steps=10"],
        "T1": ["model.inner_steps=1"],
        "outer_lr_3e-3": ["model.optimizer.lr=3e-3"],
        "meta_batch_8": ["data.meta_batch=8"],
        "meta_batch_16": ["data.meta_batch=16"],
        "no_lr_decay": ["model.lr_decay=0"],
        "train_20way": ["data.train_ways=20"],
        "l2_1e-3": ["model.l2=1e-3"],
        "paper_sampler": ["data.disjoint=false"],
        "fixed_lr_0.03": ["model.learn_inner_lr=false", "model.inner_lr=0.03"],
        "fixed_lr_0.3": ["model.learn_inner_lr=false", "model.inner_lr=0.3"],
        "fixed_lr_bn_split": ["model.learn_inner_lr=false", "model.batch_stats=split"],
        "fixed_lr_center": ["model.learn_inner_lr=false", "model.center_features=true"],
        "fixed_lr_bn_split_center": [
            "model.learn_inner_lr=false",
            "model.batch_stats=split",
            "model.center_features=true",
        ],
        "center": ["model.center_features=true"],
        "fixed_lr_center_train_20way": [
            "model.learn_inner_lr=false",
            "model.center_features=true",
            "data.train_ways=20",
        ],
    },
    # Every learner of the harness on the same data, budget and test episodes.
    "baselines": {
        # The experiment's own model with the statistics per episode these rows were recorded
        # with (omniglot_5w1s now splits them; MAML needs its split, so not in the base).
        "hyper_representation": ["algorithm=hyper_representation", "model.batch_stats=episode"],
        "protonet": ["algorithm=protonet"],
        "maml": ["algorithm=maml"],
        "anil": ["algorithm=anil"],
        "classical": ["algorithm=classical"],
        "classical_J200": ["algorithm=classical", "model.pool_episodes=200"],
    },
    # The accuracy guard of `make test` (tests/test_pipeline.py, trained_run): its spread
    # over seeds, and regressions it must catch, at its budget.
    "guard": {
        **{f"seed_{seed}": [f"seed={seed}"] for seed in range(5)},
        "regression_uncentered": ["model.center_features=false"],
        "regression_first_order": ["model.first_order=true"],
        "regression_5way_training": ["data.train_ways=null"],
    },
    # One experiment under each normalization (README, "Protocols"); split is the default of
    # omniglot_5w1s.
    "protocols": {
        "split": ["model.batch_stats=split"],
        "episode": ["model.batch_stats=episode"],
        "support": ["model.batch_stats=support"],
        "running": ["model.batch_stats=running"],
    },
}

# Per-suite defaults of the options below (an option given on the command line wins).
SUITE_DEFAULTS: dict[str, dict[str, object]] = {
    "omniglot_5w1s": {
        "experiment": "omniglot_5w1s_paper",  # the variants change the paper's settings
        "base": [],
        "steps": 2000,
        "val_every": 500,
        "val_episodes": 300,
    },
    "baselines": {
        "experiment": "omniglot_5w1s",  # also run with --experiment omniglot_5w5s
        # Training episodes of the test geometry for every learner: MAML's and ANIL's learned
        # head initialization fixes the number of ways (omniglot_5w1s trains on 20-way).
        "base": ["data.train_ways=null"],
        "steps": 1000,
        "val_every": 500,
        "val_episodes": 200,
    },
    "guard": {
        "experiment": "omniglot_5w1s",
        "base": [],
        "steps": 150,
        "val_every": 75,
        "val_episodes": 100,
    },
    "protocols": {
        "experiment": "omniglot_5w1s",
        "base": [],
        "steps": 2000,
        "val_every": 1000,
        "val_episodes": 600,
    },
}


def last_value(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1] if values else None


def run(name: str, overrides: list[str], args: argparse.Namespace, out_root: Path) -> dict:
    run_dir = out_root / name
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"experiment={args.experiment}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.val_every}",
        f"data.val_episodes={args.val_episodes}",
        f"data.test_episodes={args.test_episodes}",
        f"seed={args.seed}",
        "extras.print_config=false",
        f"hydra.run.dir={run_dir}",
        *args.base,
        *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    record: dict = {
        "name": name,
        "experiment": args.experiment,
        "overrides": overrides,
        "base": args.base,
        "steps": args.steps,
    }
    record["seconds"] = round(seconds, 1)
    if result.returncode != 0:
        record["error"] = result.stderr[-2000:]
        return record
    record.update(read_run(run_dir))
    return record


def read_run(run_dir: Path) -> dict:
    """The measured part of a record, from a finished run folder (its eval.json and CSV
    log): also for runs trained outside this script, e.g. resumed across sessions."""
    report = json.loads((run_dir / "eval.json").read_text())
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {
        "test_acc": report["accuracy"],
        "test_ci95": report["ci95"],
        "episodes": report["episodes"],
        "protocol": report.get("protocol"),
        "batch_stats": report.get("batch_stats"),
        "disjoint": report.get("disjoint"),
        "best_checkpoint": Path(report["checkpoint"]).name if report.get("checkpoint") else None,
        "val_acc": [
            [int(r["step"]), round(float(r["val/acc"]), 6)] for r in rows if r.get("val/acc")
        ],
        "val_acc_best": last_value(rows, "val/acc_best"),
        "train_acc_last": last_value(rows, "train/acc"),
        "inner_lr_last": last_value(rows, "train/inner_lr"),
        "steps_done": max((int(r["step"]) for r in rows if r.get("step")), default=0) + 1,
        "run_dir": str(run_dir),
    }


def collect(specs: list[str], hardware: str, out: Path) -> None:
    """Append one record per ``NAME=RUN_DIR`` (its overrides from .hydra/overrides.yaml)."""
    for spec in specs:
        name, _, folder = spec.partition("=")
        run_dir = Path(folder)
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = [
            line[2:].strip()
            for line in overrides_file.read_text().splitlines()
            if line.startswith("- ")
        ]
        record = {"name": name, "overrides": overrides, "hardware": hardware, **read_run(run_dir)}
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def table(records: list[dict]) -> str:
    lines = [
        "| variant | overrides | test acc (600 ep.) | best val acc | train acc (last) | inner lr | time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['name']} | {' '.join(r['overrides'])} | failed | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {' '.join(r['overrides']) or '(base)'} | "
            f"{100 * r['test_acc']:.2f} ± {100 * r['test_ci95']:.2f} | "
            f"{100 * (r['val_acc_best'] or 0):.2f} | {100 * (r['train_acc_last'] or 0):.1f} | "
            f"{r['inner_lr_last'] or 0:.3g} | {r['seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--suite", default="omniglot_5w1s", choices=sorted(SUITES))
    parser.add_argument("--experiment", help="base experiment (default: the suite's)")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument(
        "--base", nargs="*", help="overrides shared by all variants (default: the suite's)"
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--val-every", type=int)
    parser.add_argument("--val-episodes", type=int)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ablation.jsonl"))
    parser.add_argument("--runs-dir", default=str(REPO / "logs" / "ablation"))
    parser.add_argument(
        "--collect",
        nargs="*",
        metavar="NAME=RUN_DIR",
        help="append records of finished run folders (e.g. long runs resumed across "
        "sessions) instead of training",
    )
    parser.add_argument("--hardware", default="", help="with --collect: where the runs trained")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect, args.hardware, Path(args.out))
        return
    for key, value in SUITE_DEFAULTS[args.suite].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    variants = SUITES[args.suite]
    names = args.only or list(variants)
    unknown = sorted(set(names) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(variants)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    records = []
    for name in names:
        record = run(name, variants[name], args, Path(args.runs_dir) / stamp)
        records.append(record)
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    print(table(records))


if __name__ == "__main__":
    main()
