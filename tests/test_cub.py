"""CUB-200-2011 (Chen et al. split): the split file, download (loopback server), safe and
atomic extraction (extract_tar), decoding into the cache, and the errors.

The fixture is a tiny ``CUB_200_2011.tgz`` laid out as the official one: a top-level
``attributes.txt`` and ``CUB_200_2011/`` with ``images/<NNN.Name>/*.jpg`` (1 to 3 small
one-colour JPEGs per class, some grayscale), ``classes.txt`` and ``images.txt``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from loopback import LoopbackServer
from PIL import Image

from metalearn.data import cache as cache_module
from metalearn.data.download import extract_tar
from metalearn.data.sets import cub
from metalearn.data.sets.cub import CUB_CLASSES, CUB_MD5, CUB_URL, cub_root, cub_split, load_cub
from metalearn.data.storage import SPLIT_NAMES
from metalearn.errors import DataError

SPEC = json.loads((Path(cub.__file__).parents[1] / "splits" / "cub.json").read_text())
NAMES = sorted(name for split in SPLIT_NAMES for name in SPEC[split])


def one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def per_class(c: int) -> int:
    return 1 + c % 3


def colour(c: int, j: int) -> tuple[int, int, int]:
    return ((37 * c + 20 * j) % 200 + 20, (91 * c) % 200 + 20, (53 * c + 60 * j) % 200 + 20)


def is_gray(c: int, j: int) -> bool:
    return c % 7 == 0 and j == 0


def jpeg(c: int, j: int) -> bytes:
    buffer = io.BytesIO()
    if is_gray(c, j):
        Image.new("L", (20, 14), colour(c, j)[0]).save(buffer, format="JPEG", quality=95)
    else:
        Image.new("RGB", (20, 14), colour(c, j)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def make_archive(skip: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add(tar, "attributes.txt", b"1 has_bill_shape::curved\n")
        add(tar, "CUB_200_2011")
        add(tar, "CUB_200_2011/images")
        lines: list[str] = []
        classes: list[str] = []
        for c, name in enumerate(NAMES):
            classes.append(f"{c + 1} {name}")
            if name == skip:
                continue
            add(tar, f"CUB_200_2011/images/{name}")
            for j in range(per_class(c)):
                file = f"{name}/{name.split('.', 1)[1]}_{j:04d}_{c}.jpg"
                add(tar, f"CUB_200_2011/images/{file}", jpeg(c, j))
                lines.append(f"{len(lines) + 1} {file}")
        add(tar, "CUB_200_2011/classes.txt", ("\n".join(classes) + "\n").encode())
        add(tar, "CUB_200_2011/images.txt", ("\n".join(lines) + "\n").encode())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive() -> bytes:
    return make_archive()


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".part")]


# -- the split file ------------------------------------------------------------------------


def test_split_file_is_chen_et_al() -> None:
    assert {split: len(cub_split(split)) for split in SPLIT_NAMES} == CUB_CLASSES
    assert CUB_CLASSES == {"train": 100, "val": 50, "test": 50}
    assert len(NAMES) == 200 and [int(n[:3]) for n in NAMES] == list(range(1, 201))
    for i, name in enumerate(NAMES):  # write_CUB_filelist.py: sorted folders, i from 0
        split = "train" if i % 2 == 0 else "val" if i % 4 == 1 else "test"
        assert name in SPEC[split]
    assert SPEC["train"][0] == "001.Black_footed_Albatross"
    assert SPEC["val"][0] == "002.Laysan_Albatross"
    assert SPEC["test"][0] == "004.Groove_billed_Ani"
    assert SPEC["test"][-1] == "200.Common_Yellowthroat"
    assert "CloserLookFewShot" in SPEC["source"]
    assert CUB_URL.endswith("/CUB_200_2011.tgz") and len(CUB_MD5) == 32


# -- download and decoding -----------------------------------------------------------------


def test_download_extract_and_decode(
    archive: bytes, tmp_path: Path, server: LoopbackServer
) -> None:
    url = server.serve("/CUB_200_2011.tgz", archive)
    root = cub.prepare_cub(tmp_path, url=url, md5=md5_of(archive), progress=False)
    assert root == cub_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["CUB_200_2011"]  # archive deleted
    assert (root / "CUB_200_2011" / "classes.txt").is_file()
    assert not (root / "attributes.txt").exists() and no_temporaries(tmp_path)

    splits = load_cub(tmp_path, tmp_path / "cache", image_size=16, progress=False)
    assert server.requests == ["/CUB_200_2011.tgz"]  # extracted once, not downloaded again
    for split in SPLIT_NAMES:
        images = splits[split]
        assert list(images.names or []) == SPEC[split]
        counts = [per_class(NAMES.index(name)) for name in SPEC[split]]
        assert images.counts.tolist() == counts  # ragged classes
        assert images.image_shape == (3, 16, 16)
        for k, name in enumerate(SPEC[split]):
            c = NAMES.index(name)
            for j in range(counts[k]):
                pixels = images.images[images.offsets[k] + j].to(torch.int16)
                want = torch.tensor(colour(c, j), dtype=torch.int16)
                if is_gray(c, j):
                    want = want[:1].expand(3)
                    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])
                assert (pixels - want[:, None, None]).abs().max() <= 3  # JPEG


def test_bad_md5_leaves_nothing(archive: bytes, tmp_path: Path, server: LoopbackServer) -> None:
    url = server.serve("/CUB_200_2011.tgz", archive)
    data = tmp_path / "data"
    with pytest.raises(DataError) as err:
        cub.prepare_cub(data, url=url, md5="0" * 32, progress=False)
    assert "checksum mismatch" in one_line(err) and url in str(err.value)
    assert not data.exists()
    # a cut transfer too
    short = server.serve("/short.tgz", archive[:1000], declared=len(archive))
    with pytest.raises(DataError) as err:
        cub.prepare_cub(data, url=short, md5=md5_of(archive), progress=False)
    assert "interrupted" in one_line(err) and not data.exists()


def test_absent_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_cub(tmp_path, tmp_path / "cache", download=False)
    message = one_line(err)
    assert CUB_URL in message and str(cub_root(tmp_path)) in message
    assert not (tmp_path / "cub").exists()


def test_archive_placed_by_hand_is_extracted_and_kept(archive: bytes, tmp_path: Path) -> None:
    root = cub_root(tmp_path)
    root.mkdir()
    (root / "CUB_200_2011.tgz").write_bytes(archive)
    splits = load_cub(tmp_path, tmp_path / "cache", download=False, progress=False)
    assert (root / "CUB_200_2011.tgz").is_file() and splits["val"].num_classes == 50
    assert splits["train"].image_shape == (3, 84, 84)


def test_cache_reused_and_rebuilt_on_change(
    archive: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = cub_root(tmp_path)
    root.mkdir()
    (root / "CUB_200_2011.tgz").write_bytes(archive)
    cache = tmp_path / "cache"
    first = load_cub(tmp_path, cache, image_size=8, progress=False)
    modes: list[object] = []
    real_load = np.load

    def spy(*args: object, **kwargs: object) -> object:
        modes.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image was decoded although the cache exists")

    with monkeypatch.context() as patch:
        patch.setattr(cache_module.np, "load", spy)
        patch.setattr(cub, "decode_image", no_decoding)
        again = load_cub(tmp_path, cache, image_size=8, progress=False)
    assert modes == ["c", "c", "c"]
    for split in SPLIT_NAMES:
        assert torch.equal(again[split].images, first[split].images)
    # one image replaced: its split decodes again
    name = SPEC["test"][0]
    path = sorted((root / "CUB_200_2011" / "images" / name).iterdir())[0]
    Image.new("RGB", (20, 14), (0, 0, 0)).save(path, format="JPEG")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = load_cub(tmp_path, cache, image_size=8, progress=False)
    assert int(changed["test"].images[0].max()) <= 3
    assert torch.equal(changed["test"].images[1:], first["test"].images[1:])
    assert len(list(cache.glob("cub_test_*.npy"))) == 2
    assert len(list(cache.glob("cub_train_*.npy"))) == 1


def test_missing_class_folder_is_named(tmp_path: Path) -> None:
    name = SPEC["val"][3]
    root = cub_root(tmp_path)
    root.mkdir()
    (root / "CUB_200_2011.tgz").write_bytes(make_archive(skip=name))
    with pytest.raises(DataError) as err:
        load_cub(tmp_path, tmp_path / "cache", download=False, progress=False)
    assert name in one_line(err) and "1 missing" in str(err.value)
    # the incomplete extracted copy is reported on the next call too
    with pytest.raises(DataError) as err:
        load_cub(tmp_path, tmp_path / "cache", download=False, progress=False)
    assert name in one_line(err) and "incomplete" in str(err.value)


def test_unreadable_image_is_named(archive: bytes, tmp_path: Path) -> None:
    root = cub_root(tmp_path)
    root.mkdir()
    (root / "CUB_200_2011.tgz").write_bytes(archive)
    cub.prepare_cub(tmp_path, download=False)
    path = sorted((root / "CUB_200_2011" / "images" / SPEC["train"][5]).iterdir())[0]
    path.write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as err:
        load_cub(tmp_path, tmp_path / "cache", download=False, progress=False)
    assert str(path) in one_line(err)


# -- extract_tar ---------------------------------------------------------------------------


def test_extract_tar_top_folder_or_whole_archive(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add(tar, "a.txt", b"a")
        add(tar, "sub")
        add(tar, "sub/b.txt", b"b")
    (tmp_path / "x.tar").write_bytes(buffer.getvalue())
    dest = extract_tar(tmp_path / "x.tar", tmp_path / "out", "X")
    assert (dest / "a.txt").read_text() == "a" and (dest / "sub" / "b.txt").read_text() == "b"
    dest = extract_tar(tmp_path / "x.tar", tmp_path / "sub", "X")  # the archive's sub/
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert no_temporaries(tmp_path)
    with pytest.raises(DataError) as err:
        extract_tar(tmp_path / "x.tar", tmp_path / "out", "X")
    assert "already exists" in one_line(err)
    # an absolute member name is extracted inside the folder (the "data" filter strips "/")
    with tarfile.open(tmp_path / "abs.tar", mode="w") as tar:
        add(tar, "/abs.txt", b"c")
    assert (extract_tar(tmp_path / "abs.tar", tmp_path / "abs", "X") / "abs.txt").is_file()
    assert not Path("/abs.txt").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "escape", "link"])
def test_extract_tar_failures_leave_nothing(archive: bytes, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.tgz"
    if damage == "truncated":
        path.write_bytes(archive[: len(archive) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x1f\x8b" + b"not gzip" * 100)
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            add(tar, "fine.txt", b"ok")
            if damage == "escape":
                add(tar, "../evil.txt", b"evil")
            else:  # a link out of the folder
                info = tarfile.TarInfo("evil.txt")
                info.type, info.linkname = tarfile.SYMTYPE, "../../evil.txt"
                tar.addfile(info)
        path.write_bytes(buffer.getvalue())
    with pytest.raises(DataError) as err:
        extract_tar(path, tmp_path / "CUB_200_2011", "CUB-200-2011")
    assert str(path) in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tgz"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_extract_tar_interrupted_midway(
    archive: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "CUB_200_2011.tgz"
    path.write_bytes(archive)
    real = tarfile.TarFile.extract
    seen: list[str] = []

    def extract(self: tarfile.TarFile, member: tarfile.TarInfo | str, *args, **kwargs) -> None:
        seen.append(str(member))
        if len(seen) > 50:
            raise OSError(28, "No space left on device")
        real(self, member, *args, **kwargs)

    def extractall(self: tarfile.TarFile, path: str | Path, **kwargs: object) -> None:
        for member in self:
            extract(self, member, path, filter="data")

    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    with pytest.raises(DataError) as err:
        extract_tar(path, tmp_path / "CUB_200_2011", "CUB-200-2011")
    assert "No space left" in one_line(err) and len(seen) == 51
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CUB_200_2011.tgz"]


def test_two_extractions_race(
    archive: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When another process puts the folder in place between the check and the rename,
    its copy is kept and no error is raised."""
    path = tmp_path / "CUB_200_2011.tgz"
    path.write_bytes(archive)
    dest = tmp_path / "CUB_200_2011"
    real_rename = os.rename

    def rename(source: Path, target: Path) -> None:
        shutil.copytree(source, target)  # the other process wins
        (Path(target) / "winner").write_text("")
        real_rename(source, target)  # fails: target is not empty

    monkeypatch.setattr(os, "rename", rename)
    assert extract_tar(path, dest, "CUB-200-2011") == dest
    assert (dest / "winner").exists() and no_temporaries(tmp_path)
