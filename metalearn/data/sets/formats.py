"""File formats shared by several data sets' distributions."""

from __future__ import annotations

import functools
import importlib.resources
import json
import pickle
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from metalearn.data.download import one_line
from metalearn.data.storage import SPLIT_NAMES
from metalearn.errors import DataError

__all__ = ["ArrayUnpickler", "load_array_pickle", "packaged_split"]

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


@functools.cache
def _read_packaged(name: str) -> tuple[str, Any]:
    resource = importlib.resources.files("metalearn.data") / "splits" / f"{name}.json"
    try:
        return str(resource), json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read the split file {resource} ({one_line(err)}); reinstall metalearn"
        ) from err


def packaged_split(name: str, expected: Mapping[str, int]) -> tuple[str, dict[str, Any]]:
    """The split file ``metalearn/data/splits/<name>.json`` shipped with the package (a
    ``source`` entry citing where its class lists come from, one list of classes per split,
    other entries a reader may use), checked for ``expected`` classes per split, each
    class in one split only.

    Returns:
        The file's location (for messages) and its content.

    Raises:
        DataError: the file is unreadable or its lists are not as expected (a damaged
            installation: reinstall).
    """
    where, payload = _read_packaged(name)
    seen: set[str] = set()
    for split in SPLIT_NAMES:
        classes = payload.get(split) if isinstance(payload, dict) else None
        if not isinstance(classes, list) or len(classes) != expected[split]:
            raise DataError(
                f"the split file {where} does not list {expected[split]} {split} classes; "
                f"reinstall metalearn"
            )
        if seen & set(classes) or len(set(classes)) != len(classes):
            raise DataError(f"the split file {where} lists a class twice; reinstall metalearn")
        seen |= set(classes)
    return where, payload
