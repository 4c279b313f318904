"""Data sets, splits, episode sampling and DataModules."""

from metalearn.data.augment import augment_episodes
from metalearn.data.datamodule import (
    BENCHMARKS,
    BenchmarkDataModule,
    EpisodicDataModule,
    FolderDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
)
from metalearn.data.download import download_file
from metalearn.data.episodes import EpisodeBatch, EpisodeSampler, FixedEpisodes, TrainEpisodes
from metalearn.data.sets.miniimagenet import (
    MiniImageNetSplit,
    load_miniimagenet,
    load_miniimagenet_image,
    prepare_miniimagenet,
)
from metalearn.data.sets.mnist import MnistSet, load_mnist, mnist_root, read_idx
from metalearn.data.sets.omniglot import (
    OmniglotCharacters,
    load_omniglot,
    load_omniglot_image,
    prepare_omniglot,
    split_characters,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkDataModule",
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodicDataModule",
    "FolderDataModule",
    "FixedEpisodes",
    "MiniImageNetDataModule",
    "MiniImageNetSplit",
    "OmniglotCharacters",
    "OmniglotDataModule",
    "TrainEpisodes",
    "augment_episodes",
    "download_file",
    "load_miniimagenet",
    "load_miniimagenet_image",
    "load_omniglot",
    "load_omniglot_image",
    "prepare_miniimagenet",
    "prepare_omniglot",
    "split_characters",
    # MNIST (IDX files), for the hyperparameter-optimization experiments (metalearn.hpo)
    "MnistSet",
    "load_mnist",
    "mnist_root",
    "read_idx",
]
