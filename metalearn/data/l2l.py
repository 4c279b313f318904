"""learn2learn interoperability: our episodes as learn2learn task sets, and back.

learn2learn is optional (``make install-l2l``) and imported only where it is needed, never
by ``import metalearn`` or ``import metalearn.data``.

A learn2learn task is a pair ``(X, y)``: X (N * (K + Q), C, H, W) float images of one
episode, support and query together, and y (N * (K + Q),) their class labels. The tasks
made here from our episodes are class-major (the K + Q images of label 0 first), and within
a class the K support images come before the Q query images, so that
:func:`split_task` (and :class:`L2LEpisodeSource`) recover exactly the episode they came
from. learn2learn's own examples split a task of ``2K`` images per class by even and odd
position; on our tasks with ``query_shots == shots`` that also gives K images per class on
each side, but not the same halves as our support and query sets.

Direction 1, our episode stream where learn2learn expects a task set::

    tasksets = l2l_tasksets(OmniglotDataModule(ways=5, shots=1, query_shots=1, ...))
    X, y = tasksets.train.sample()           # episode 0, then 1, 2, ... of the stream

Direction 2, a learn2learn task set feeding our LightningModules::

    datamodule = L2LDataModule(tasksets=(train, validation, test), ways=5, shots=1)
    trainer.fit(HyperRepresentation(backbone=...), datamodule=datamodule)
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from torch import Tensor

from metalearn.data.datamodule import SPLIT_NAMES, EpisodicDataModule
from metalearn.data.episodes import (
    EpisodeBatch,
    EpisodeSampler,
    TrainEpisodes,
    check_episode_geometry,
)
from metalearn.errors import ConfigError, MetalearnError

__all__ = [
    "EpisodeSource",
    "EpisodeTaskset",
    "ImageMode",
    "L2LDataModule",
    "L2LEpisodeSource",
    "L2LEpisodes",
    "Learn2LearnNotInstalled",
    "as_l2l_taskset",
    "episode_to_task",
    "l2l_tasksets",
    "require_learn2learn",
    "split_task",
    "tasks_to_batch",
]

#: How images of learn2learn tasks enter an :class:`EpisodeBatch`:
#: ``"auto"``: uint8 when the task's float images are k / 255 values in [0, 1] (what
#: ``ToTensor`` makes; the conversion is then lossless), else kept as floats;
#: ``"uint8"``: always quantized to uint8 (the images must lie in [0, 1]);
#: ``"float"``: floats as they are (uint8 images are scaled to [0, 1]).
#: Our LightningModules take either: uint8 is scaled to [0, 1] on the model's device,
#: floats are used as given.
ImageMode = Literal["auto", "uint8", "float"]
_IMAGE_MODES = ("auto", "uint8", "float")

Task = tuple[Tensor, Tensor]


class Learn2LearnNotInstalled(MetalearnError, ImportError):
    """learn2learn is needed here and is not installed."""


def require_learn2learn() -> ModuleType:
    """Import learn2learn, or raise :class:`Learn2LearnNotInstalled` saying how to get it."""
    try:
        import learn2learn
    except ImportError as error:
        raise Learn2LearnNotInstalled(
            f"learn2learn is not installed ({error}); run `make install-l2l`, which builds "
            f"learn2learn 0.2.0 for this Python (scripts/install_l2l.sh) and installs the "
            f"`l2l` extra"
        ) from error
    return learn2learn


class EpisodeSource(Protocol):
    """What draws episodes by global index: :class:`EpisodeSampler`, :class:`L2LEpisodeSource`."""

    ways: int
    shots: int
    query_shots: int

    def sample(self, indices: Sequence[int]) -> EpisodeBatch: ...


# -- tasks <-> episodes ----------------------------------------------------------------------


def episode_to_task(
    batch: EpisodeBatch, index: int = 0, dtype: torch.dtype = torch.float32
) -> Task:
    """Episode ``index`` of a meta-batch as a learn2learn task ``(X, y)``.

    Args:
        batch: a meta-batch of N-way, K-shot episodes with Q queries per class.
        index: which episode of the meta-batch.
        dtype: dtype of X: for a floating dtype uint8 images are scaled to [0, 1]; for
            ``torch.uint8`` they are kept as they are (float images in [0, 1] quantized).

    Returns:
        X (N * (K + Q), C, H, W) and y (N * (K + Q),) int64: class-major, the K support
        images of a class before its Q query images.
    """
    ways = batch.ways
    support = batch.support[index].unflatten(0, (ways, -1))  # (N, K, C, H, W)
    query = batch.query[index].unflatten(0, (ways, -1))  # (N, Q, C, H, W)
    images = torch.cat([support, query], dim=1).flatten(0, 1)
    per_class = support.shape[1] + query.shape[1]
    if dtype == torch.uint8 and images.is_floating_point():
        images = images.mul(255).round_().to(torch.uint8)
    elif dtype != images.dtype:
        images = images.to(dtype)
        if batch.support.dtype == torch.uint8 and dtype.is_floating_point:
            images = images.div_(255)
    labels = torch.arange(ways, device=images.device).repeat_interleave(per_class)
    return images, labels


def split_task(
    images: Tensor, labels: Tensor | Sequence[int], ways: int, shots: int, query_shots: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a learn2learn task into support and query sets with labels 0..N-1.

    The task's classes, sorted by their label, become labels 0..N-1 (so labels that already
    are 0..N-1, as after learn2learn's ``RemapLabels``, are kept). Each class must have
    exactly K + Q images; in their order in the task, the first K are its support images
    and the next Q its query images.

    Args:
        images: X, (N * (K + Q), C, H, W).
        labels: y, (N * (K + Q),) class labels of any integer values.
        ways: N.
        shots: K.
        query_shots: Q.

    Returns:
        ``(support (N*K, C, H, W), support_labels (N*K,), query (N*Q, C, H, W),
        query_labels (N*Q,))``, class-major.

    Raises:
        ConfigError: the task does not have N classes of K + Q images each.
    """
    labels = torch.as_tensor(labels, device=images.device)
    per_class = shots + query_shots
    if labels.dim() != 1 or len(labels) != len(images):
        raise ConfigError(
            f"a learn2learn task needs one label per image, got images {tuple(images.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    classes, relabeled = torch.unique(labels, sorted=True, return_inverse=True)
    counts = torch.bincount(relabeled, minlength=len(classes))
    if len(classes) != ways or bool((counts != per_class).any()):
        raise ConfigError(
            f"a learn2learn task has {len(classes)} classes with {counts.tolist()} images; "
            f"episodes of ways={ways}, shots={shots}, query_shots={query_shots} need {ways} "
            f"classes of shots + query_shots = {per_class} images: build the task set with "
            f"NWays(n={ways}) and KShots(k={per_class})"
        )
    # Positions grouped by class, in task order within a class (a stable sort).
    order = torch.sort(relabeled, stable=True).indices.view(ways, per_class)
    support, query = order[:, :shots].flatten(), order[:, shots:].flatten()
    return images[support], relabeled[support], images[query], relabeled[query]


def _to_episode_images(support: Tensor, query: Tensor, mode: ImageMode) -> tuple[Tensor, Tensor]:
    """Apply an :data:`ImageMode` to the stacked support and query images of a meta-batch."""
    if support.dtype == torch.uint8 and query.dtype == torch.uint8:
        if mode == "float":
            return support.float().div_(255), query.float().div_(255)
        return support, query
    if not (support.dtype.is_floating_point and query.dtype.is_floating_point):
        raise ConfigError(
            f"learn2learn task images must be floating point or uint8, got {support.dtype} "
            f"and {query.dtype}"
        )
    if mode == "float":
        return support, query
    low = min(float(support.min()), float(query.min()))
    high = max(float(support.max()), float(query.max()))
    if low < 0.0 or high > 1.0:
        if mode == "uint8":
            raise ConfigError(
                f'images in [{low:.3g}, {high:.3g}] cannot become uint8: images = "uint8" '
                f'needs values in [0, 1] (use images = "float" for normalized images)'
            )
        return support, query
    scaled = support * 255, query * 255
    levels = scaled[0].round(), scaled[1].round()
    if mode == "auto":
        # k / 255 up to float rounding (e.g. after `1 - x`): then uint8 loses nothing.
        worst = max(float((s - q).abs().max()) for s, q in zip(scaled, levels, strict=True))
        if worst > 1e-3:
            return support, query
    return levels[0].to(torch.uint8), levels[1].to(torch.uint8)


def tasks_to_batch(
    tasks: Sequence[Task],
    ways: int,
    shots: int,
    query_shots: int,
    episode_ids: Sequence[int] | None = None,
    images: ImageMode = "auto",
) -> EpisodeBatch:
    """Stack learn2learn tasks ``(X, y)`` into one :class:`EpisodeBatch` (see :func:`split_task`).

    Args:
        tasks: B tasks of N classes with K + Q images each.
        ways: N.
        shots: K.
        query_shots: Q.
        episode_ids: the B episodes' global indices (default 0..B-1).
        images: see :data:`ImageMode`.
    """
    if images not in _IMAGE_MODES:
        raise ConfigError(f"images must be one of {', '.join(_IMAGE_MODES)}, got {images!r}")
    if not tasks:
        raise ValueError("tasks_to_batch needs at least one task")
    parts = [split_task(X, y, ways, shots, query_shots) for X, y in tasks]
    support, query = _to_episode_images(
        torch.stack([p[0] for p in parts]), torch.stack([p[2] for p in parts]), images
    )
    ids = range(len(tasks)) if episode_ids is None else episode_ids
    batch, device = len(tasks), support.device
    return EpisodeBatch(
        support=support,
        support_labels=torch.stack([p[1] for p in parts]).to(torch.int64),
        query=query,
        query_labels=torch.stack([p[3] for p in parts]).to(torch.int64),
        episode_ids=torch.as_tensor(list(ids), dtype=torch.int64, device=device).view(batch),
        ways=ways,
    )


# -- direction 1: our episodes as a learn2learn task set -------------------------------------


class EpisodeTaskset:
    """Our episode stream with the interface of a ``learn2learn.data.Taskset``.

    Task ``i`` is episode ``i`` of the source's stream, as a learn2learn task ``(X, y)`` (see
    :func:`episode_to_task`), so it is a pure function of the stream's seed, split and ``i``.
    As in learn2learn, ``num_tasks=-1`` is an endless stream whose ``len()`` is 1, and
    ``num_tasks=n`` a fixed pool of tasks 0..n-1. Unlike learn2learn, which picks a random
    task, :meth:`sample` is deterministic: its k-th call returns task k (k mod n for a pool).

    Args:
        source: an :class:`EpisodeSampler` (``datamodule.samplers[split]``) or any
            :class:`EpisodeSource`.
        num_tasks: -1 (endless) or the size of the pool of tasks.
        dtype: dtype of the images X (floats in [0, 1]; ``torch.uint8`` keeps them raw).
    """

    def __init__(
        self, source: EpisodeSource, num_tasks: int = -1, dtype: torch.dtype = torch.float32
    ) -> None:
        if num_tasks < -1 or num_tasks == 0:
            raise ValueError(f"num_tasks needs to be -1 (endless) or positive, got {num_tasks}")
        self.source, self.num_tasks, self.dtype = source, num_tasks, dtype
        self._next = 0

    @property
    def ways(self) -> int:
        return self.source.ways

    @property
    def shots(self) -> int:
        return self.source.shots

    @property
    def query_shots(self) -> int:
        return self.source.query_shots

    def __len__(self) -> int:
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, index: int) -> Task:
        index = int(index)
        if self.num_tasks != -1 and -self.num_tasks <= index < 0:
            index += self.num_tasks
        if index < 0 or (self.num_tasks != -1 and index >= self.num_tasks):
            raise IndexError(f"task {index} of a task set of {len(self)} tasks")
        return episode_to_task(self.source.sample([index]), dtype=self.dtype)

    def sample(self) -> Task:
        """The next task: task 0 on the first call, then 1, 2, ... (cycling over a pool)."""
        index = self._next if self.num_tasks == -1 else self._next % self.num_tasks
        self._next += 1
        return self[index]

    def __iter__(self) -> Iterator[Task]:
        index = 0
        while self.num_tasks == -1 or index < self.num_tasks:
            yield self[index]
            index += 1


