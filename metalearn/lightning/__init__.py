"""Lightning glue: the LightningModule that joins backbone, bilevel core and episodes."""

from metalearn.lightning.module import BatchStats, HyperRepresentation, InverseTimeDecay, mean_ci95

__all__ = ["BatchStats", "HyperRepresentation", "InverseTimeDecay", "mean_ci95"]
