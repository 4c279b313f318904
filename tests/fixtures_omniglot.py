"""Test helpers for Omniglot: tiny generated copies in the official layout, real-data paths."""

from __future__ import annotations

import io
import os
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from metalearn.data.sets.omniglot import OMNIGLOT_COLLECTIONS, omniglot_root

__all__ = [
    "fixture_expected_characters",
    "fixture_names",
    "make_omniglot_fixture",
    "real_data_dir",
    "shared_cache_dir",
]


def _alphabet_names(count: int) -> list[str]:
    """Alphabet folder names, generated in reverse order so that sorting is exercised."""
    if not 0 < count <= 26:
        raise ValueError(f"a fixture collection holds 1 to 26 alphabets, got {count}")
    return [f"Alphabet_{chr(ord('A') + count - 1 - i)}" for i in range(count)]


def fixture_expected_characters(
    alphabets_per_collection: Sequence[int] = (3, 2), characters_per_alphabet: int = 4
) -> dict[str, int]:
    """The ``expected_characters`` mapping that matches :func:`make_omniglot_fixture`."""
    return {
        collection: alphabets * characters_per_alphabet
        for collection, alphabets in zip(
            OMNIGLOT_COLLECTIONS, alphabets_per_collection, strict=True
        )
    }


def fixture_names(
    alphabets_per_collection: Sequence[int] = (3, 2), characters_per_alphabet: int = 4
) -> list[tuple[str, str, str]]:
    """The character names of a fixture, in the order the loader must return them."""
    return [
        (collection, alphabet, f"character{k + 1:02d}")
        for collection, alphabets in zip(
            OMNIGLOT_COLLECTIONS, alphabets_per_collection, strict=True
        )
        for alphabet in sorted(_alphabet_names(alphabets))
        for k in range(characters_per_alphabet)
    ]


def _draw_character(seed: int, drawer: int, size: int) -> bytes:
    """One 1-bit PNG: black strokes on white, the same shape per character, jittered per drawer.

    Every character has a solid block of at least 30x30 source pixels, so the 28x28 version
    always has pixels of full ink (255).
    """
    shape = random.Random(seed)
    jitter = random.Random(seed * 1000 + drawer)
    scale = size / 105.0

    def at(x: float, y: float) -> tuple[int, int]:
        dx, dy = jitter.randint(-2, 2), jitter.randint(-2, 2)
        return round(x * scale + dx), round(y * scale + dy)

    image = Image.new("1", (size, size), 1)
    pen = ImageDraw.Draw(image)
    x0, y0 = shape.randint(10, 55), shape.randint(10, 55)
    side = shape.randint(30, 40)
    pen.rectangle([at(x0, y0), at(x0 + side, y0 + side)], fill=0)
    for _ in range(shape.randint(2, 4)):
        points = [at(shape.randint(5, 100), shape.randint(5, 100)) for _ in range(3)]
        pen.line(points, fill=0, width=max(1, round(shape.randint(2, 5) * scale)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_omniglot_fixture(
    root: Path,
    alphabets_per_collection: Sequence[int] = (3, 2),
    characters_per_alphabet: int = 4,
    images_per_character: int = 20,
    as_zip: bool = True,
    size: int = 105,
) -> Path:
    """Write a tiny generated Omniglot in the official layout under ``root/omniglot/omniglot-py``.

    Each collection becomes ``<collection>.zip`` (entries ``<collection>/<Alphabet>/
    characterNN/IIII_DD.png`` plus directory entries, in shuffled order) or, with
    ``as_zip=False``, the extracted folder ``<collection>/``. Images are ``size x size``,
    1-bit, white background, black ink; the content is deterministic.

    Args:
        root: The data folder to create the copy in.
        alphabets_per_collection: Alphabets in images_background and images_evaluation.
        characters_per_alphabet: Characters (``character01``...) per alphabet.
        images_per_character: PNGs per character (the loader requires 20).
        as_zip: Write zips rather than extracted folders.
        size: Side of the PNGs in pixels.

    Returns:
        ``root``, to be passed as ``data_dir``.
    """
    target = omniglot_root(root)
    target.mkdir(parents=True, exist_ok=True)
    seed = 0
    for collection, alphabets in zip(OMNIGLOT_COLLECTIONS, alphabets_per_collection, strict=True):
        files: dict[str, bytes] = {}
        for alphabet in _alphabet_names(alphabets):
            for k in range(characters_per_alphabet):
                seed += 1
                folder = f"{collection}/{alphabet}/character{k + 1:02d}"
                for drawer in range(images_per_character):
                    name = f"{folder}/{seed:04d}_{drawer + 1:02d}.png"
                    files[name] = _draw_character(seed, drawer, size)
        if as_zip:
            _write_zip(target / f"{collection}.zip", files)
        else:
            for name, data in files.items():
                path = target / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return root


def _write_zip(path: Path, files: dict[str, bytes]) -> None:
    folders = sorted({name.rsplit("/", i)[0] + "/" for name in files for i in (1, 2, 3)})
    members = list(files)
    random.Random(path.name).shuffle(members)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for folder in folders:
            archive.writestr(folder, b"")
        for name in members:
            archive.writestr(name, files[name])


def real_data_dir() -> Path | None:
    """The data folder holding the real Omniglot, or None when there is none.

    ``METALEARN_DATA_DIR`` when set and it holds ``omniglot/omniglot-py``, else the shared
    read-only copy ``../shared/data`` next to the repository.
    """
    candidates = []
    if os.environ.get("METALEARN_DATA_DIR"):
        candidates.append(Path(os.environ["METALEARN_DATA_DIR"]).expanduser())
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for candidate in candidates:
        if omniglot_root(candidate).is_dir():
            return candidate
    return None


def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache folder for the real data: ``METALEARN_CACHE_DIR`` when set, else a session temp."""
    if os.environ.get("METALEARN_CACHE_DIR"):
        path = Path(os.environ["METALEARN_CACHE_DIR"]).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("omniglot-cache")