def as_l2l_taskset(
    source: EpisodeSource, num_tasks: int = -1, dtype: torch.dtype = torch.float32
) -> EpisodeTaskset:
    """Our episode source as a learn2learn task set (see :class:`EpisodeTaskset`)."""
    return EpisodeTaskset(source, num_tasks, dtype)


def l2l_tasksets(
    datamodule: EpisodicDataModule, num_tasks: int = -1, dtype: torch.dtype = torch.float32
) -> tuple[EpisodeTaskset, EpisodeTaskset, EpisodeTaskset]:
    """A DataModule's splits as learn2learn's ``BenchmarkTasksets(train, validation, test)``.

    What ``learn2learn.vision.benchmarks.get_tasksets`` returns, so learn2learn's example
    loops run on our episodes unchanged. Training tasks have the DataModule's training
    geometry (``train_ways``, ``train_shots``); validation and test tasks are its fixed
    evaluation episodes (``eval_seed``). Calls ``prepare_data`` and ``setup`` when the
    DataModule is not set up yet. Needs learn2learn (for the namedtuple).
    """
    l2l = require_learn2learn()
    if not datamodule.samplers:
        datamodule.prepare_data()
        datamodule.setup("fit")
    return l2l.vision.benchmarks.BenchmarkTasksets(
        *(EpisodeTaskset(datamodule.samplers[split], num_tasks, dtype) for split in SPLIT_NAMES)
    )


