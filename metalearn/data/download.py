"""Writing data files safely: temporary files replaced atomically, checksum-verified downloads.

Every file metalearn writes into a data or cache folder first goes to a hidden temporary
file in the same folder (``.<name>.<random>.part``), which replaces the final name with
``os.replace`` only once it is complete and checked; on any failure it is removed. A reader
therefore sees either no file or a whole one, never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import secrets
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from metalearn.errors import DataError

__all__ = [
    "create_temp",
    "download_file",
    "download_folder",
    "extract_tar",
    "one_line",
    "progress_bar",
]

_CHUNK = 1 << 20


def one_line(text: object) -> str:
    """Collapse a message (or an exception's text) onto one line."""
    return " ".join(str(text).split())


def create_temp(folder: Path, final_name: str) -> tuple[int, Path]:
    """Create a fresh hidden temporary file next to ``folder / final_name``.

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file gets the user's umask like any
    other new file, so a shared cache or data folder stays readable by its group.

    Returns:
        An open file descriptor (write only) and the path of the temporary file.
    """
    for _ in range(100):
        path = folder / f".{final_name}.{secrets.token_hex(6)}.part"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {folder}")


@contextlib.contextmanager
def download_folder(root: Path, what: str) -> Iterator[Path]:
    """Create ``root`` (and its missing parents) to download ``what`` into; when the
    download fails, remove the folders this created that are still empty, so that the
    data root is left as it was."""
    created = [folder for folder in (root, *root.parents) if not folder.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create the {what} folder {root} to download into ({one_line(err)}); "
            f"set paths.data_dir / METALEARN_DATA_DIR to a writable folder"
        ) from err
    try:
        yield root
    except BaseException:
        for folder in created:  # deepest first; a folder that holds a file stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def progress_bar(
    enabled: bool, label: str, total: int | None, in_bytes: bool
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: steps a rich progress bar when enabled, else does nothing."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counter: tuple[ProgressColumn, ...] = (
        (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        if in_bytes
        else (MofNCompleteColumn(), TimeElapsedColumn())
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), *counter) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def download_file(
    url: str,
    target: Path,
    what: str,
    manual: str,
    sha256: str | None = None,
    md5: str | None = None,
    validate: Callable[[Path], object] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``target`` atomically, verifying its length, checksums and content.

    The bytes are streamed into a temporary file in ``target``'s folder, which replaces
    ``target`` only once the transfer is complete (as many bytes as the ``Content-Length``
    header announced), the checksums match (each one that is given) and ``validate``
    accepts the file; on any failure the temporary file is removed, so ``target`` is never
    left half written.

    Args:
        url: What to download (any scheme ``urllib`` opens).
        target: The final path; its folder must exist.
        what: What the file is, for messages (``"Omniglot images_background.zip"``).
        manual: What the user can do instead, appended to every error message.
        sha256: Expected SHA-256 hex digest, or None to skip that check.
        md5: Expected MD5 hex digest, or None to skip that check.
        validate: Called with the temporary path once the checksums pass; raises
            :class:`DataError` when the content is not what was expected.
        progress: Show a progress bar.
        timeout: Socket timeout in seconds.

    Returns:
        ``target``.

    Raises:
        DataError: The folder is not writable, the transfer fails or is cut short, a
            checksum does not match or ``validate`` rejects the file. One line each, naming
            the URL and ``target``.
    """
    try:
        fd, tmp = create_temp(target.parent, target.name)
    except OSError as err:
        raise DataError(
            f"cannot write into {target.parent} to download {what} ({one_line(err)}); "
            f"set paths.data_dir / METALEARN_DATA_DIR to a writable folder"
        ) from err
    try:
        digests = {
            name: hashlib.new(name, usedforsecurity=False)
            for name, expected in (("sha256", sha256), ("md5", md5))
            if expected is not None
        }
        received = 0
        length: int | None = None
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=timeout) as response,
            ):
                header = response.headers.get("Content-Length")
                length = int(header) if header and header.isdigit() else None
                with progress_bar(progress, f"{what}", length, True) as advance:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        for digest in digests.values():
                            digest.update(chunk)
                        received += len(chunk)
                        advance(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            raise DataError(
                f"could not download {what} from {url} ({one_line(err)}); {manual}"
            ) from err
        if length is not None and received != length:
            raise DataError(
                f"the download of {url} was interrupted after {received} of {length} bytes; "
                f"nothing was saved to {target}; retry, or {manual}"
            )
        for name, expected in (("sha256", sha256), ("md5", md5)):
            if expected is None:
                continue
            actual = digests[name].hexdigest()
            if actual != expected.lower():
                raise DataError(
                    f"checksum mismatch for {url}: expected {name} {expected}, got {actual}; the "
                    f"file was discarded (nothing saved to {target}); retry, or {manual}"
                )
        if validate is not None:
            try:
                validate(tmp)
            except DataError as err:
                raise DataError(
                    f"the file downloaded from {url} is not a valid {what} and was discarded "
                    f"({err}); {manual}"
                ) from err
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


def _create_temp_folder(folder: Path, final_name: str) -> Path:
    """Create a fresh hidden temporary folder next to ``folder / final_name`` (user's umask)."""
    for _ in range(100):
        path = folder / f".{final_name}.{secrets.token_hex(6)}.part"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot create a temporary folder in {folder}")


def extract_tar(archive: Path, dest: Path, what: str) -> Path:
    """Extract the tar archive ``archive`` (any compression ``tarfile`` reads) as the folder
    ``dest``, atomically.

    The members are extracted with ``tarfile``'s ``"data"`` filter (no absolute paths, no
    member or link leaving the folder, no devices; permissions made safe) into a hidden
    temporary folder next to ``dest`` (``.<dest name>.<random>.part``). When that folder
    holds a folder named like ``dest`` (an archive with a top-level folder, as
    ``CUB_200_2011.tgz`` holds ``CUB_200_2011/``), that folder is renamed to ``dest`` and the
    archive's other top-level members are dropped; otherwise the temporary folder itself
    becomes ``dest``. Either way ``dest`` appears only once complete: on any error the
    temporary folder is removed and ``dest`` is left as it was. When another process puts
    ``dest`` in place first, its copy is kept.

    Args:
        archive: The ``.tar``, ``.tgz``, ``.tar.gz``, ``.tar.bz2`` or ``.tar.xz`` file.
        dest: The folder to create; it must not exist yet.
        what: What the archive is, for messages (``"CUB-200-2011"``).

    Returns:
        ``dest``.

    Raises:
        DataError: ``dest`` exists, the archive is corrupt, truncated or holds an unsafe
            member, or the folder is not writable. One line, naming the archive.
    """
    if dest.exists():
        raise DataError(
            f"cannot extract the {what} archive {archive}: {dest} already exists; delete it "
            f"to extract the archive again"
        )
    try:
        tmp = _create_temp_folder(dest.parent, dest.name)
    except OSError as err:
        raise DataError(
            f"cannot extract the {what} archive {archive} into {dest.parent} "
            f"({one_line(err)}); set paths.data_dir / METALEARN_DATA_DIR to a writable folder"
        ) from err
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise DataError(
                f"the {what} archive {archive} is corrupt, truncated or unsafe "
                f"({one_line(err) or type(err).__name__}); delete it and download it again"
            ) from err
        except OSError as err:
            raise DataError(
                f"cannot extract the {what} archive {archive} into {dest.parent} "
                f"({one_line(err)}): the archive is corrupt or the folder is not writable or "
                f"full; delete the archive and download it again, or free some space"
            ) from err
        inner = tmp / dest.name
        source = inner if inner.is_dir() and not inner.is_symlink() else tmp
        try:
            os.rename(source, dest)
        except OSError as err:
            if not dest.is_dir():  # else: another process extracted it first
                raise DataError(
                    f"cannot move the extracted {what} into {dest} ({one_line(err)}); "
                    f"delete {dest} if it is a leftover and retry"
                ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
