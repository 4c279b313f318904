"""Lightning glue: LightningModules that join backbone, bilevel core and episodes."""

from metalearn.lightning.callbacks import (
    AtomicCheckpointIO,
    EpisodeRate,
    InnerStepCurve,
    ResumeCheckpoint,
)
from metalearn.lightning.episodic import (
    BatchStats,
    EpisodicModule,
    InverseTimeDecay,
    TrainingDiverged,
)
from metalearn.lightning.module import HyperRepresentation

__all__ = [
    "AtomicCheckpointIO",
    "BatchStats",
    "EpisodeRate",
    "EpisodicModule",
    "HyperRepresentation",
    "InnerStepCurve",
    "InverseTimeDecay",
    "ResumeCheckpoint",
    "TrainingDiverged",
]
