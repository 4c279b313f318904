"""Tests of metalearn.data.sets.omniglot: on-disk layouts, download, cache, preprocessing, splits."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures_omniglot import (
    fixture_expected_characters,
    fixture_names,
    make_omniglot_fixture,
    real_data_dir,
)
from loopback import LoopbackServer
from PIL import Image

from metalearn.data.sets import omniglot
from metalearn.data.sets.omniglot import (
    IMAGES_PER_CHARACTER,
    NUM_CHARACTERS,
    OMNIGLOT_COLLECTIONS,
    OMNIGLOT_MD5,
    OMNIGLOT_URLS,
    OmniglotCharacters,
    load_omniglot,
    load_omniglot_image,
    omniglot_root,
    prepare_omniglot,
    preprocess_omniglot,
    split_characters,
)
from metalearn.errors import ConfigError, DataError

EXPECTED = fixture_expected_characters()
BACKGROUND, EVALUATION = OMNIGLOT_COLLECTIONS


def one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.npy"))


def load_fixture(data_dir: Path, cache_dir: Path, **kwargs: Any) -> OmniglotCharacters:
    kwargs.setdefault("expected_characters", EXPECTED)
    return load_omniglot(data_dir, cache_dir, download=False, progress=False, **kwargs)


class DecodeCounter:
    """Wraps preprocess_omniglot to count calls (or to fail, to prove the cache is used)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.original = omniglot.preprocess_omniglot

    def __call__(self, image: Image.Image, size: int = 28) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise AssertionError("decoded although a valid cache exists")
        return self.original(image, size)


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def test_preprocess_inverts_and_shrinks() -> None:
    white = Image.new("1", (105, 105), 1)
    black = Image.new("1", (105, 105), 0)
    assert (preprocess_omniglot(white) == 0).all()
    out = preprocess_omniglot(black)
    assert out.dtype == np.uint8 and out.shape == (28, 28) and (out == 255).all()
    half = Image.new("1", (105, 105), 1)
    half.paste(0, (0, 0, 60, 105))  # ink on columns 0-59: output columns 0-3 (15 px each)
    out = preprocess_omniglot(half, size=7)
    assert out.shape == (7, 7)
    assert (out[:, :4] == 255).all() and (out[:, 4] == 0).all() and (out[:, 5:] == 0).all()
    assert (preprocess_omniglot(Image.new("L", (40, 50), 0), size=10) == 255).all()


def test_load_omniglot_image_is_preprocess_over_255(tmp_path: Path) -> None:
    make_omniglot_fixture(tmp_path, as_zip=False)
    png = next(omniglot_root(tmp_path).rglob("*.png"))
    image = load_omniglot_image(png)
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    with Image.open(png) as raw:
        expected = torch.from_numpy(preprocess_omniglot(raw)).float() / 255
    assert torch.equal(image[0], expected)
    assert image.min() >= 0.0 and image.max() <= 1.0
    with pytest.raises(DataError) as err:
        load_omniglot_image(tmp_path / "missing.png")
    assert "missing.png" in one_line(err)


# --------------------------------------------------------------------------------------
# Generated fixture: layouts and cache
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_load_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_zip: bool) -> None:
    data_dir = make_omniglot_fixture(tmp_path / "data", as_zip=as_zip)
    cache_dir = tmp_path / "cache" / "nested"  # created on demand
    chars = load_fixture(data_dir, cache_dir)
    assert chars.images.shape == (20, IMAGES_PER_CHARACTER, 28, 28)
    assert chars.images.dtype == torch.uint8
    assert chars.names == fixture_names() and len(chars) == 20
    assert chars.names[0] == (BACKGROUND, "Alphabet_A", "character01")
    # ink bright, background 0, full-ink pixels present (each character has a solid block)
    assert int(chars.images.max()) == 255
    assert (chars.images == 0).float().mean() > 0.5
    assert not torch.equal(chars.images[0], chars.images[1])
    # the cache is one file, reused without decoding
    [cache] = cache_files(cache_dir)
    mtime = cache.stat().st_mtime_ns
    monkeypatch.setattr(omniglot, "preprocess_omniglot", DecodeCounter(fail=True))
    again = load_fixture(data_dir, cache_dir)
    assert torch.equal(again.images, chars.images) and again.names == chars.names
    assert cache_files(cache_dir) == [cache] and cache.stat().st_mtime_ns == mtime
    # one entry (images and index), no temporary file left behind
    assert sorted(cache_dir.iterdir()) == [cache.with_suffix(".json"), cache]
    # nothing was written into the data folder
    assert not any(p.name.startswith(".") for p in omniglot_root(data_dir).rglob("*"))


