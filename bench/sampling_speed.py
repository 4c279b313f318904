"""Meta-batch sampling time as a share of a meta-step (target: <= 3% on the CPU).

Prints one JSON line per setting:

    omniglot_5w1s       real Omniglot training split (or random images of the same shape),
                        conv4 Omniglot backbone, 5-way 1-shot, 15 queries, meta-batch 4
    miniimagenet_5w5s   84x84 RGB fixture (random uint8, 64 classes x 100 images),
                        conv4 miniImageNet backbone, 5-way 5-shot, 15 queries, meta-batch 4

    sample_s    drawing one meta-batch (episode picks + gather), median
    step_s      one training step: forward, inner solve, backward, Adam step, median
    share       sample_s / step_s

With ``--device cuda`` the images live on the GPU and meta-batches are gathered there (the
DataModule's device sampling); otherwise everything is on the CPU. The process keeps the
host memory it frees, as train.py does (extras.keep_host_memory).

Usage: python bench/sampling_speed.py [--device cpu] [--repeats 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
from step_speed import side_by_side, training_images

from metalearn.data.episodes import EpisodeBatch, EpisodeSampler
from metalearn.lightning import HyperRepresentation
from metalearn.utils.host_memory import keep_freed_host_memory

SETTINGS = {
    "omniglot_5w1s": {
        "ways": 5,
        "shots": 1,
        "backbone": {
            "_target_": "metalearn.models.ConvBackbone",
            "in_channels": 1,
            "channels": 64,
            "stride": 2,
            "image_size": 28,
        },
    },
    "miniimagenet_5w5s": {
        "ways": 5,
        "shots": 5,
        "backbone": {
            "_target_": "metalearn.models.ConvBackbone",
            "in_channels": 3,
            "channels": 32,
            "stride": 1,
            "pool": True,
            "image_size": 84,
        },
    },
}


def images_for(name: str, args: argparse.Namespace) -> torch.Tensor:
    if name == "omniglot_5w1s":
        return training_images(args.data_dir, args.cache_dir)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (64, 100, 3, 84, 84), dtype=torch.uint8, generator=generator)


def measure(
    name: str, setting: dict, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """(median seconds to draw a meta-batch, median seconds of a training step)."""
    sampler = EpisodeSampler(
        images_for(name, args).to(device), setting["ways"], setting["shots"], 15, 0, "train"
    )
    model = HyperRepresentation(setting["backbone"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    drawn = itertools.count()

    def draw() -> EpisodeBatch:
        first = next(drawn) * args.meta_batch
        return sampler.sample(range(first, first + args.meta_batch))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = model.episode_forward(draw(), model.inner_steps)
        loss.mean().backward()
        optimizer.step()

    draw_s = side_by_side({"draw": draw}, max(args.repeats, 30), device)["draw"]
    return draw_s, side_by_side({"step": step}, args.repeats, device)["step"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--data-dir", default=os.environ.get("METALEARN_DATA_DIR"))
    parser.add_argument("--cache-dir", default=os.environ.get("METALEARN_CACHE_DIR", ".cache"))
    args = parser.parse_args()
    device = torch.device(args.device)
    kept = keep_freed_host_memory()  # as train.py does (extras.keep_host_memory)
    torch.manual_seed(0)
    for name, setting in SETTINGS.items():
        sample_s, step_s = measure(name, setting, args, device)
        print(
            json.dumps(
                {
                    "setting": name,
                    "sample_s": round(sample_s, 6),
                    "step_s": round(step_s, 5),
                    "share": round(sample_s / step_s, 4),
                    "meta_batch": args.meta_batch,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "keep_host_memory": kept,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
