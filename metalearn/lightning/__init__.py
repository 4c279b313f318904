"""Lightning glue: LightningModules that join backbone, bilevel core and episodes.

:class:`HyperRepresentation` is the paper's method; the baselines in the same harness
(``algorithm=protonet|maml|anil|classical``) are :class:`PrototypicalNetwork`,
:class:`MAML`, :class:`ANIL` and :class:`ClassicalJointTraining`.
"""

from metalearn.lightning.baselines import (
    ANIL,
    MAML,
    ClassicalJointTraining,
    PrototypicalNetwork,
)
from metalearn.lightning.callbacks import (
    AtomicCheckpointIO,
    BestCheckpoint,
    EpisodeRate,
    InnerStepCurve,
    ResumeCheckpoint,
    StepProgressBar,
)
from metalearn.lightning.episodic import (
    BatchStats,
    EpisodicModule,
    InverseTimeDecay,
    TrainingDiverged,
)
from metalearn.lightning.module import HyperRepresentation

__all__ = [
    "ANIL",
    "MAML",
    "AtomicCheckpointIO",
    "BatchStats",
    "BestCheckpoint",
    "ClassicalJointTraining",
    "EpisodeRate",
    "EpisodicModule",
    "HyperRepresentation",
    "InnerStepCurve",
    "InverseTimeDecay",
    "PrototypicalNetwork",
    "ResumeCheckpoint",
    "StepProgressBar",
    "TrainingDiverged",
]
