"""LightningDataModules that deliver meta-batches of episodes."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from metalearn.data import augment
from metalearn.data.cache import cached_class_images, file_listing
from metalearn.data.episodes import (
    DATA_KEYS,
    EpisodeBatch,
    EpisodeSampler,
    FixedEpisodes,
    TrainEpisodes,
    check_episode_geometry,
)
from metalearn.data.sets.folder import Resample, decode_image, find_classes
from metalearn.data.sets.miniimagenet import (
    IMAGE_SIZE,
    IMAGES_PER_CLASS,
    MiniImageNetSplit,
    load_miniimagenet,
)
from metalearn.data.sets.omniglot import (
    OMNIGLOT_SPLITS,
    OmniglotCharacters,
    load_omniglot,
    prepare_omniglot,
    split_characters,
)
from metalearn.data.storage import SPLIT_NAMES, ClassImages
from metalearn.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "BenchmarkDataModule",
    "EpisodicDataModule",
    "FolderDataModule",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "SPLIT_NAMES",
]


class EpisodicDataModule(pl.LightningDataModule):
    """Base class: episode geometry, samplers and data loaders; subclasses load the images.

    Training meta-batches form one stream that starts at the trainer's global step (so a
    resumed run continues it) and ends at ``trainer.max_steps``; validation and test use
    fixed episodes drawn with ``eval_seed``, the same for every training seed.

    Args:
        ways: N, classes per episode.
        shots: K, support images per class.
        query_shots: Q, query images per class.
        meta_batch: B, episodes per outer step (global, over all ranks).
        val_episodes: number of fixed validation episodes.
        test_episodes: number of fixed test episodes (600 in the paper's protocol).
        eval_meta_batch: episodes per validation / test batch.
        seed: seed of the training episode stream.
        eval_seed: seed of the validation and test episodes.
        disjoint: support and query images distinct (``False``: the paper's public
            sampler, in which a query image may repeat a support image).
        num_workers: data-loader worker processes (sampling is cheap; 0 is usually best).
        train_ways: classes per training episode when not ``ways`` (``None``: ``ways``);
            training with more ways than testing is a common way to get harder episodes.
        train_shots: support images per class in training (``None``: ``shots``).
        device_sampling: keep each split's uint8 images on the training device and gather
            meta-batches there (no image copy from the host per step, no workers):
            ``"auto"`` (on when training on a GPU), ``True`` or ``False``. Episode content
            is identical either way: the random picks are drawn on the host.
        augment: random crop and horizontal flip of training images (off by default; the
            paper used none), per meta-batch on its device in
            :meth:`on_after_batch_transfer`, reproducibly (see
            :func:`~metalearn.data.augment.augment_episodes`); validation and test
            episodes are never augmented.
        augment_padding: zero padding of the random crop, in pixels.
        augment_flip: flip horizontally with probability 1/2 (when ``augment``).
    """

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        meta_batch: int = 4,
        val_episodes: int = 600,
        test_episodes: int = 600,
        eval_meta_batch: int = 50,
        seed: int = 0,
        eval_seed: int = 0,
        disjoint: bool = True,
        num_workers: int = 0,
        train_ways: int | None = None,
        train_shots: int | None = None,
        device_sampling: bool | str = "auto",
        augment: bool = False,
        augment_padding: int = 8,
        augment_flip: bool = True,
    ) -> None:
        super().__init__()
        if augment_padding < 0:
            raise ConfigError(f"data.augment_padding must be >= 0, got {augment_padding}")
        if device_sampling not in (True, False, "auto"):
            raise ConfigError(
                f"data.device_sampling must be true, false or auto, got {device_sampling!r}"
            )
        check_episode_geometry(ways, shots, query_shots)
        #: The settings behind the training episodes' geometry, named in errors.
        self.train_keys = (
            "data.train_ways" if train_ways else "data.ways",
            "data.train_shots" if train_shots else "data.shots",
            "data.query_shots",
        )
        #: The settings behind the evaluation geometry (evaluate.py names its own).
        self.eval_keys: tuple[str, str, str] = DATA_KEYS
        check_episode_geometry(
            train_ways or ways, train_shots or shots, query_shots, self.train_keys
        )
        for name, value in (
            ("meta_batch", meta_batch),
            ("val_episodes", val_episodes),
            ("test_episodes", test_episodes),
            ("eval_meta_batch", eval_meta_batch),
        ):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.meta_batch, self.eval_meta_batch = meta_batch, eval_meta_batch
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.seed, self.eval_seed, self.disjoint = seed, eval_seed, disjoint
        self.num_workers = num_workers
        self.train_ways, self.train_shots = train_ways or ways, train_shots or shots
        self.device_sampling = device_sampling
        self.augment, self.augment_padding, self.augment_flip = (
            augment,
            augment_padding,
            augment_flip,
        )
        self.samplers: dict[str, EpisodeSampler] = {}

    # -- to implement -------------------------------------------------------------------
    def load_splits(self) -> Mapping[str, Tensor | ClassImages]:
        """Return ``{"train", "val", "test"}`` -> uint8 (classes, per_class, C, H, W) or
        :class:`~metalearn.data.storage.ClassImages` (classes of different sizes)."""
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: which DataModule class trained the model (evaluate.py
        rebuilds it from this and the saved hyperparameters)."""
        return {"target": f"{type(self).__module__}.{type(self).__qualname__}"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the episode stream is a function of the global step."""

    def sampling_device(self) -> torch.device:
        """Where meta-batches are gathered: the training device with device sampling."""
        trainer = self.trainer
        if self.device_sampling is False or trainer is None:
            return torch.device("cpu")
        device = trainer.strategy.root_device
        if self.device_sampling == "auto" and device.type != "cuda":
            return torch.device("cpu")
        return device

    def setup(self, stage: str | None = None) -> None:
        """Build the episode samplers of the splits the stage uses, checking the episode
        geometry against each: every split for ``fit`` (a training run also tests), only
        ``test`` for ``test`` and only ``val`` for ``validate``."""
        device = self.sampling_device()
        if self.samplers:
            for sampler in self.samplers.values():
                sampler.images = sampler.images.to(device)
            return
        needed = {"test": ("test",), "validate": ("val",)}.get(stage or "fit", SPLIT_NAMES)
        self.use_splits(
            {name: images for name, images in self.load_splits().items() if name in needed}
        )

    def use_splits(self, splits: Mapping[str, Tensor | ClassImages]) -> None:
        """Sample episodes of this module's geometry from already loaded splits (another
        module's ``loaded_splits``, so that several test geometries read the data once)."""
        device = self.sampling_device()
        for split, images in splits.items():
            training = split == "train"
            self.samplers[split] = EpisodeSampler(
                images.to(device),
                self.train_ways if training else self.ways,
                self.train_shots if training else self.shots,
                self.query_shots,
                self.seed if training else self.eval_seed,
                split,
                self.disjoint,
                self.train_keys if training else self.eval_keys,
            )

    @property
    def loaded_splits(self) -> dict[str, Tensor | ClassImages]:
        """Split name -> the uint8 images of every split set up so far."""
        return {split: sampler.images for split, sampler in self.samplers.items()}

    def _loader(self, dataset: torch.utils.data.Dataset) -> DataLoader:
        on_host = self.sampling_device().type == "cpu"
        workers = self.num_workers if on_host else 0  # device tensors stay in this process
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=on_host and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        max_steps = trainer.max_steps if trainer is not None else -1
        end = None if max_steps is None or max_steps < 0 else max_steps
        stream = TrainEpisodes(self.samplers["train"], self.meta_batch, start, end, *self._rank())
        return self._loader(stream)

    def _fixed(self, split: str, episodes: int) -> DataLoader:
        return self._loader(
            FixedEpisodes(self.samplers[split], episodes, self.eval_meta_batch, *self._rank())
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if (
            self.augment
            and trainer is not None
            and trainer.training
            and isinstance(batch, EpisodeBatch)
        ):
            return augment.augment_episodes(
                batch, self.seed, self.augment_padding, self.augment_flip
            )
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._fixed("val", self.val_episodes)

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.test_episodes)


def with_rotations(images: Tensor, rotations: bool) -> Tensor:
    """(n, per_class, H, W) -> (4n, per_class, 1, H, W): class 4c + k is character c turned k·90°."""
    if not rotations:
        return images.unsqueeze(2)
    turned = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)], dim=1)
    return turned.flatten(0, 1).unsqueeze(2).contiguous()


