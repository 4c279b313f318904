"""When a finite loss counts as diverging (one rule for the Lightning learners and the HPO runs)."""

from __future__ import annotations

import math

__all__ = ["DIVERGENCE_FACTOR", "diverging"]

#: A loss this many times the loss of a chance-level prediction (log N for N classes, the
#: loss of a zero linear head) is reported as diverging. A learning run starts near it and
#: goes down; a too-large inner learning rate drives the loss to 1e2..1e6 within steps.
DIVERGENCE_FACTOR = 10.0


def diverging(chance: float, value: float) -> bool:
    """Whether the loss ``value`` exceeds :data:`DIVERGENCE_FACTOR` times ``chance``, the
    loss of a chance-level prediction (or is inf / NaN)."""
    return not math.isfinite(value) or value > DIVERGENCE_FACTOR * chance
