"""Sampling meta-batches from a memory-mapped cache larger than the process's memory.

Writes a ``data=folder``-style cache entry of random 84x84 RGB images (``--gib`` of
them, classes of ``--per-class`` images) through :func:`metalearn.data.cache.cached_class_images`
(decoding skipped: the images are generated), reads it memory-mapped, samples 5-way 5-shot
15-query meta-batches of 4 episodes from it, and prints one JSON line with the cache size,
the process's peak resident memory, and the median time per meta-batch, next to the same
sampling from a split held in RAM (a copy of its first classes). The resident memory is
split into the process's own (RssAnon) and the mapped pages of the cache file (RssFile):
the kernel maps file pages around each access in large folios (about 2 MB here), so
RssFile grows by far more than the images read; those pages are clean page cache, dropped
under memory pressure, not memory the process needs.

Usage: python bench/mapped_sampling.py [--gib 3] [--batches 50] [--folder /tmp/mapped]

Under a memory limit (Linux cgroup v1, as root), so that the page cache cannot hold the file:

    mkdir /sys/fs/cgroup/memory/metalearn && echo 750M > /sys/fs/cgroup/memory/metalearn/memory.limit_in_bytes
    sh -c 'echo $$ > /sys/fs/cgroup/memory/metalearn/cgroup.procs && exec python bench/mapped_sampling.py'
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from metalearn.data.cache import cached_class_images
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.storage import ClassImages

SHAPE = (3, 84, 84)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def resident_bytes() -> dict[str, int]:
    """This process's resident memory now (Linux): RssAnon (its own, heap and tensors)
    and RssFile (mapped file pages: the cache's pages in use, reclaimable page cache)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def median_batch_seconds(sampler: EpisodeSampler, batches: int, meta_batch: int = 4) -> float:
    times = []
    for step in range(batches):
        start = time.perf_counter()
        sampler.sample(range(step * meta_batch, (step + 1) * meta_batch))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=3.0)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--in-ram-classes", type=int, default=16, help="classes copied to RAM")
    parser.add_argument("--folder", default="/tmp/metalearn-mapped-bench")
    parser.add_argument(
        "--write", action="store_true", help="only write the cache (run in a child)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    image_bytes = int(np.prod(SHAPE))
    classes = max(int(args.gib * 2**30 / image_bytes / args.per_class), 5)
    fake = [
        (f"class{c:05d}", [Path(f"{c}/{j}") for j in range(args.per_class)]) for c in range(classes)
    ]

    def generate(path: Path) -> np.ndarray:  # deterministic "decoding" of a fake file
        c, j = (int(part) for part in path.parts)
        return np.full(SHAPE, (c * 31 + j) % 256, dtype=np.uint8)

    start = time.perf_counter()
    key = {"bench": "mapped_sampling", "classes": classes, "per_class": args.per_class}
    mapped = cached_class_images(
        args.folder, "bench", key, fake, SHAPE, generate, progress=False, workers=1
    )
    write_s = time.perf_counter() - start
    sampler = EpisodeSampler(mapped, ways=5, shots=5, query_shots=15, seed=0, split="train")
    mapped_s = median_batch_seconds(sampler, args.batches)
    peak = peak_rss_bytes()
    resident = resident_bytes()
    cache_bytes = int(mapped.images.numel())
    in_ram_classes = args.in_ram_classes
    in_ram = ClassImages(
        mapped.images[: in_ram_classes * args.per_class].clone(),
        mapped.offsets[: in_ram_classes + 1].copy(),
    )
    ram_sampler = EpisodeSampler(in_ram, ways=5, shots=5, query_shots=15, seed=0, split="train")
    ram_s = median_batch_seconds(ram_sampler, args.batches)
    print(
        json.dumps(
            {
                "cache_gib": round(cache_bytes / 2**30, 2),
                "classes": classes,
                "images": int(len(mapped.images)),
                "peak_rss_gib_while_sampling_mapped": round(peak / 2**30, 3),
                "rss_anon_gib_after_sampling": round(resident["RssAnon"] / 2**30, 3),
                "rss_file_gib_after_sampling": round(resident["RssFile"] / 2**30, 3),
                "cache_over_peak_rss": round(cache_bytes / peak, 2),
                "cache_over_rss_anon": round(cache_bytes / resident["RssAnon"], 2),
                "meta_batches": args.batches,
                "mapped_s_per_meta_batch": round(mapped_s, 5),
                "in_ram_s_per_meta_batch": round(ram_s, 5),
                "write_cache_s": round(write_s, 1),
                "geometry": "5-way 5-shot, 15 queries, meta-batch 4, 84x84 RGB",
            }
        )
    )


if __name__ == "__main__":
    main()
