"""What ``extras.keep_host_memory`` does to a training step on the CPU.

PyTorch's CPU tensors come from the C library's malloc. glibc maps blocks of 32 MiB and
more (and, until its dynamic threshold has risen, of 128 KiB and more) afresh at every
allocation and unmaps them at free, and gives free memory at the top of its heap back to
the system: a step that frees and re-allocates its activations then faults them in again,
page by page. train.py and evaluate.py keep that memory in the process
(metalearn.utils.host_memory) unless extras.keep_host_memory=false.

Each case runs in a fresh interpreter, once with glibc's defaults and once with the memory
kept, round robin over --rounds (default 3); one JSON line per case gives the median
milliseconds of an eager meta-step of the hyper-representation (forward of the backbone
over support and query, T = 5 head steps, query loss, backward; as train.py runs it) and
the minor page faults per step, under both settings:

    default_ms, kept_ms           median step time over the rounds
    default_faults, kept_faults   minor page faults per step (median over the rounds)
    speedup                       default_ms / kept_ms
    *_per_round                   every round's figures

Cases: conv4 on Omniglot (28 x 28, 1 channel, 64 filters), 5-way 1-shot at train.py's
meta-batch 4 one episode per backbone call (model.episode_chunk=auto on the CPU), and at
meta-batch 16 in one call (episode_chunk=null, as under batch_stats=meta_batch); conv4
on miniImageNet (84 x 84 RGB, 32 filters), 5-way 1-shot and 5-shot at meta-batch 4, one
episode per call. 15 queries per class; random images (timings do not depend on pixels).

With --train it also runs train.py (steady-state episodes/s, the Lightning loop, sampling
and logging included, as bench/step_speed.py --train-steps measures it) with
extras.keep_host_memory=false and =true, round robin: experiment=omniglot_5w1s_quick on
the real Omniglot (METALEARN_DATA_DIR or --data-dir; 300 steps), as configured and with
the whole meta-batch in one backbone call (model.episode_chunk=null), and
experiment=miniimagenet_5w1s with the conv4 backbone (model/backbone=conv4_miniimagenet)
on a generated copy of miniImageNet in its pickle format, 16 training classes of 20 random
images (40 steps).

Usage: python bench/host_memory.py [--rounds 3] [--cases omniglot_5w1s_b4 ...] [--train]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sampling_speed import SETTINGS  # bench/ is this script's folder
from step_speed import train_rate

from metalearn.data.episodes import EpisodeSampler
from metalearn.data.sets.miniimagenet import miniimagenet_root
from metalearn.lightning import HyperRepresentation
from metalearn.utils.host_memory import keep_freed_host_memory

REPO = Path(__file__).resolve().parents[1]
#: the backbones of bench/sampling_speed.py: conv4 on Omniglot and on 84 x 84 RGB
OMNIGLOT = SETTINGS["omniglot_5w1s"]["backbone"]
MINIIMAGENET = SETTINGS["miniimagenet_5w5s"]["backbone"]
#: name -> (backbone, ways, shots, meta-batch, model.episode_chunk, timed steps)
CASES: dict[str, tuple[dict[str, Any], int, int, int, str | None, int]] = {
    "omniglot_5w1s_b4": (OMNIGLOT, 5, 1, 4, "auto", 40),
    "omniglot_5w1s_b16_one_call": (OMNIGLOT, 5, 1, 16, None, 10),
    "miniimagenet_5w1s_b4": (MINIIMAGENET, 5, 1, 4, "auto", 5),
    "miniimagenet_5w5s_b4": (MINIIMAGENET, 5, 5, 4, "auto", 5),
}
QUERY_SHOTS = 15
INNER_STEPS = 5
#: classes per split of the generated miniImageNet copy (--train), 20 images each
MINIIMAGENET_CLASSES = {"train": 16, "val": 5, "test": 5}


def child(case: str, keep: bool) -> dict[str, float]:
    """One case in this process: median step seconds and minor page faults per step."""
    if keep and not keep_freed_host_memory():
        sys.exit("this C library is not glibc: extras.keep_host_memory does nothing here")
    backbone, ways, shots, meta_batch, chunk, steps = CASES[case]
    torch.manual_seed(0)
    shape = (ways * 4, shots + QUERY_SHOTS, backbone["in_channels"], *[backbone["image_size"]] * 2)
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    batch = EpisodeSampler(images, ways, shots, QUERY_SHOTS, 0, "train").sample(range(meta_batch))
    model = HyperRepresentation(backbone, inner_steps=INNER_STEPS, episode_chunk=chunk).train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss, _, _ = model._episode_forward(batch, INNER_STEPS, False)
        loss.mean().backward()

    for _ in range(2):
        step()
    seconds = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"s": statistics.median(seconds), "faults": faults / steps}


def run_child(case: str, keep: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", case, *(["--keep"] if keep else [])]
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)
    if done.returncode:
        sys.exit(f"{case} failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def generated_miniimagenet(folder: Path) -> Path:
    """A miniImageNet copy in the pickle format (``mini-imagenet-cache-<split>.pkl``) of
    random images: 16 / 5 / 5 classes of 20 images. Returns the data folder."""
    root = miniimagenet_root(folder)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, classes in MINIIMAGENET_CLASSES.items():
        images = rng.integers(0, 256, (classes * 20, 84, 84, 3), dtype=np.uint8)
        rows = {f"n{split[0]}{c:07d}": list(range(c * 20, (c + 1) * 20)) for c in range(classes)}
        payload = {"image_data": images, "class_dict": rows}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(payload, protocol=4))
    return folder


def train_rates(args: argparse.Namespace) -> list[dict[str, Any]]:
    """train.py's steady-state episodes/s with extras.keep_host_memory false and true."""
    folder = tempfile.TemporaryDirectory()
    counts = ",".join(f"{split}:{n}" for split, n in MINIIMAGENET_CLASSES.items())
    # (experiment, steps, data folder, overrides)
    runs: list[tuple[str, int, str | None, list[str]]] = [
        ("omniglot_5w1s_quick", 300, args.data_dir, []),
        ("omniglot_5w1s_quick", 300, args.data_dir, ["model.episode_chunk=null"]),
        (
            "miniimagenet_5w1s",
            40,
            str(generated_miniimagenet(Path(folder.name))),
            [
                "model/backbone=conv4_miniimagenet",
                "data.download=false",
                f"data.expected_classes={{{counts}}}",
                "data.images_per_class=20",
                f"paths.cache_dir={folder.name}/cache",
            ],
        ),
    ]
    rows = []
    for experiment, steps, data_dir, overrides in runs:
        if data_dir is None:
            continue
        rates: dict[str, list[float]] = {"false": [], "true": []}
        for _ in range(args.rounds):
            for keep in rates:
                settings = argparse.Namespace(
                    train_steps=steps,
                    train_compile=False,
                    data_dir=data_dir,
                    keep_host_memory=keep == "true",  # extras.keep_host_memory
                )
                rates[keep].append(train_rate(settings, torch.device("cpu"), overrides, experiment))
        rows.append(
            {
                "case": f"train.py experiment={experiment} {' '.join(overrides[:1])}".strip(),
                "steps": steps,
                "default_episodes_per_s": round(statistics.median(rates["false"]), 2),
                "kept_episodes_per_s": round(statistics.median(rates["true"]), 2),
                "speedup": round(
                    statistics.median(
                        k / d for d, k in zip(rates["false"], rates["true"], strict=True)
                    ),
                    3,
                ),
                "default_per_round": [round(r, 2) for r in rates["false"]],
                "kept_per_round": [round(r, 2) for r in rates["true"]],
                "rounds": args.rounds,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    folder.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--train", action="store_true", help="also time train.py (see above)")
    parser.add_argument("--only-train", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("METALEARN_DATA_DIR"))
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.keep)))
        return
    for case in [] if args.only_train else args.cases:
        rounds = [(run_child(case, False), run_child(case, True)) for _ in range(args.rounds)]
        default_ms = [1e3 * d["s"] for d, _ in rounds]
        kept_ms = [1e3 * k["s"] for _, k in rounds]
        backbone, ways, shots, meta_batch, chunk, _ = CASES[case]
        row = {
            "case": case,
            "ways": ways,
            "shots": shots,
            "meta_batch": meta_batch,
            "episode_chunk": chunk,
            "inner_steps": INNER_STEPS,
            "image_size": backbone["image_size"],
            "default_ms": round(statistics.median(default_ms), 1),
            "kept_ms": round(statistics.median(kept_ms), 1),
            "speedup": round(
                statistics.median(d / k for d, k in zip(default_ms, kept_ms, strict=True)), 3
            ),
            "default_faults": round(statistics.median(d["faults"] for d, _ in rounds)),
            "kept_faults": round(statistics.median(k["faults"] for _, k in rounds)),
            "default_ms_per_round": [round(v, 1) for v in default_ms],
            "kept_ms_per_round": [round(v, 1) for v in kept_ms],
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        print(json.dumps(row), flush=True)
    if args.train or args.only_train:
        for row in train_rates(args):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
