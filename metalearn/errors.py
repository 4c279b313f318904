"""Exceptions raised before training starts, each carrying a one-line, actionable message."""

from __future__ import annotations

__all__ = ["MetalearnError", "ConfigError", "DataError"]


class MetalearnError(Exception):
    """Base class of the errors that metalearn raises for user mistakes.

    The entry points catch it and print the message as a single line (no traceback),
    then exit with a non-zero status.
    """


class ConfigError(MetalearnError, ValueError):
    """An impossible or unknown configuration value (ways, shots, split name, ...)."""


class DataError(MetalearnError, RuntimeError):
    """A data set is missing, incomplete, corrupt or cannot be downloaded."""