# -- direction 2: a learn2learn task set as our episodes -------------------------------------


@contextmanager
def _seeded_rngs(*key: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators from ``key``, restoring them after.

    learn2learn's task transforms draw from the global ``random`` module (and data
    transforms may use torch's or NumPy's); seeding them per episode makes an episode a
    function of its index without disturbing anyone else's random stream.
    """
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def _pool_size(taskset: Any) -> int | None:
    """learn2learn's ``num_tasks`` (-1: endless, None), else the length of the task set."""
    num_tasks = getattr(taskset, "num_tasks", None)
    if num_tasks is not None:
        return None if num_tasks == -1 else int(num_tasks)
    try:
        return len(taskset)
    except TypeError:
        return None


class L2LEpisodeSource:
    """Draws our episodes from a learn2learn task set: ``sample(indices) -> EpisodeBatch``.

    It stands where an :class:`EpisodeSampler` stands (``TrainEpisodes``, ``FixedEpisodes``,
    ``datamodule.samplers``). Episode ``i`` is task ``i`` of the task set (``i mod n`` for a
    pool of ``n = taskset.num_tasks`` tasks, or ``len(taskset)`` for a task set without
    ``num_tasks``), converted by :func:`split_task`. With a ``seed``, the task is drawn with
    the global random generators seeded from ``(seed, split, task index)`` and restored
    afterwards, so episode ``i`` is a pure function of those, as with our own sampler (and
    the same on every rank and data-loader worker). With ``seed=None`` learn2learn's own
    randomness is left alone.

    Args:
        taskset: a ``learn2learn.data.Taskset`` (or anything indexable returning ``(X, y)``).
        ways: N.
        shots: K.
        query_shots: Q (each task needs N classes of K + Q images).
        seed: seed of the episode stream, or None.
        split: name of the split (part of every episode's seed).
        images: see :data:`ImageMode`.
    """

    def __init__(
        self,
        taskset: Any,
        ways: int,
        shots: int,
        query_shots: int,
        seed: int | None = 0,
        split: str = "train",
        images: ImageMode = "auto",
    ) -> None:
        check_episode_geometry(ways, shots, query_shots)
        if images not in _IMAGE_MODES:
            raise ConfigError(f"images must be one of {', '.join(_IMAGE_MODES)}, got {images!r}")
        self.taskset = taskset
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.seed, self.split, self.images = seed, split, images
        #: Tasks 0..pool-1 repeat; None: an endless stream.
        self.pool: int | None = _pool_size(taskset)
        self._code = zlib.crc32(split.encode())

    def task(self, index: int) -> Task:
        """The learn2learn task of episode ``index``."""
        key = index % self.pool if self.pool else index
        if self.seed is None:
            return self.taskset[key]
        with _seeded_rngs(self.seed, self._code, key):
            return self.taskset[key]

    def sample(self, indices: Sequence[int]) -> EpisodeBatch:
        """Episodes ``indices`` as one :class:`EpisodeBatch`."""
        ids = [int(i) for i in indices]
        tasks = [self.task(i) for i in ids]
        return tasks_to_batch(tasks, self.ways, self.shots, self.query_shots, ids, self.images)


