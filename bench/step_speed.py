"""Cost of one bilevel meta-step against a plain forward + backward of the same backbone.

Prints one JSON line per inner-step count T: conv4 Omniglot, 5-way 1-shot, 15 queries per
class, meta-batch 16, on the CPU (or ``--device cuda``).

    bilevel_s    one meta-step: backbone forward over support ∪ query, T-step head solve
                 with the graph kept, query cross-entropy, backward (median of repeats)
    plain_s      forward + backward of the same backbone on the same images, with a
                 plain loss on the features (the physical limit of a meta-step)
    ratio        bilevel_s / plain_s
    peak_mem_mb  peak of the bytes of all tensors alive during the meta-step (tracked per
                 allocation with a dispatch mode; parameters and the input batch excluded)
    sample_s     drawing one meta-batch of 16 episodes from the training split (median)

Usage: python bench/step_speed.py [--steps 1 5 20 100] [--repeats 10] [--device cpu]
Images come from the real Omniglot when METALEARN_DATA_DIR (or --data-dir) holds it, else
from random uint8 images of the same shape (timings do not depend on pixel values).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metalearn.data.episodes import EpisodeSampler
from metalearn.lightning import HyperRepresentation

BACKBONE = {
    "_target_": "metalearn.models.ConvBackbone",
    "in_channels": 1,
    "channels": 64,
    "depth": 4,
    "stride": 2,
    "image_size": 28,
}


class PeakMemory(TorchDispatchMode):
    """Tracks live tensor storage bytes created inside the mode; ``peak`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_images(data_dir: str | None, cache_dir: str) -> torch.Tensor:
    if data_dir and (Path(data_dir) / "omniglot" / "omniglot-py").is_dir():
        from metalearn.data.datamodule import with_rotations
        from metalearn.data.sets.omniglot import load_omniglot, split_characters

        chars = load_omniglot(data_dir, cache_dir, download=False, progress=False)
        train = split_characters(chars.names, "paper")["train"]
        return with_rotations(chars.images[torch.from_numpy(train)], True)
    return torch.randint(0, 256, (4800, 20, 1, 28, 28), dtype=torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20, 100])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query-shots", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=os.environ.get("METALEARN_DATA_DIR"))
    parser.add_argument("--cache-dir", default=os.environ.get("METALEARN_CACHE_DIR", ".cache"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    sampler = EpisodeSampler(
        training_images(args.data_dir, args.cache_dir),
        args.ways,
        args.shots,
        args.query_shots,
        seed=0,
        split="train",
    )
    steps_drawn = itertools.count()

    def draw() -> None:
        first = next(steps_drawn) * args.meta_batch
        sampler.sample(range(first, first + args.meta_batch))

    sample_s = median_seconds(draw, max(args.repeats, 20), torch.device("cpu"))
    batch = sampler.sample(range(args.meta_batch))
    batch = batch._replace(
        **{k: getattr(batch, k).to(device) for k in batch._fields if k != "ways"}
    )

    for steps in args.steps:
        model = HyperRepresentation(BACKBONE, inner_steps=steps).to(device).train()

        def bilevel_step(model: HyperRepresentation = model, steps: int = steps) -> None:
            model.zero_grad(set_to_none=True)
            loss, _, _ = model.episode_forward(batch, steps)
            loss.mean().backward()

        images = torch.cat([batch.support, batch.query], dim=1)

        def plain_step(model: HyperRepresentation = model, images: torch.Tensor = images) -> None:
            model.zero_grad(set_to_none=True)
            features = model.backbone(images.float().div_(255))
            features.square().mean().backward()

        bilevel_s = median_seconds(bilevel_step, args.repeats, device)
        plain_s = median_seconds(plain_step, args.repeats, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            bilevel_step()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            tracker = PeakMemory()
            with tracker:
                bilevel_step()
            peak = tracker.peak
        print(
            json.dumps(
                {
                    "inner_steps": steps,
                    "bilevel_s": round(bilevel_s, 5),
                    "plain_s": round(plain_s, 5),
                    "ratio": round(bilevel_s / plain_s, 4),
                    "peak_mem_mb": round(peak / 2**20, 2),
                    "sample_s": round(sample_s, 6),
                    "sample_share": round(sample_s / bilevel_s, 4),
                    "meta_batch": args.meta_batch,
                    "ways": args.ways,
                    "shots": args.shots,
                    "query_shots": args.query_shots,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