def test_zip_and_folder_decode_identically(tmp_path: Path) -> None:
    from_zip = load_fixture(make_omniglot_fixture(tmp_path / "z"), tmp_path / "cache")
    from_dir = load_fixture(make_omniglot_fixture(tmp_path / "d", as_zip=False), tmp_path / "cache")
    assert torch.equal(from_zip.images, from_dir.images) and from_zip.names == from_dir.names
    assert len(cache_files(tmp_path / "cache")) == 2


def test_images_ordered_by_file_name(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path, as_zip=False)
    chars = load_fixture(data_dir, tmp_path / "cache")
    collection, alphabet, character = chars.names[5]
    pngs = sorted((omniglot_root(data_dir) / collection / alphabet / character).glob("*.png"))
    for j in (0, 7, 19):
        expected = load_omniglot_image(pngs[j])
        assert torch.equal(chars.images[5, j].float().div(255)[None], expected)


def test_cache_rebuilt_when_zip_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = make_omniglot_fixture(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    first = load_fixture(data_dir, cache_dir)
    archive = omniglot_root(data_dir) / f"{EVALUATION}.zip"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    counter = DecodeCounter()
    monkeypatch.setattr(omniglot, "preprocess_omniglot", counter)
    second = load_fixture(data_dir, cache_dir)
    assert counter.calls == 20 * IMAGES_PER_CHARACTER
    assert torch.equal(first.images, second.images)
    assert len(cache_files(cache_dir)) == 2
    load_fixture(data_dir, cache_dir)
    assert counter.calls == 20 * IMAGES_PER_CHARACTER  # the new cache is reused


def test_cache_rebuilt_when_folder_changes(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path / "data", as_zip=False)
    cache_dir = tmp_path / "cache"
    first = load_fixture(data_dir, cache_dir)
    assert int(first.images[0, 0].max()) == 255
    _, alphabet, character = first.names[0]
    png = min((omniglot_root(data_dir) / BACKGROUND / alphabet / character).glob("*.png"))
    Image.new("1", (105, 105), 1).save(png)  # a blank page: no ink at all
    second = load_fixture(data_dir, cache_dir)
    assert int(second.images[0, 0].max()) == 0
    assert torch.equal(second.images[1:], first.images[1:])
    assert len(cache_files(cache_dir)) == 2


def test_cache_depends_on_image_size(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path / "data")
    small = load_fixture(data_dir, tmp_path / "cache", image_size=14)
    assert small.images.shape == (20, IMAGES_PER_CHARACTER, 14, 14)
    load_fixture(data_dir, tmp_path / "cache")
    assert len(cache_files(tmp_path / "cache")) == 2
    with pytest.raises(ConfigError):
        load_fixture(data_dir, tmp_path / "cache", image_size=0)


def test_corrupt_cache_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = make_omniglot_fixture(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    # a copy: the loaded images are mapped from the file this test truncates in place
    first = load_fixture(data_dir, cache_dir).images.clone()
    [cache] = cache_files(cache_dir)
    for garbage in (b"not an npy file", cache.read_bytes()[:1000]):
        cache.write_bytes(garbage)
        with caplog.at_level(logging.WARNING):
            again = load_fixture(data_dir, cache_dir)
        assert torch.equal(again.images, first)
        assert "Ignoring the unusable Omniglot cache" in caplog.text
        assert cache.stat().st_size > 1000
    # a readable file of the wrong shape is not trusted either, nor a damaged index
    np.save(cache, np.zeros(3, np.uint8))
    assert torch.equal(load_fixture(data_dir, cache_dir).images, first)
    cache.with_suffix(".json").write_text("[1, 2]")
    assert torch.equal(load_fixture(data_dir, cache_dir).images, first)


def test_unwritable_cache_dir(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path / "data")
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, blocker / "cache")
    message = one_line(err)
    assert str(blocker / "cache") in message and "METALEARN_CACHE_DIR" in message


def test_full_disk_for_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = make_omniglot_fixture(tmp_path / "data")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", full_disk)
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    message = one_line(err)
    assert "No space left on device" in message and str(tmp_path / "cache") in message
    assert "paths.cache_dir" in message
    assert list((tmp_path / "cache").iterdir()) == []  # no partial cache file


# --------------------------------------------------------------------------------------
# Errors on incomplete or corrupt copies
# --------------------------------------------------------------------------------------


def test_missing_root_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        prepare_omniglot(tmp_path, download=False)
    message = one_line(err)
    assert str(omniglot_root(tmp_path)) in message
    assert "METALEARN_DATA_DIR" in message and "data.download" in message
    with pytest.raises(DataError):
        load_omniglot(tmp_path, tmp_path / "cache", download=False, progress=False)
    assert not (tmp_path / "omniglot").exists()  # nothing created


def test_missing_collection_without_download(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path)
    (omniglot_root(data_dir) / f"{EVALUATION}.zip").unlink()
    with pytest.raises(DataError) as err:
        prepare_omniglot(data_dir, download=False, expected_characters=EXPECTED)
    assert EVALUATION in one_line(err) and str(omniglot_root(data_dir)) in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_zip(tmp_path: Path, damage: str) -> None:
    data_dir = make_omniglot_fixture(tmp_path)
    archive = omniglot_root(data_dir) / f"{BACKGROUND}.zip"
    content = archive.read_bytes()
    archive.write_bytes(
        {"garbage": b"<html>404</html>", "truncated": content[: len(content) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(DataError) as err:
        prepare_omniglot(data_dir, download=True, expected_characters=EXPECTED)
    message = one_line(err)
    assert str(archive) in message and "not a valid zip" in message


def test_wrong_number_of_characters(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path)
    with pytest.raises(DataError) as err:
        prepare_omniglot(data_dir, download=False)  # the official counts
    message = one_line(err)
    assert f"{BACKGROUND}.zip" in message and "12 characters" in message and "964" in message


def test_character_with_19_images_in_folder(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path, as_zip=False)
    folder = omniglot_root(data_dir) / EVALUATION / "Alphabet_B" / "character03"
    min(folder.glob("*.png")).unlink()
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    message = one_line(err)
    assert str(folder) in message and "19" in message


def test_character_with_19_images_in_zip(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path, images_per_character=19)
    with pytest.raises(DataError) as err:
        prepare_omniglot(data_dir, download=False, expected_characters=EXPECTED)
    message = one_line(err)
    assert f"{BACKGROUND}.zip:{BACKGROUND}/Alphabet_" in message and "19 PNG" in message


def test_undecodable_png_in_zip(tmp_path: Path) -> None:
    data_dir = make_omniglot_fixture(tmp_path)
    archive = omniglot_root(data_dir) / f"{EVALUATION}.zip"
    with zipfile.ZipFile(archive) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    broken = sorted(n for n in members if n.endswith(".png"))[3]
    members[broken] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50
    with zipfile.ZipFile(archive, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    with pytest.raises(DataError) as err:
        load_fixture(data_dir, tmp_path / "cache")
    assert broken in one_line(err) and str(archive) in str(err.value)
    assert cache_files(tmp_path / "cache") == []
    assert list((tmp_path / "cache").iterdir()) == []  # temporary file removed


# --------------------------------------------------------------------------------------
# Download from a loopback HTTP server
# --------------------------------------------------------------------------------------


def fixture_zips(tmp_path: Path) -> dict[str, bytes]:
    source = omniglot_root(make_omniglot_fixture(tmp_path / "upstream"))
    return {c: (source / f"{c}.zip").read_bytes() for c in OMNIGLOT_COLLECTIONS}


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_download_good_files(tmp_path: Path, server: LoopbackServer) -> None:
    zips = fixture_zips(tmp_path)
    urls = {c: server.serve(f"/{c}.zip", data) for c, data in zips.items()}
    md5 = {c: md5_of(data) for c, data in zips.items()}
    data_dir = tmp_path / "data"
    root = prepare_omniglot(data_dir, urls=urls, md5=md5, expected_characters=EXPECTED)
    assert root == omniglot_root(data_dir)
    assert sorted(p.name for p in root.iterdir()) == [f"{c}.zip" for c in OMNIGLOT_COLLECTIONS]
    for collection, data in zips.items():
        assert (root / f"{collection}.zip").read_bytes() == data
    chars = load_fixture(data_dir, tmp_path / "cache")
    reference = load_fixture(tmp_path / "upstream", tmp_path / "cache")
    assert torch.equal(chars.images, reference.images) and chars.names == reference.names
    # present now: no second download, even with progress bars on
    assert len(server.requests) == 2
    prepare_omniglot(data_dir, urls=urls, md5=md5, expected_characters=EXPECTED, progress=True)
    assert len(server.requests) == 2


def test_download_with_progress_and_skipped_md5(tmp_path: Path, server: LoopbackServer) -> None:
    zips = fixture_zips(tmp_path)
    urls = {c: server.serve(f"/{c}.zip", data) for c, data in zips.items()}
    root = prepare_omniglot(
        tmp_path / "data",
        urls=urls,
        md5={c: None for c in OMNIGLOT_COLLECTIONS},
        expected_characters=EXPECTED,
        progress=True,
    )
    assert (root / f"{EVALUATION}.zip").read_bytes() == zips[EVALUATION]


def test_download_checksum_mismatch(tmp_path: Path, server: LoopbackServer) -> None:
    zips = fixture_zips(tmp_path)
    urls = {c: server.serve(f"/{c}.zip", data) for c, data in zips.items()}
    wrong = "0" * 32
    with pytest.raises(DataError) as err:
        prepare_omniglot(
            tmp_path / "data",
            urls=urls,
            md5={BACKGROUND: wrong, EVALUATION: None},
            expected_characters=EXPECTED,
            progress=False,
        )
    message = one_line(err)
    assert "md5" in message and wrong in message and md5_of(zips[BACKGROUND]) in message
    assert "discarded" in message
    assert not (tmp_path / "data").exists()  # no file, no temp file, no folder


def test_download_default_md5_rejects_other_files(tmp_path: Path, server: LoopbackServer) -> None:
    zips = fixture_zips(tmp_path)
    urls = {c: server.serve(f"/{c}.zip", data) for c, data in zips.items()}
    with pytest.raises(DataError) as err:
        prepare_omniglot(tmp_path / "data", urls=urls, progress=False, expected_characters=EXPECTED)
    assert OMNIGLOT_MD5[BACKGROUND] in one_line(err)
    assert not (tmp_path / "data").exists()  # the data root is left as it was


def test_download_interrupted(tmp_path: Path, server: LoopbackServer) -> None:
    zips = fixture_zips(tmp_path)
    body = zips[BACKGROUND]
    urls = {
        BACKGROUND: server.serve("/bg.zip", body[: len(body) // 2], declared=len(body)),
        EVALUATION: server.serve("/ev.zip", zips[EVALUATION]),
    }
    with pytest.raises(DataError) as err:
        prepare_omniglot(
            tmp_path / "data",
            urls=urls,
            md5={c: None for c in OMNIGLOT_COLLECTIONS},  # only the length can tell
            expected_characters=EXPECTED,
            progress=False,
        )
    assert "/bg.zip" in one_line(err)
    assert not (tmp_path / "data").exists()  # the data root is left as it was


def test_download_not_a_zip(tmp_path: Path, server: LoopbackServer) -> None:
    urls = {c: server.serve(f"/{c}.zip", b"<html>moved</html>") for c in OMNIGLOT_COLLECTIONS}
    with pytest.raises(DataError) as err:
        prepare_omniglot(
            tmp_path / "data",
            urls=urls,
            md5={c: None for c in OMNIGLOT_COLLECTIONS},
            expected_characters=EXPECTED,
            progress=False,
        )
    assert "discarded" in one_line(err)
    assert not (tmp_path / "data").exists()  # the data root is left as it was


def test_download_http_error(tmp_path: Path, server: LoopbackServer) -> None:
    missing = server.serve("/elsewhere", b"")
    urls = {c: missing.replace("/elsewhere", f"/gone/{c}.zip") for c in OMNIGLOT_COLLECTIONS}
    with pytest.raises(DataError) as err:
        prepare_omniglot(tmp_path / "data", urls=urls, progress=False)
    message = one_line(err)
    assert "404" in message and "by hand" in message and urls[BACKGROUND] in message
    assert not (tmp_path / "data").exists()  # the data root is left as it was


def test_present_copy_accepted_without_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = make_omniglot_fixture(tmp_path)
    root = omniglot_root(data_dir)
    assert md5_of((root / f"{BACKGROUND}.zip").read_bytes()) != OMNIGLOT_MD5[BACKGROUND]

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tried to download a collection that is present")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert prepare_omniglot(data_dir, download=True, expected_characters=EXPECTED) == root
    chars = load_omniglot(data_dir, tmp_path / "cache", expected_characters=EXPECTED)
    assert len(chars) == 20


def test_broken_present_copy_fails_before_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = make_omniglot_fixture(tmp_path, images_per_character=19)
    (omniglot_root(data_dir) / f"{EVALUATION}.zip").unlink()

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("downloaded before checking the present copy")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DataError) as err:
        prepare_omniglot(data_dir, expected_characters=EXPECTED, progress=False)
    assert f"{BACKGROUND}.zip" in one_line(err)


def test_official_constants() -> None:
    assert set(OMNIGLOT_URLS) == set(OMNIGLOT_MD5) == set(OMNIGLOT_COLLECTIONS)
    assert all(url.endswith(f"/python/{c}.zip") for c, url in OMNIGLOT_URLS.items())
    assert sum(omniglot.OMNIGLOT_CHARACTERS.values()) == NUM_CHARACTERS


# --------------------------------------------------------------------------------------
# Splits on the fixture
# --------------------------------------------------------------------------------------


def test_paper_split_proportions_on_small_sets() -> None:
    names = fixture_names()
    parts = split_characters(names, "paper")
    assert [len(parts[k]) for k in ("train", "val", "test")] == [15, 1, 4]
    for n in (3, 4, 10):
        sizes = [len(v) for v in split_characters(fixture_names()[:n], "paper").values()]
        assert sum(sizes) == n and min(sizes) >= 1
    with pytest.raises(ConfigError) as err:
        split_characters(names[:2], "paper")
    one_line(err)


def test_lake_split_on_fixture() -> None:
    names = fixture_names()
    parts = split_characters(names, "lake", lake_val_alphabets=1)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [8, 4, 8]
    assert len({names[i][1] for i in parts["val"]}) == 1
    assert {names[i][0] for i in parts["test"]} == {EVALUATION}
    with pytest.raises(ConfigError) as err:
        split_characters(names, "lake", lake_val_alphabets=3)
    one_line(err)


def test_vinyals_split_on_fixture(tmp_path: Path) -> None:
    names = fixture_names()
    groups = {"train": names[:12], "val": names[12:14], "test": names[14:]}
    for part, chosen in groups.items():
        spec: dict[str, dict[str, list[str]]] = {}
        for collection, alphabet, character in chosen:
            group = "background" if collection == BACKGROUND else "evaluation"
            spec.setdefault(group, {}).setdefault(alphabet, []).append(character)
        (tmp_path / f"{part}.json").write_text(json.dumps(spec))
    parts = split_characters(names, "vinyals", split_dir=tmp_path)
    assert parts["train"].tolist() == list(range(12))
    assert parts["val"].tolist() == [12, 13] and parts["test"].tolist() == list(range(14, 20))
    assert all(v.dtype == np.int64 for v in parts.values())
    (tmp_path / "val.json").write_text(json.dumps({"background": {"Alphabet_A": ["character01"]}}))
    with pytest.raises(DataError) as err:
        split_characters(names, "vinyals", split_dir=tmp_path)
    one_line(err)
    (tmp_path / "test.json").unlink()
    (tmp_path / "val.json").write_text("{}")
    with pytest.raises(DataError) as err:
        split_characters(names, "vinyals", split_dir=tmp_path)
    assert str(tmp_path / "test.json") in one_line(err)


def test_split_errors(tmp_path: Path) -> None:
    names = fixture_names()
    with pytest.raises(ConfigError) as err:
        split_characters(names, "random")
    assert "'random'" in one_line(err) and "paper, vinyals, lake" in str(err.value)
    with pytest.raises(ConfigError) as err:
        split_characters(names, "vinyals")
    assert "data.split_dir" in one_line(err)
    with pytest.raises(DataError) as err:
        split_characters(names, "vinyals", split_dir=tmp_path)
    assert str(tmp_path / "train.json") in one_line(err)
    real = real_data_dir()
    if real is not None:  # the real split files name characters the fixture lacks
        with pytest.raises(DataError) as err:
            split_characters(names, "vinyals", split_dir=real / "omniglot" / "splits" / "vinyals")
        assert "not in the loaded data set" in one_line(err)


# --------------------------------------------------------------------------------------
# The real data set
# --------------------------------------------------------------------------------------


def vinyals_dir() -> Path:
    data_dir = real_data_dir()
    assert data_dir is not None
    split_dir = data_dir / "omniglot" / "splits" / "vinyals"
    if not split_dir.is_dir():
        pytest.skip(f"vinyals split files not found at {split_dir}")
    return split_dir


def test_real_data_set(real_omniglot: OmniglotCharacters) -> None:
    images, names = real_omniglot.images, real_omniglot.names
    assert images.shape == (NUM_CHARACTERS, IMAGES_PER_CHARACTER, 28, 28)
    assert images.dtype == torch.uint8 and images.shape[0] * images.shape[1] == 32_460
    assert names == sorted(names) and len(set(names)) == NUM_CHARACTERS
    assert len({(c, a) for c, a, _ in names}) == 50
    assert sum(c == BACKGROUND for c, _, _ in names) == 964
    assert names[0] == (BACKGROUND, "Alphabet_of_the_Magi", "character01")
    # ink is bright and sparse: the border is background, a few pixels are full ink
    assert images[:, :, 0, :].float().mean() < 1 and int(images.max()) == 255
    assert 10 < images.float().mean() < 40


def test_real_cache_reused(
    real_omniglot: OmniglotCharacters, real_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = real_data_dir()
    assert data_dir is not None
    monkeypatch.setattr(omniglot, "preprocess_omniglot", DecodeCounter(fail=True))
    again = load_omniglot(data_dir, real_cache_dir, download=False, progress=False)
    assert torch.equal(again.images, real_omniglot.images)


def test_real_image_matches_cache(real_omniglot: OmniglotCharacters, tmp_path: Path) -> None:
    data_dir = real_data_dir()
    assert data_dir is not None
    for index, j in ((0, 0), (1000, 7), (NUM_CHARACTERS - 1, 19)):
        collection, alphabet, character = real_omniglot.names[index]
        with zipfile.ZipFile(omniglot_root(data_dir) / f"{collection}.zip") as archive:
            prefix = f"{collection}/{alphabet}/{character}/"
            member = sorted(n for n in archive.namelist() if n.startswith(prefix))[j]
            png = Path(archive.extract(member, tmp_path))
        expected = real_omniglot.images[index, j].float().div(255)[None]
        assert torch.equal(load_omniglot_image(png), expected)


@pytest.mark.parametrize(
    ("split", "sizes"),
    [("paper", (1200, 100, 323)), ("vinyals", (1028, 172, 423)), ("lake", None)],
)
def test_real_splits(
    real_omniglot: OmniglotCharacters, split: str, sizes: tuple[int, int, int] | None
) -> None:
    names = real_omniglot.names
    split_dir = vinyals_dir() if split == "vinyals" else None
    parts = split_characters(names, split, split_dir=split_dir)
    train, val, test = parts["train"], parts["val"], parts["test"]
    if sizes is not None:
        assert (len(train), len(val), len(test)) == sizes
    else:
        assert len(train) + len(val) == 964 and len(test) == 659
        assert len({names[i][1] for i in val}) == 5
        assert {names[i][0] for i in test} == {EVALUATION}
        assert not {names[i][1] for i in val} & {names[i][1] for i in train}
    joined = np.concatenate([train, val, test])
    assert np.array_equal(np.sort(joined), np.arange(NUM_CHARACTERS))  # disjoint and complete
    for part in (train, val, test):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)


def test_the_seed_moves_the_drawn_splits_and_the_vinyals_files_define_theirs(
    real_omniglot: OmniglotCharacters,
) -> None:
    """The paper split of seed 0 is pinned in test_golden.py; another seed draws another
    one. The vinyals split is the character list of its files, whatever the seed."""
    names = real_omniglot.names
    for split in ("paper", "lake"):
        zero, one = split_characters(names, split, seed=0), split_characters(names, split, seed=1)
        assert not np.array_equal(zero["val"], one["val"])
    parts = split_characters(names, "vinyals", split_dir=vinyals_dir(), seed=3)
    for part, indices in parts.items():
        listed = json.loads((vinyals_dir() / f"{part}.json").read_text())
        expected = {
            (f"images_{group}", alphabet, character)
            for group, alphabets in listed.items()
            for alphabet, characters in alphabets.items()
            for character in characters
        }
        assert {tuple(names[i]) for i in indices} == expected