class OmniglotDataModule(EpisodicDataModule):
    """Omniglot episodes (28x28, ink = 1, characters x 4 rotations as classes).

    Reads the official layout under ``<data_dir>/omniglot/omniglot-py/`` (zips or folders),
    downloading the official zips in :meth:`prepare_data` when absent and ``download`` is
    set, and decodes it once into a uint8 cache under ``cache_dir``.

    Args:
        data_dir: data root (``paths.data_dir``).
        cache_dir: where the decoded uint8 cache is written (``paths.cache_dir``).
        split: ``paper`` (1623 characters shuffled with seed 0: 1200 / 100 / 323),
            ``vinyals`` (1028 / 172 / 423, from ``split_dir``) or ``lake`` (background
            alphabets for training and validation, evaluation alphabets for test).
        split_dir: folder with the Vinyals ``{train,val,test}.json`` files.
        image_size: side of the resized images.
        rotations: add the 90°, 180° and 270° rotations as distinct classes.
        download: download the official zips when the data set is absent.
        expected_characters: characters per collection, when not the official 964 / 659
            (small generated copies in tests).
        **kwargs: episode geometry and loaders, see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        cache_dir: str | Path = ".cache",
        split: str = "paper",
        split_dir: str | Path | None = None,
        image_size: int = 28,
        rotations: bool = True,
        download: bool = True,
        expected_characters: dict[str, int] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if split not in OMNIGLOT_SPLITS:
            raise ConfigError(
                f"unknown Omniglot split {split!r}: choose one of {', '.join(OMNIGLOT_SPLITS)}"
            )
        self.save_hyperparameters()
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.split, self.split_dir = split, split_dir
        self.image_size, self.rotations, self.download = image_size, rotations, download
        # A plain dict, not Hydra's DictConfig: hyperparameters go into checkpoints.
        self.expected_characters = dict(expected_characters) if expected_characters else None
        self.characters: OmniglotCharacters | None = None

    def prepare_data(self) -> None:
        prepare_omniglot(
            self.data_dir, download=self.download, expected_characters=self.expected_characters
        )

    def load_splits(self) -> dict[str, Tensor]:
        chars = load_omniglot(
            self.data_dir,
            self.cache_dir,
            self.image_size,
            download=False,
            expected_characters=self.expected_characters,
        )
        self.characters = chars
        index = split_characters(chars.names, self.split, self.split_dir)
        return {
            name: with_rotations(chars.images[torch.from_numpy(index[name])], self.rotations)
            for name in SPLIT_NAMES
        }


class FolderDataModule(EpisodicDataModule):
    """Episodes from a folder of images of your own (``data=folder``), see
    :mod:`metalearn.data.sets.folder` for the three layouts.

    Images are decoded once (in parallel, with a progress bar) into a uint8 cache under
    ``cache_dir`` keyed by the files and the preprocessing, and read memory-mapped, so a
    split need not fit in RAM. Classes may hold different numbers of images.

    Args:
        root: the folder of the images.
        split_file: JSON ``{"train": [class, ...], "val": [...], "test": [...]}``.
        csv_dir: folder of ``train.csv``, ``val.csv``, ``test.csv`` (``filename,label``).
        image_size: side of the images after resizing.
        channels: 1 (grayscale) or 3 (RGB).
        invert: invert the images (dark strokes on white become bright, as Omniglot is read).
        resample: the resizing filter (PIL's): bilinear, box, bicubic, lanczos, nearest.
        min_images_per_class: drop classes with fewer images, with a warning (None: keep
            all; a class too small for an episode is then an error naming it).
        cache_dir: where the decoded cache is written (``paths.cache_dir``).
        decode_workers: threads decoding images.
        progress: show a progress bar while decoding.
        **kwargs: episode geometry and loaders, see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path | None = None,
        csv_dir: str | Path | None = None,
        image_size: int = 84,
        channels: int = 3,
        invert: bool = False,
        resample: Resample = "bilinear",
        min_images_per_class: int | None = None,
        cache_dir: str | Path = ".cache",
        decode_workers: int = 4,
        progress: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        if image_size < 1:
            raise ConfigError(f"data.image_size must be >= 1, got {image_size}")
        if split_file is not None and csv_dir is not None:
            raise ConfigError("give data.split_file or data.csv_dir, not both")
        self.save_hyperparameters()
        self.root, self.split_file, self.csv_dir = Path(root), split_file, csv_dir
        self.image_size, self.channels = image_size, channels
        self.invert, self.resample = invert, resample
        self.min_images_per_class = min_images_per_class
        self.cache_dir, self.decode_workers, self.progress = (
            Path(cache_dir),
            decode_workers,
            progress,
        )

    def load_splits(self) -> dict[str, Tensor | ClassImages]:
        splits = find_classes(self.root, self.split_file, self.csv_dir)
        decode = partial(
            decode_image,
            image_size=self.image_size,
            channels=self.channels,
            invert=self.invert,
            resample=self.resample,
        )
        shape = (self.channels, self.image_size, self.image_size)
        out: dict[str, Tensor | ClassImages] = {}
        for split, classes in splits.items():
            if self.min_images_per_class:
                small = [name for name, files in classes if len(files) < self.min_images_per_class]
                if small:
                    log.warning(
                        "data.min_images_per_class=%d: dropping %d %s classes (%s)",
                        self.min_images_per_class,
                        len(small),
                        split,
                        ", ".join(small[:5]) + (", ..." if len(small) > 5 else ""),
                    )
                classes = [c for c in classes if len(c[1]) >= self.min_images_per_class]
                if not classes:
                    raise ConfigError(
                        f"data.min_images_per_class={self.min_images_per_class} leaves no "
                        f"{split} class"
                    )
            files = [path for _, paths in classes for path in paths]
            key = {
                "root": str(self.root.resolve()),
                "files": file_listing(files, self.root),
                "names": [name for name, _ in classes],
                "image_size": self.image_size,
                "channels": self.channels,
                "invert": self.invert,
                "resample": self.resample,
            }
            out[split] = cached_class_images(
                self.cache_dir,
                f"folder_{split}",
                key,
                classes,
                shape,
                decode,
                self.progress,
                self.decode_workers,
            )
        return out


class MiniImageNetDataModule(EpisodicDataModule):
    """miniImageNet episodes (84x84 RGB, Ravi & Larochelle split: 64 / 16 / 20 classes).

    Reads ``<data_dir>/miniimagenet/`` (pickles or CSVs + images, see the module docstring),
    downloading the pickles of absent splits from a public mirror in :meth:`prepare_data`
    when ``download`` is set, and decodes each split once into a uint8 cache under
    ``cache_dir`` (also in :meth:`prepare_data`, which runs on one process only).

    Args:
        data_dir: data root (``paths.data_dir``).
        cache_dir: where the decoded uint8 cache is written (``paths.cache_dir``).
        split: ``"ravi"``, the only split (Ravi & Larochelle 2017), for reports.
        image_size: side of the images (84).
        download: download the pickles of absent splits.
        urls: split -> pickle URL (None: :data:`MINIIMAGENET_URLS`).
        sha256: split -> expected SHA-256 of a download (None: :data:`MINIIMAGENET_SHA256`).
        expected_classes: classes per split when not 64 / 16 / 20 (small copies in tests).
        images_per_class: images per class of a complete copy (600).
        **kwargs: episode geometry, loaders and augmentation, see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        cache_dir: str | Path = ".cache",
        split: str = "ravi",
        image_size: int = IMAGE_SIZE,
        download: bool = True,
        urls: Mapping[str, str] | None = None,
        sha256: Mapping[str, str | None] | None = None,
        expected_classes: Mapping[str, int] | None = None,
        images_per_class: int = IMAGES_PER_CLASS,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if split != "ravi":
            raise ConfigError(f"unknown miniImageNet split {split!r}: the only one is 'ravi'")
        if image_size < 1 or images_per_class < 1:
            raise ConfigError(
                f"data.image_size and data.images_per_class must be >= 1, got {image_size}, "
                f"{images_per_class}"
            )
        # Plain dicts, not Hydra's DictConfig: the hyperparameters go into checkpoints,
        # which torch.load(weights_only=True) reads back.
        urls = dict(urls) if urls is not None else None
        sha256 = dict(sha256) if sha256 is not None else None
        expected_classes = dict(expected_classes) if expected_classes is not None else None
        self.save_hyperparameters()
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.split, self.image_size, self.download = split, image_size, download
        self.urls, self.sha256, self.expected_classes = urls, sha256, expected_classes
        self.images_per_class = images_per_class
        self.classes: dict[str, list[str]] = {}

    def _load(self, download: bool) -> dict[str, MiniImageNetSplit]:
        return load_miniimagenet(
            self.data_dir,
            self.cache_dir,
            self.image_size,
            download=download,
            expected_classes=self.expected_classes,
            images_per_class=self.images_per_class,
            urls=self.urls,
            sha256=self.sha256,
        )

    def prepare_data(self) -> None:
        self._load(self.download)  # downloads what is absent and writes the caches

    def load_splits(self) -> dict[str, Tensor]:
        splits = self._load(download=False)
        self.classes = {name: split.classes for name, split in splits.items()}
        return {name: split.images for name, split in splits.items()}


#: The benchmarks of :class:`BenchmarkDataModule`: name -> (reader, the function that only
#: fetches and checks the files when reading them builds nothing to keep, default side).
BENCHMARKS: dict[str, tuple[str, str | None, int]] = {
    "tieredimagenet": ("metalearn.data.sets.tieredimagenet:load_tieredimagenet", None, 84),
    "cifar_fs": ("metalearn.data.sets.cifar:load_cifar_fs", "prepare_cifar100", 32),
    "fc100": ("metalearn.data.sets.cifar:load_fc100", "prepare_cifar100", 32),
    "cub": ("metalearn.data.sets.cub:load_cub", None, 84),
}

#: The class split each benchmark ships (named in reports).
BENCHMARK_SPLITS = {
    "tieredimagenet": "ren2018",
    "cifar_fs": "bertinetto2019",
    "fc100": "oreshkin2018",
    "cub": "chen2019",
}


class BenchmarkDataModule(EpisodicDataModule):
    """Episodes of a standard few-shot benchmark read by its own reader in
    :mod:`metalearn.data.sets`, with the class split shipped in ``metalearn/data/splits/``:
    ``tieredimagenet`` (Ren et al. 2018, 351 / 97 / 160 classes, 84x84), ``cifar_fs``
    (Bertinetto et al. 2019, 64 / 16 / 20 CIFAR-100 classes, 32x32), ``fc100`` (Oreshkin et
    al. 2018, 60 / 20 / 20 classes of 12 / 4 / 4 superclasses, 32x32) and ``cub``
    (CUB-200-2011 with the split of Chen et al. 2019, 100 / 50 / 50 classes, 84x84).

    :meth:`prepare_data` (one process) downloads the data set where an official archive
    exists (CIFAR-100, CUB) and ``download`` is set; tieredImageNet and CUB are decoded
    there once into the shared uint8 cache under ``cache_dir`` and read memory-mapped.
    CIFAR-100 is read straight from its archive (180 MB of uint8), with no cache. Without
    an official host (tieredImageNet) a missing copy is an error saying where to get it
    and where to put it.

    Args:
        name: one of :data:`BENCHMARKS`.
        data_dir: data root (``paths.data_dir``); each reader names its folder in it.
        cache_dir: where the decoded uint8 cache is written (``paths.cache_dir``).
        image_size: side of the images (None: the benchmark's own, 84 or 32).
        download: download an absent copy where an official archive exists.
        progress: show progress bars while downloading and decoding.
        options: more keyword arguments of the reader (small copies in tests, e.g.
            CIFAR's ``images_per_class``).
        **kwargs: episode geometry, loaders and augmentation, see
            :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        name: str,
        data_dir: str | Path = "data",
        cache_dir: str | Path = ".cache",
        image_size: int | None = None,
        download: bool = True,
        progress: bool = True,
        options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if name not in BENCHMARKS:
            raise ConfigError(f"unknown data.name={name!r}: choose one of {', '.join(BENCHMARKS)}")
        reader, preparer, default_size = BENCHMARKS[name]
        if image_size is not None and image_size < 1:
            raise ConfigError(f"data.image_size must be >= 1, got {image_size}")
        # A plain dict, not Hydra's DictConfig: hyperparameters go into checkpoints.
        options = {key: value for key, value in (options or {}).items()}
        self.save_hyperparameters()
        self.name, self.options = name, options
        self.split = BENCHMARK_SPLITS[name]
        self.module, self.function = reader.split(":")
        self.preparer = preparer
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.image_size = image_size or default_size
        self.download, self.progress = download, progress

    def _load(self, download: bool) -> dict[str, ClassImages]:
        load = getattr(importlib.import_module(self.module), self.function)
        splits: dict[str, ClassImages] = load(
            self.data_dir,
            self.cache_dir,
            self.image_size,
            download=download,
            progress=self.progress,
            **self.options,
        )
        return splits

    def prepare_data(self) -> None:
        if self.preparer is None:
            self._load(self.download)  # downloads what is absent and writes the cache
        else:
            prepare = getattr(importlib.import_module(self.module), self.preparer)
            prepare(self.data_dir, download=self.download, progress=self.progress)

    def load_splits(self) -> dict[str, Tensor | ClassImages]:
        return dict(self._load(download=False))
