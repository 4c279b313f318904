"""Lightning glue: LightningModules that join backbone, bilevel core and episodes.

One learner per file, each an :class:`EpisodicModule` (``episodic.py``: the backbone, the
outer optimizer, the training step and the evaluation protocol they share):

* ``linear_head.py``: :class:`HyperRepresentation`, the paper's method (per-episode linear
  heads from zero, T steps, the hypergradient through them), and :class:`ANIL`, the same
  learner with a learned head start;
* ``maml.py``: :class:`MAML`, the whole network adapted per episode
  (``inner_loop.py``: what it shares with the linear-head learner);
* ``protonet.py``: :class:`PrototypicalNetwork`, class means instead of an inner problem;
* ``classical.py``: :class:`ClassicalJointTraining`, no inner/outer split (the paper's
  Sec. 4.3).

``algorithm=hyper_representation|anil|maml|protonet|classical`` chooses one.
"""

from metalearn.lightning.callbacks import (
    AtomicCheckpointIO,
    BestCheckpoint,
    EpisodeRate,
    InnerStepCurve,
    ResumeCheckpoint,
    StepProgressBar,
)
from metalearn.lightning.classical import ClassicalJointTraining
from metalearn.lightning.episodic import (
    BatchStats,
    EpisodicModule,
    InverseTimeDecay,
    TrainingDiverged,
)
from metalearn.lightning.linear_head import ANIL, HyperRepresentation
from metalearn.lightning.maml import MAML
from metalearn.lightning.protonet import PrototypicalNetwork

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
