"""Data sets, splits, episode sampling and DataModules."""

from metalearn.data.datamodule import EpisodicDataModule, OmniglotDataModule
from metalearn.data.episodes import EpisodeBatch, EpisodeSampler, FixedEpisodes, TrainEpisodes
from metalearn.data.omniglot import (
    OmniglotCharacters,
    load_omniglot,
    load_omniglot_image,
    prepare_omniglot,
    split_characters,
)

__all__ = [
    "EpisodeBatch",
    "EpisodeSampler",
    "EpisodicDataModule",
    "FixedEpisodes",
    "OmniglotCharacters",
    "OmniglotDataModule",
    "TrainEpisodes",
    "load_omniglot",
    "load_omniglot_image",
    "prepare_omniglot",
    "split_characters",
]
