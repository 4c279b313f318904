"""Cost of a bilevel meta-step: eager and compiled, against a plain forward + backward and
against learn2learn's recipes on the same backbone and images.

Prints one JSON line per (geometry, meta-batch, T): conv4 Omniglot, 15 queries per class,
geometries 5w1s, 20w1s and 5w5s, meta-batch 4 and 16, T in {1, 5, 20, 100} by default.
All timings of one line are measured side by side (round robin over the repeats, median
of each), so their ratios do not depend on how busy the machine was.

    eager_s, compiled_s   one meta-step of the hyper-representation (the paper's settings):
                          backbone over support and query, T-step head solve with its
                          graph, query cross-entropy, backward; compiled: the step as
                          model.compile=true compiles it (compile_s: its first call); the
                          backbone embeds the episodes as model.episode_chunk=auto does
                          (one episode per call on the CPU, all at once on a GPU)
    eager_one_call_s      the eager meta-step with model.episode_chunk=null (the whole
                          meta-batch in one backbone call)
    eager_channels_last_s the eager meta-step with model.backbone.channels_last=true
    plain_s, plain_one_call_s, plain_compiled_s
                          forward + backward of the same backbone on the same images with a
                          plain loss on the features (the cost of the representation alone):
                          episode by episode on the CPU as eager_s (on a GPU, one call),
                          in one call, and the first compiled
    ratio, compiled_ratio eager_s / plain_s and compiled_s / plain_s, where plain_s is the
                          faster of plain_s and plain_one_call_s
    peak_mem_mb           peak bytes of the tensors alive during the eager meta-step
                          (parameters and input excluded; on CUDA the allocator's peak)
    draw_s, gather_s      host-side drawing of a meta-batch's indices (done ahead, on a
                          background thread, while the previous step trains) and the
                          gather of its images (on the critical path)
    sampler_share         gather_s / min(eager_s, compiled_s): sampling's part of a step
    episodes_per_s        meta-batch / step time, eager, compiled and channels-last
    l2l_anil_s, l2l_maml_s
                          with the `l2l` extra installed: learn2learn 0.2.0's recipes, one
                          task at a time, the same backbone, images and T, with the outer
                          Adam step: ANIL (l2l.algorithms.MAML around the linear head on
                          the backbone's features) and MAML on the whole network (second
                          order; only for T <= --maml-max-steps, it is T x slower per task)
    vs_l2l_anil, vs_l2l_maml
                          the peer's step time / the fastest of ours (how many times
                          faster); the peers run the default (contiguous) backbone

The process keeps the host memory it frees (train.py's extras.keep_host_memory, applied to
every measurement here, the peers' included; --no-keep-host-memory: glibc's defaults), and
every line records which (keep_host_memory).

With --train-steps N it also runs `train.py experiment=omniglot_5w1s_quick` for N steps, as
configured and with model.backbone.channels_last=true (--train-bf16: also with
trainer.precision=bf16-mixed, with and without channels-last; --train-compile: all with
model.compile=true), and prints the steady-state training episodes/s of each (the
Lightning loop, logging and sampling included; the first quarter of the steps dropped)
next to learn2learn's ANIL recipe at that geometry, as learn2learn writes it
(vs_l2l_anil*) and given the same precision and layout (vs_same_l2l_anil*). Each setting
runs --train-repeats times (default 3), round robin; the median is printed. The peer is
measured twice: its training loop fed our meta-batches, preloaded (l2l_anil_*: the peer's
compute alone), and its recipe end to end (l2l_anil_recipe_episodes_per_s: learn2learn's
own Omniglot task sets, l2l.vision.benchmarks.get_tasksets("omniglot"), sampled as its
examples do, task by task; the same Omniglot images, extracted from the zips).

Usage: python bench/step_speed.py [--steps 1 5 20 100] [--geometries 5w1s 20w1s 5w5s]
           [--meta-batches 4 16] [--repeats 5] [--device cpu] [--no-compile]
           [--train-steps 300] [--train-bf16] [--train-compile]
           [--train-repeats 3] [--no-keep-host-memory]
Images come from the real Omniglot when METALEARN_DATA_DIR (or --data-dir) holds it, else
from random uint8 images of the same shape (timings do not depend on pixel values).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from metalearn.data.episodes import EpisodeBatch, EpisodeSampler
from metalearn.lightning import HyperRepresentation
from metalearn.models.normalization import episodes_per_call
from metalearn.utils.host_memory import keep_freed_host_memory

REPO = Path(__file__).resolve().parents[1]
BACKBONE = {
    "_target_": "metalearn.models.ConvBackbone",
    "in_channels": 1,
    "channels": 64,
    "depth": 4,
    "stride": 2,
    "image_size": 28,
}
GEOMETRIES = {"5w1s": (5, 1), "20w1s": (20, 1), "5w5s": (5, 5)}
QUERY_SHOTS = 15


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each function, measured in turn (round robin) after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def training_images(data_dir: str | None, cache_dir: str) -> torch.Tensor:
    if data_dir and (Path(data_dir) / "omniglot" / "omniglot-py").is_dir():
        from metalearn.data.datamodule import with_rotations
        from metalearn.data.sets.omniglot import load_omniglot, split_characters

        chars = load_omniglot(data_dir, cache_dir, download=False, progress=False)
        train = split_characters(chars.names, "paper")["train"]
        return with_rotations(chars.images[torch.from_numpy(train)], True)
    return torch.randint(0, 256, (4800, 20, 1, 28, 28), dtype=torch.uint8)


def to_device(batch: EpisodeBatch, device: torch.device) -> EpisodeBatch:
    return batch._replace(**{k: getattr(batch, k).to(device) for k in batch._fields if k != "ways"})


def peak_bytes(step: Callable[[], Any], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    tracker = PeakMemory()
    with tracker:
        step()
    return tracker.peak


# -- learn2learn's recipes ---------------------------------------------------------------
def l2l_recipes(
    batch: EpisodeBatch,
    steps: int,
    device: torch.device,
    maml: bool,
    bf16: bool = False,
    channels_last: bool = False,
) -> dict[str, Callable[[], None]]:
    """learn2learn's ANIL and MAML training steps (one task at a time, as its examples).

    ``bf16`` and ``channels_last`` give ANIL what ``trainer.precision=bf16-mixed`` and
    ``model.backbone.channels_last=true`` give ours: the backbone under bfloat16 autocast,
    the head and its adaptation in float32; a channels-last backbone.
    """
    import learn2learn as l2l  # the `l2l` extra

    from metalearn.models import ConvBackbone

    ways = batch.ways
    kwargs = {k: v for k, v in BACKBONE.items() if k != "_target_"}

    def anil_recipe() -> Callable[[], None]:
        features = ConvBackbone(**kwargs, channels_last=channels_last).to(device)
        head = l2l.algorithms.MAML(nn.Linear(features.feature_dim, ways), lr=0.1).to(device)
        optimizer = torch.optim.Adam([*features.parameters(), *head.parameters()], 1e-3)

        def step() -> None:
            optimizer.zero_grad()
            for task in range(len(batch.support)):
                images = torch.cat([batch.support[task], batch.query[task]]).float() / 255
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    embedded = features(images).float()
                support, query = (
                    embedded[: batch.support.shape[1]],
                    embedded[batch.support.shape[1] :],
                )
                learner = head.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(support), batch.support_labels[task]))
                loss = F.cross_entropy(learner(query), batch.query_labels[task])
                (loss / len(batch.support)).backward()
            optimizer.step()

        return step

    def maml_recipe() -> Callable[[], None]:
        backbone = ConvBackbone(**kwargs)
        network = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, ways)).to(device)
        model = l2l.algorithms.MAML(network, lr=0.1)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)

        def step() -> None:
            optimizer.zero_grad()
            for task in range(len(batch.support)):
                learner = model.clone()
                support = batch.support[task].float() / 255
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(support), batch.support_labels[task]))
                query = batch.query[task].float() / 255
                loss = F.cross_entropy(learner(query), batch.query_labels[task])
                (loss / len(batch.support)).backward()
            optimizer.step()

        return step

    recipes = {"l2l_anil_s": anil_recipe()}
    if maml:
        recipes["l2l_maml_s"] = maml_recipe()
    return recipes


def l2l_anil_recipe(
    data_dir: str, folder: str, device: torch.device, steps: int = 5, meta_batch: int = 4
) -> Callable[[], None]:
    """learn2learn's ANIL recipe end to end, as its examples train (examples/vision/
    anil_fc100.py, with the Omniglot task sets of l2l.vision.benchmarks): every task drawn by
    ``tasksets.train.sample()`` (its transforms load, resize and rotate the images of the
    task), features of the task, a cloned head adapted ``steps`` times, the query loss's
    backward, one Adam step per ``meta_batch`` tasks. 5-way tasks of 16 images per class:
    the first of each class is the support set (1 shot), the other 15 the queries."""
    import zipfile

    import learn2learn as l2l  # the `l2l` extra
    import torchvision.datasets

    from metalearn.models import ConvBackbone

    ways, per_class = 5, 1 + QUERY_SHOTS
    target = Path(folder, "omniglot-py")
    for name in ("images_background", "images_evaluation"):
        if not (target / name).is_dir():
            with zipfile.ZipFile(Path(data_dir, "omniglot", "omniglot-py", f"{name}.zip")) as zips:
                zips.extractall(target)
    # torchvision's Omniglot checks the md5 of the upstream zips before it reads the
    # extracted folders; the shared copy holds the official pixels in rebuilt zips
    # (other checksums), extracted complete above.
    torchvision.datasets.Omniglot._check_integrity = lambda self: True  # type: ignore[method-assign]
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot",
        train_ways=ways,
        train_samples=per_class,
        test_ways=ways,
        test_samples=per_class,
        root=folder,
    )
    kwargs = {k: v for k, v in BACKBONE.items() if k != "_target_"}
    features = ConvBackbone(**kwargs).to(device)
    head = l2l.algorithms.MAML(nn.Linear(features.feature_dim, ways), lr=0.1).to(device)
    optimizer = torch.optim.Adam([*features.parameters(), *head.parameters()], 1e-3)

    def step() -> None:
        optimizer.zero_grad()
        for _ in range(meta_batch):
            images, labels = tasksets.train.sample()
            order = labels.argsort(stable=True)  # class-major: 16 images of label 0 first
            images, labels = images[order].to(device), labels[order].to(device)
            support = torch.zeros(len(labels), dtype=torch.bool, device=device)
            support[::per_class] = True
            embedded = features(images)
            learner = head.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(embedded[support]), labels[support]))
            loss = F.cross_entropy(learner(embedded[~support]), labels[~support])
            (loss / meta_batch).backward()
        optimizer.step()

    return step


def have_l2l() -> bool:
    try:
        import learn2learn  # noqa: F401
    except ImportError:
        return False
    return True


# -- one geometry ------------------------------------------------------------------------
def measure(
    sampler: EpisodeSampler,
    meta_batch: int,
    steps: int,
    args: argparse.Namespace,
    device: torch.device,
    draw_s: float,
    gather_s: float,
) -> dict[str, Any]:
    batch = to_device(sampler.sample(range(meta_batch)), device)
    torch.manual_seed(0)
    model = HyperRepresentation(BACKBONE, inner_steps=steps).to(device).train()
    channels_last = {**BACKBONE, "channels_last": True}
    fast = HyperRepresentation(channels_last, inner_steps=steps).to(device).train()
    fast.load_state_dict(model.state_dict())
    one_call = HyperRepresentation(BACKBONE, inner_steps=steps, episode_chunk=None)
    one_call = one_call.to(device).train()
    one_call.load_state_dict(model.state_dict())
    images = torch.cat([batch.support, batch.query], dim=1)
    per_call = episodes_per_call("auto", "episode", device) or meta_batch

    def meta_step(forward: Callable[..., Any], module: nn.Module = model) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            loss, _, _ = forward(batch, steps, False)
            loss.mean().backward()

        return step

    def plain_step(
        backbone: Callable[[torch.Tensor], torch.Tensor], chunk: int = meta_batch
    ) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            floats = images.float().div_(255)
            features = torch.cat([backbone(part) for part in floats.split(chunk)])
            features.square().mean().backward()

        return step

    fns = {
        "eager_s": meta_step(model._episode_forward),
        "eager_one_call_s": meta_step(one_call._episode_forward, one_call),
        "eager_channels_last_s": meta_step(fast._episode_forward, fast),
        "plain_s": plain_step(model.backbone, per_call),
        "plain_one_call_s": plain_step(model.backbone),
    }
    row: dict[str, Any] = {}
    if args.compile:
        torch._dynamo.reset()
        compiled = torch.compile(model._episode_forward, fullgraph=True, dynamic=False)
        row["compile_s"] = round(timed(meta_step(compiled), device), 2)
        fns["compiled_s"] = meta_step(compiled)
        compiled_backbone = torch.compile(model.backbone, fullgraph=True, dynamic=False)
        fns["plain_compiled_s"] = plain_step(compiled_backbone, per_call)
    peers = args.peers and have_l2l()
    if peers:
        fns.update(l2l_recipes(batch, steps, device, maml=steps <= args.maml_max_steps))
    times = side_by_side(fns, args.repeats, device)
    ours = min(
        times["eager_s"], times["eager_channels_last_s"], times.get("compiled_s", float("inf"))
    )
    plain = min(times["plain_s"], times["plain_one_call_s"])
    row.update({name: round(value, 5) for name, value in times.items()})
    row["ratio"] = round(times["eager_s"] / plain, 3)
    if "compiled_s" in times:
        row["compiled_ratio"] = round(times["compiled_s"] / plain, 3)
        row["compiled_speedup"] = round(times["eager_s"] / times["compiled_s"], 3)
        row["episodes_per_s_compiled"] = round(meta_batch / times["compiled_s"], 2)
    row["episodes_per_s_eager"] = round(meta_batch / times["eager_s"], 2)
    row["episodes_per_s_one_call"] = round(meta_batch / times["eager_one_call_s"], 2)
    row["episodes_per_s_channels_last"] = round(meta_batch / times["eager_channels_last_s"], 2)
    row["peak_mem_mb"] = round(peak_bytes(meta_step(model._episode_forward), device) / 2**20, 2)
    row["draw_s"], row["gather_s"] = round(draw_s, 6), round(gather_s, 6)
    row["sampler_share"] = round(gather_s / ours, 4)
    for peer in ("l2l_anil_s", "l2l_maml_s"):
        if peer in times:
            row[f"vs_{peer[:-2]}"] = round(times[peer] / ours, 3)
    return row


def sampling_times(sampler: EpisodeSampler, meta_batch: int, repeats: int) -> tuple[float, float]:
    """Median seconds to draw a meta-batch's indices and to gather its images."""
    draws, gathers = [], []
    for step in range(max(repeats, 20)):
        ids = range(step * meta_batch, (step + 1) * meta_batch)
        start = time.perf_counter()
        drawn = sampler.draw(ids)
        middle = time.perf_counter()
        sampler.gather(drawn)
        draws.append(middle - start)
        gathers.append(time.perf_counter() - middle)
    return statistics.median(draws), statistics.median(gathers)


