"""Lightning glue: the LightningModule that joins backbone, bilevel core and episodes."""

from metalearn.lightning.callbacks import (
    AtomicCheckpointIO,
    EpisodeRate,
    InnerStepCurve,
    ResumeCheckpoint,
)
from metalearn.lightning.module import (
    BatchStats,
    HyperRepresentation,
    InverseTimeDecay,
    TrainingDiverged,
)

__all__ = [
    "AtomicCheckpointIO",
    "BatchStats",
    "EpisodeRate",
    "HyperRepresentation",
    "InnerStepCurve",
    "InverseTimeDecay",
    "ResumeCheckpoint",
    "TrainingDiverged",
]
