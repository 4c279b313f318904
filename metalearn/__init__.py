"""metalearn: bilevel programming for hyperparameter optimization and meta-learning.

Franceschi et al., "Bilevel Programming for Hyperparameter Optimization and Meta-Learning",
ICML 2018. ``metalearn.bilevel`` holds the math, ``metalearn.data`` the episodes,
``metalearn.models`` the representations, ``metalearn.lightning`` the training glue.
"""

from metalearn.checkpoint import load_representation
from metalearn.errors import ConfigError, DataError, MetalearnError

__all__ = ["load_representation", "ConfigError", "DataError", "MetalearnError", "__version__"]

__version__ = "0.1.0"
