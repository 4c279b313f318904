"""File formats shared by several data sets' distributions."""

from __future__ import annotations

import pickle
from typing import IO, Any

import numpy as np

__all__ = ["ArrayUnpickler", "load_array_pickle"]

NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2 (a str -> bytes call)
}


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts and lists, and refuses anything else.

    A pickle can run arbitrary code when loaded; these files come from mirrors, so only
    the globals a pickled numpy array needs are allowed.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]  # numpy 2 renamed it
        return super().find_class(module, name)


def load_array_pickle(handle: IO[bytes]) -> Any:
    """Unpickle numpy arrays, dicts, lists and scalars from ``handle`` (Python 2 pickles
    too: byte strings are read as latin-1), refusing any other global.

    Raises:
        pickle.UnpicklingError: the pickle names a global outside :data:`NUMPY_GLOBALS`.
    """
    return ArrayUnpickler(handle, encoding="latin1").load()