# -- train.py against the peer -------------------------------------------------------------
STEP_TIMES = """
import json, time
import pytorch_lightning as pl

class StepTimes(pl.Callback):
    def __init__(self, path):
        self.path, self.times = path, []
    def on_train_batch_end(self, trainer, *args):
        self.times.append(time.perf_counter())
    def on_train_end(self, trainer, pl_module):
        with open(self.path, "w") as handle:
            json.dump(self.times, handle)
"""


def train_rate(
    args: argparse.Namespace,
    device: torch.device,
    overrides: list[str],
    experiment: str = "omniglot_5w1s_quick",
) -> float:
    """Steady-state training episodes/s of train.py at ``experiment`` (meta-batch 4)."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "step_times.py").write_text(STEP_TIMES)
        times_file = Path(folder, "times.json")
        command = [
            sys.executable,
            str(REPO / "train.py"),
            f"experiment={experiment}",
            f"trainer.max_steps={args.train_steps}",
            f"trainer.val_check_interval={args.train_steps}",
            "data.val_episodes=10",
            "test=false",
            "logger=none",
            f"hydra.run.dir={folder}/run",
            "+callbacks.step_times._target_=step_times.StepTimes",
            f"extras.keep_host_memory={str(args.keep_host_memory).lower()}",
            f"+callbacks.step_times.path={times_file}",
            *(["model.compile=true"] if args.train_compile else []),
            *([f"trainer.accelerator={device.type}"] if device.type != "cpu" else []),
            *([f"paths.data_dir={args.data_dir}"] if args.data_dir else []),
            *overrides,
        ]
        environment = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")]),
            METALEARN_TRUSTED_TARGETS="step_times.",
        )
        if not args.keep_host_memory:  # glibc's defaults, not those this process exports
            environment.pop("GLIBC_TUNABLES", None)
        done = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            sys.exit(f"train.py failed ({done.returncode}): {done.stderr[-2000:]}")
        stamps = json.loads(times_file.read_text())
    first = len(stamps) // 4
    return 4 * (len(stamps) - 1 - first) / (stamps[-1] - stamps[first])


#: train.py settings of the training benchmark: name suffix -> (overrides, bfloat16,
#: channels-last); the peer runs each with the same precision and layout.
TRAIN_SETTINGS: dict[str, tuple[list[str], bool, bool]] = {
    "": ([], False, False),
    "_channels_last": (["model.backbone.channels_last=true"], False, True),
    "_bf16": (["trainer.precision=bf16-mixed"], True, False),
    "_bf16_channels_last": (
        ["trainer.precision=bf16-mixed", "model.backbone.channels_last=true"],
        True,
        True,
    ),
}


def train_speed(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """train.py's steady-state episodes/s at omniglot_5w1s_quick, as configured, with a
    channels-last backbone and (``--train-bf16``) with trainer.precision=bf16-mixed, each
    next to learn2learn's ANIL recipe on the same geometry (5-way 1-shot, meta-batch 4,
    T = 5): as learn2learn writes it (float32, contiguous: ``vs_l2l_anil*``) and given the
    same precision and layout (``vs_same_l2l_anil*``)."""
    settings = {
        name: setting
        for name, setting in TRAIN_SETTINGS.items()
        if args.train_bf16 or not setting[1]
    }
    peers: dict[str, Callable[[], None]] = {}
    meta_batch = 4
    recipe_folder = tempfile.TemporaryDirectory()
    recipe = None
    if args.peers and have_l2l() and args.data_dir:
        recipe = l2l_anil_recipe(args.data_dir, recipe_folder.name, device)
    if args.peers and have_l2l():
        sampler = EpisodeSampler(
            training_images(args.data_dir, args.cache_dir), 5, 1, 15, 0, "train"
        )
        batch = to_device(sampler.sample(range(meta_batch)), device)
        peers = {
            name: l2l_recipes(batch, 5, device, False, bf16, channels_last)["l2l_anil_s"]
            for name, (_, bf16, channels_last) in settings.items()
        }
    # Round robin, the peers measured in every round right after our runs: a ratio is
    # taken within a round (a busy spell of the machine slows both sides of it) and the
    # medians over the rounds are printed.
    rounds: list[dict[str, float]] = []
    for _ in range(args.train_repeats):
        rates = {name: train_rate(args, device, o) for name, (o, _, _) in settings.items()}
        measured = {f"train_episodes_per_s{name}": rate for name, rate in rates.items()}
        if peers:
            seconds = side_by_side(peers, max(args.repeats, 10), device)
            for name, rate in rates.items():
                measured[f"l2l_anil_episodes_per_s{name}"] = meta_batch / seconds[name]
                measured[f"vs_l2l_anil{name}"] = rate * seconds[""] / meta_batch
                measured[f"vs_same_l2l_anil{name}"] = rate * seconds[name] / meta_batch
        if recipe is not None:
            recipe_s = side_by_side({"recipe": recipe}, max(args.repeats, 10), device)["recipe"]
            measured["l2l_anil_recipe_episodes_per_s"] = meta_batch / recipe_s
            for name, rate in rates.items():
                measured[f"vs_l2l_anil_recipe{name}"] = rate * recipe_s / meta_batch
        rounds.append(measured)
    recipe_folder.cleanup()
    row: dict[str, Any] = {
        "what": "train.py experiment=omniglot_5w1s_quick",
        "compile": args.train_compile,
        "steps": args.train_steps,
        "repeats": args.train_repeats,
        **{
            key: round(statistics.median(r[key] for r in rounds), 3 if "vs_" in key else 2)
            for key in rounds[0]
        },
        "vs_l2l_anil_per_round": {
            key[len("vs_l2l_anil") :] or "float32": [round(r[key], 3) for r in rounds]
            for key in rounds[0]
            if key.startswith("vs_l2l_anil")
        },
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20, 100])
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=GEOMETRIES)
    parser.add_argument("--meta-batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--maml-max-steps", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--train-compile", action="store_true")
    parser.add_argument("--train-bf16", action="store_true")
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--only-train", action="store_true")
    parser.add_argument(
        "--no-keep-host-memory",
        dest="keep_host_memory",
        action="store_false",
        help="leave glibc's malloc as it is (train.py's extras.keep_host_memory=false)",
    )
    parser.add_argument("--data-dir", default=os.environ.get("METALEARN_DATA_DIR"))
    parser.add_argument("--cache-dir", default=os.environ.get("METALEARN_CACHE_DIR", ".cache"))
    args = parser.parse_args()
    device = torch.device(args.device)
    # As train.py (extras.keep_host_memory): freed host memory is reused, not faulted in
    # again at every step; every measurement of this process, the peers' included, runs so.
    kept = args.keep_host_memory and keep_freed_host_memory()
    common = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "keep_host_memory": kept,
    }
    if device.type == "cuda":
        common["gpu"] = torch.cuda.get_device_name(device)
    if not args.only_train:
        images = training_images(args.data_dir, args.cache_dir)
        for geometry in args.geometries:
            ways, shots = GEOMETRIES[geometry]
            sampler = EpisodeSampler(images.to(device), ways, shots, QUERY_SHOTS, 0, "train")
            for meta_batch in args.meta_batches:
                draw_s, gather_s = sampling_times(sampler, meta_batch, args.repeats)
                for steps in args.steps:
                    row = measure(sampler, meta_batch, steps, args, device, draw_s, gather_s)
                    head = {"geometry": geometry, "meta_batch": meta_batch, "inner_steps": steps}
                    print(json.dumps({**head, **row, **common}), flush=True)
    if args.train_steps:
        print(json.dumps({**train_speed(args, device), **common}), flush=True)


if __name__ == "__main__":
    main()
