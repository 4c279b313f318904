"""Episode sampling: N-way K-shot episodes as pure functions of (seed, split, episode index)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from metalearn.data.storage import ClassImages
from metalearn.errors import ConfigError

__all__ = [
    "EpisodeBatch",
    "EpisodeSampler",
    "TrainEpisodes",
    "FixedEpisodes",
    "check_episode_geometry",
]


class EpisodeBatch(NamedTuple):
    """A meta-batch of B episodes of the same geometry (N ways, K shots, Q queries per class).

    Images stay uint8 (0..255) until they reach the model's device, where they are scaled
    per meta-batch; a float copy of a whole split is never made.

    Attributes:
        support: (B, N*K, C, H, W) uint8 support images, class-major (K images of label 0 first).
        support_labels: (B, N*K) int64 labels in [0, N).
        query: (B, N*Q, C, H, W) uint8 query images, class-major.
        query_labels: (B, N*Q) int64 labels in [0, N).
        episode_ids: (B,) int64 global indices of the episodes in their split's stream.
        ways: N.
    """

    support: Tensor
    support_labels: Tensor
    query: Tensor
    query_labels: Tensor
    episode_ids: Tensor
    ways: int


#: The settings behind (ways, shots, query_shots), as a user writes them in train.py.
DATA_KEYS = ("data.ways", "data.shots", "data.query_shots")


def check_episode_geometry(
    ways: int, shots: int, query_shots: int, keys: Sequence[str] = DATA_KEYS
) -> None:
    """Raise :class:`ConfigError` for impossible episode sizes (before any data is read).

    ``keys`` name the three settings in the message (``data.train_ways`` for training
    episodes, ``ways`` in evaluate.py).
    """
    for key, value, low in zip(keys, (ways, shots, query_shots), (2, 1, 1), strict=True):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode())


class EpisodeSampler:
    """Draws episodes from a split, indexed by class.

    Episode ``i`` is a pure function of ``(seed, split, i)``: its random generator is
    ``numpy.random.default_rng([seed, crc32(split), i])``. It picks N distinct classes (the
    order of the pick defines the labels 0..N-1) and, per class, K support and Q query
    images. With ``disjoint=True`` (the default, the clean protocol) support and query
    images are distinct; with ``disjoint=False`` they are drawn independently, so a query
    image may repeat a support image, as in the paper's public sampler.

    Positions within a class are the order of ``rng.random`` values drawn for the largest
    class, cut to the class's own count; with as many images in every class this is the
    sampler's definition for a (classes, per_class, ...) tensor.

    Args:
        images: the split: a (num_classes, images_per_class, C, H, W) uint8 tensor or a
            :class:`~metalearn.data.storage.ClassImages` (classes of different sizes, maybe
            memory-mapped).
        ways: N.
        shots: K, support images per class.
        query_shots: Q, query images per class.
        seed: seed of the episode stream.
        split: name of the split (part of every episode's seed).
        disjoint: keep support and query images distinct.
        keys: the settings behind ways, shots and query_shots, named in errors.
    """

    def __init__(
        self,
        images: Tensor | ClassImages,
        ways: int,
        shots: int,
        query_shots: int,
        seed: int,
        split: str,
        disjoint: bool = True,
        keys: Sequence[str] = DATA_KEYS,
    ) -> None:
        check_episode_geometry(ways, shots, query_shots, keys)
        if isinstance(images, Tensor) and (images.dim() != 5 or images.dtype != torch.uint8):
            raise ValueError(
                f"images must be a uint8 tensor (classes, per_class, C, H, W), got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.seed, self.split, self.disjoint = seed, split, disjoint
        self._code = _split_code(split)
        self.images = images
        store = self._store
        if ways > store.num_classes:
            raise ConfigError(
                f"{keys[0]}={ways} is more than the {store.num_classes} classes of the "
                f"{split!r} split"
            )
        needed = shots + query_shots if disjoint else max(shots, query_shots)
        counts = store.counts
        fewest = int(np.argmin(counts))
        if needed > counts[fewest]:
            what = (
                f"{keys[1]} + {keys[2]} = {shots} + {query_shots}"
                if disjoint
                else f"max({keys[1]}, {keys[2]}) = {needed}"
            )
            where = (
                f"the {counts[fewest]} images per class"
                if self._uniform
                else f"the {counts[fewest]} images of class {store.name(fewest)!r}"
            )
            raise ConfigError(
                f"{what} is more than {where} of the {split!r} split; lower {keys[1]} or "
                f"{keys[2]}"
                + ("" if self._uniform else ", or drop such classes (data.min_images_per_class)")
            )

    @property
    def images(self) -> Tensor | ClassImages:
        """The split as given (a 5-D tensor or :class:`ClassImages`); assign to move it."""
        return self._images

    @images.setter
    def images(self, images: Tensor | ClassImages) -> None:
        self._images = images
        store = images if isinstance(images, ClassImages) else ClassImages.from_tensor(images)
        self._store = store
        counts = store.counts
        self._uniform = bool(np.all(counts == counts[0]))
        self._widest = int(counts.max())
        self._host_offsets = np.asarray(store.offsets[:-1], dtype=np.int64)
        self._label_cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return self._store.num_classes

    def _positions(self, rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
        """A random order of the images of each picked class: (N, widest) when every
        class has as many images, else a list of per-class orders of their own length."""
        values = rng.random((self.ways, self._widest))
        if self._uniform:
            return np.argsort(values, axis=1)
        counts = self._store.counts[classes]
        return [np.argsort(values[w, : counts[w]]) for w in range(self.ways)]  # type: ignore[return-value]

    def episode_indices(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Classes and image positions of episode ``index``.

        Returns:
            ``(classes (N,), support (N, K), query (N, Q))`` integer arrays: the classes
            picked, and for each the positions of its support and query images.
        """
        rng = np.random.default_rng([self.seed, self._code, index])
        classes = rng.choice(self.num_classes, size=self.ways, replace=False)
        order = self._positions(rng, classes)
        support = np.stack([row[: self.shots] for row in order])
        if self.disjoint:
            query = np.stack([row[self.shots : self.shots + self.query_shots] for row in order])
        else:
            again = self._positions(rng, classes)
            query = np.stack([row[: self.query_shots] for row in again])
        return classes, support, query

    def draw(self, indices: Sequence[int]) -> np.ndarray:
        """The host-side half of :meth:`sample`: every index the meta-batch needs, in one
        int64 array (a single host-to-device copy).

        Layout: the flat image positions of the support images (B * N * K, class-major per
        episode), then of the query images (B * N * Q), then the B episode ids.
        """
        picks = [self.episode_indices(int(i)) for i in indices]
        offsets = self._host_offsets
        first = offsets[np.stack([p[0] for p in picks])][:, :, None]  # (B, N, 1)
        support = first + np.stack([p[1] for p in picks])
        query = first + np.stack([p[2] for p in picks])
        ids = np.asarray(list(indices), dtype=np.int64)
        return np.concatenate([support.ravel(), query.ravel(), ids]).astype(np.int64)

    def gather(self, drawn: np.ndarray | Tensor) -> EpisodeBatch:
        """The device half of :meth:`sample`: copy the indices of :meth:`draw` to the
        images' device once (pinned and non-blocking for a CUDA device) and gather the
        support and query images in one indexing operation."""
        images = self._store.images
        device = images.device
        indices = torch.as_tensor(drawn)
        if device.type == "cuda" and indices.device.type == "cpu":
            indices = indices.pin_memory().to(device, non_blocking=True)
        else:
            indices = indices.to(device)
        per_episode = self.ways * (self.shots + self.query_shots) + 1
        batch = len(indices) // per_episode
        support_size, query_size = (
            batch * self.ways * self.shots,
            batch * self.ways * self.query_shots,
        )
        gathered = images[indices[: support_size + query_size]]
        shape = images.shape[1:]
        support_labels, query_labels = self._labels(device, batch)
        return EpisodeBatch(
            support=gathered[:support_size].view(batch, -1, *shape),
            support_labels=support_labels,
            query=gathered[support_size:].view(batch, -1, *shape),
            query_labels=query_labels,
            episode_ids=indices[support_size + query_size :],
            ways=self.ways,
        )

    def _labels(self, device: torch.device, batch: int) -> tuple[Tensor, Tensor]:
        """Support and query labels (B, N * K) and (B, N * Q), made once per device and B."""
        key = (str(device), batch)
        if key not in self._label_cache:
            labels = torch.arange(self.ways, device=device)
            self._label_cache[key] = (
                labels.repeat_interleave(self.shots).expand(batch, -1).contiguous(),
                labels.repeat_interleave(self.query_shots).expand(batch, -1).contiguous(),
            )
        support, query = self._label_cache[key]
        return support, query

    def sample(self, indices: Sequence[int]) -> EpisodeBatch:
        """Gather the episodes ``indices`` into one :class:`EpisodeBatch`
        (:meth:`draw`, then :meth:`gather`)."""
        return self.gather(self.draw(indices))


class TrainEpisodes(IterableDataset):
    """The training stream: meta-batch ``s`` holds episodes ``s * B .. s * B + B - 1``.

    The stream is a function of the global step only, so it continues where a resumed run
    stopped (``start_step``), and it is the same for any number of data-loader workers or
    ranks: with ``world_size`` ranks, rank r takes the r-th contiguous slice of B /
    world_size episodes of every meta-batch, and the union over ranks is the 1-rank stream.

    Args:
        sampler: the split's episode sampler.
        meta_batch: B, global number of episodes per outer step.
        start_step: first step to yield (the trainer's global step when resuming).
        end_step: the step to stop before (``None``: endless). ``len()`` is ``end_step``,
            the length of the whole epoch, because after a resume Lightning counts the
            batches of the epoch already done.
        rank: this process's rank.
        world_size: number of ranks; must divide ``meta_batch``.
    """

    def __init__(
        self,
        sampler: EpisodeSampler,
        meta_batch: int,
        start_step: int = 0,
        end_step: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if meta_batch < 1:
            raise ConfigError(f"data.meta_batch must be >= 1, got {meta_batch}")
        if meta_batch % world_size:
            raise ConfigError(
                f"data.meta_batch={meta_batch} is the global number of episodes per step and "
                f"must be divisible by the number of ranks ({world_size})"
            )
        self.sampler, self.meta_batch = sampler, meta_batch
        self.start_step, self.end_step = start_step, end_step
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless episode stream has no length")
        return self.end_step

    def episode_ids(self, step: int) -> range:
        local = self.meta_batch // self.world_size
        first = step * self.meta_batch + self.rank * local
        return range(first, first + local)

    def __iter__(self) -> Iterator[EpisodeBatch]:
        """Meta-batches from ``start_step`` on. In the main process the host-side drawing
        of the next meta-batch's indices (:meth:`EpisodeSampler.draw`) runs on a
        background thread while the current step trains; only the gather is left on the
        critical path. Worker processes (``num_workers > 0``) draw and gather in turn, as
        does any other episode source (a learn2learn task set draws with the global random
        generators, which must not change under the training step)."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step, end = self.start_step + worker, self.end_step
        sampler = self.sampler
        if info is not None or not isinstance(sampler, EpisodeSampler):
            while end is None or step < end:
                yield sampler.sample(self.episode_ids(step))
                step += workers
            return
        with ThreadPoolExecutor(1, thread_name_prefix="episode-draw") as pool:
            upcoming = pool.submit(sampler.draw, self.episode_ids(step))
            while end is None or step < end:
                drawn = upcoming.result()
                step += 1
                if end is None or step < end:
                    upcoming = pool.submit(sampler.draw, self.episode_ids(step))
                yield sampler.gather(drawn)


class FixedEpisodes(Dataset):
    """Fixed evaluation episodes ``0 .. episodes - 1`` in meta-batches of ``meta_batch``.

    With ``world_size`` ranks, rank r evaluates episodes r, r + world_size, ... (no
    episode is counted twice; ranks may differ by one episode). A rank left without
    episodes (fewer episodes than ranks) gets one padding episode with id -1, which the
    evaluation drops: every rank then takes part in reducing the results.
    """

    def __init__(
        self,
        sampler: EpisodeSampler,
        episodes: int,
        meta_batch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if episodes < 1 or meta_batch < 1:
            raise ConfigError(
                f"evaluation needs episodes >= 1 and meta_batch >= 1, got {episodes}, {meta_batch}"
            )
        self.sampler, self.episodes, self.meta_batch = sampler, episodes, meta_batch
        self.ids = range(rank, episodes, world_size)
        self.padding = not self.ids

    def __len__(self) -> int:
        return max(math.ceil(len(self.ids) / self.meta_batch), 1)

    def __getitem__(self, index: int) -> EpisodeBatch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.padding:
            batch = self.sampler.sample([0])
            return batch._replace(episode_ids=torch.full_like(batch.episode_ids, -1))
        return self.sampler.sample(
            self.ids[index * self.meta_batch : (index + 1) * self.meta_batch]
        )