class L2LEpisodes(TrainEpisodes):
    """A training stream of meta-batches from a learn2learn task set (an IterableDataset).

    Meta-batch ``s`` holds episodes ``s * B .. s * B + B - 1`` of an
    :class:`L2LEpisodeSource`; use it with ``DataLoader(..., batch_size=None)`` and
    ``trainer.fit(model, train_dataloaders=...)``, or use :class:`L2LDataModule`.

    Args:
        taskset: the learn2learn task set.
        ways: N.
        shots: K.
        query_shots: Q.
        meta_batch: B, episodes per meta-batch.
        seed: seed of the episode stream (None: learn2learn's own randomness).
        steps: number of meta-batches (None: endless).
        images: see :data:`ImageMode`.
    """

    def __init__(
        self,
        taskset: Any,
        ways: int,
        shots: int,
        query_shots: int,
        meta_batch: int,
        seed: int | None = 0,
        steps: int | None = None,
        images: ImageMode = "auto",
    ) -> None:
        source = L2LEpisodeSource(taskset, ways, shots, query_shots, seed, "train", images)
        # TrainEpisodes only calls sampler.sample(ids), which the source provides.
        super().__init__(cast(EpisodeSampler, source), meta_batch, 0, steps)


class L2LDataModule(EpisodicDataModule):
    """Our DataModule protocol over learn2learn task sets (train, validation, test).

    Training meta-batches, fixed validation / test episodes, resuming and DDP slicing work
    as for our own data sets (see :class:`EpisodicDataModule`); each split's
    ``samplers[split]`` is an :class:`L2LEpisodeSource`. Give either ``tasksets`` or the
    name of a learn2learn benchmark, which is then built with
    ``learn2learn.vision.benchmarks.get_tasksets`` for our geometry (``train_samples =
    train_shots + query_shots``, ``test_samples = shots + query_shots``).

    Tasks should be CPU tensors (learn2learn's default); Lightning moves each meta-batch to
    the model's device.

    Args:
        tasksets: ``(train, validation, test)`` task sets: learn2learn's
            ``BenchmarkTasksets``, a sequence of three, or a mapping with keys ``train``,
            ``validation`` (or ``val``) and ``test``. Not saved in checkpoints.
        benchmark: a name of ``learn2learn.vision.benchmarks.list_tasksets()``
            (``omniglot``, ``mini-imagenet``, ...), instead of ``tasksets``.
        root: where learn2learn keeps (and downloads) the benchmark's data.
        num_tasks: ``num_tasks`` of the benchmark's task sets (-1: endless).
        benchmark_kwargs: more arguments of ``get_tasksets``.
        images: see :data:`ImageMode`.
        l2l_seed: seed the global random generators per episode (see
            :class:`L2LEpisodeSource`) with ``seed`` / ``eval_seed``; ``False`` leaves
            learn2learn's randomness alone.
        **kwargs: episode geometry and loaders, see :class:`EpisodicDataModule`
            (``device_sampling`` does not apply and is off).
    """

    def __init__(
        self,
        tasksets: Any = None,
        benchmark: str | None = None,
        root: str = "~/data",
        num_tasks: int = -1,
        benchmark_kwargs: Mapping[str, Any] | None = None,
        images: ImageMode = "auto",
        l2l_seed: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs["device_sampling"] = False
        super().__init__(**kwargs)
        if (tasksets is None) == (benchmark is None):
            raise ConfigError("L2LDataModule needs either tasksets or benchmark (not both)")
        if images not in _IMAGE_MODES:
            raise ConfigError(
                f"data.images must be one of {', '.join(_IMAGE_MODES)}, got {images!r}"
            )
        self.save_hyperparameters(ignore=["tasksets"])
        self.tasksets, self.benchmark, self.root = tasksets, benchmark, root
        self.num_tasks, self.images, self.l2l_seed = num_tasks, images, l2l_seed
        self.benchmark_kwargs = dict(benchmark_kwargs or {})

    def load_splits(self) -> dict[str, Tensor]:
        raise MetalearnError("L2LDataModule draws learn2learn tasks; it has no image tensors")

    def _split_tasksets(self) -> list[Any]:
        tasksets = self.tasksets
        if tasksets is None:
            l2l = require_learn2learn()
            tasksets = l2l.vision.benchmarks.get_tasksets(
                self.benchmark,
                train_ways=self.train_ways,
                train_samples=self.train_shots + self.query_shots,
                test_ways=self.ways,
                test_samples=self.shots + self.query_shots,
                num_tasks=self.num_tasks,
                root=self.root,
                **self.benchmark_kwargs,
            )
        if isinstance(tasksets, Mapping):
            validation = tasksets.get("validation", tasksets.get("val"))
            return [tasksets["train"], validation, tasksets["test"]]
        if len(tasksets) != 3:
            raise ConfigError(
                f"tasksets must be (train, validation, test), got {len(tasksets)} task sets"
            )
        return list(tasksets)

    def setup(self, stage: str | None = None) -> None:
        if self.samplers:
            return
        for split, taskset in zip(SPLIT_NAMES, self._split_tasksets(), strict=True):
            if taskset is None:
                raise ConfigError(f"no learn2learn task set for the {split!r} split")
            training = split == "train"
            source = L2LEpisodeSource(
                taskset,
                self.train_ways if training else self.ways,
                self.train_shots if training else self.shots,
                self.query_shots,
                (self.seed if training else self.eval_seed) if self.l2l_seed else None,
                split,
                self.images,
            )
            # The loaders and learners only call .sample(ids), which the source provides.
            self.samplers[split] = cast(EpisodeSampler, source)
