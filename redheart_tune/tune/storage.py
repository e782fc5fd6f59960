"""Where a run's files live: a local directory, or a URI that pyarrow (and so Ray) can write.

``run.output_root`` is a local path or a URI (``s3://bucket/runs``, ``gs://...``,
``file:///shared/runs``; an S3-compatible server takes pyarrow's query options,
``s3://bucket/runs?endpoint_override=host:9000&scheme=http``).  Tune writes its
experiments straight there.  Everything else the pipeline reads and writes (the
stored configs, the sweep's records, the analysis, the crossover) goes through a
local directory: for a local root that directory *is* the root; for a URI it is
a local mirror (``run.local_dir``), filled from the storage before a stage reads
(``pull``) and copied back after it writes (``push``).  So the analysis never
assumes a local path: it reads what was downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from redheart_tune.config import Config, is_uri, local_root

WEIGHT_SUFFIXES = (".safetensors", ".pt")
"""The large files of an experiment: weights and resume state.  ``pull(..., weights=False)`` skips them."""


@dataclass(frozen=True)
class Storage:
    """A run's output root: ``uri`` as Tune sees it, ``local`` where the pipeline reads and writes."""

    uri: str
    local: Path
    fs: pafs.FileSystem
    fs_root: str
    """The root's path within ``fs``."""

    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem) or Path(self.fs_root) != self.local

    def fs_path(self, rel: str | os.PathLike) -> str:
        rel = str(rel).strip("/")
        return f"{self.fs_root.rstrip('/')}/{rel}" if rel else self.fs_root

    def display(self, rel: str | os.PathLike = "") -> str:
        """The storage location of ``rel`` for people (the URI without its query options)."""
        base = self.uri.split("?", 1)[0].rstrip("/")
        return f"{base}/{str(rel).strip('/')}" if str(rel) else base

    def exists(self, rel: str | os.PathLike) -> bool:
        return self.fs.get_file_info(self.fs_path(rel)).type != pafs.FileType.NotFound

    def pull(self, rel: str | os.PathLike, *, weights: bool = True) -> Path:
        """Copy ``rel`` (a file or a directory tree) from the storage into the local mirror; a file already
        there with the same size and modification time as the stored one (set on download) is kept, so
        a record rewritten at the same size (live progress, a stored config) is fetched again.
        ``weights=False`` leaves out weights and resume state.  Returns the local path.  For a local root
        this is just the path."""
        target = self.local / rel
        if not self.remote:
            return target
        info = self.fs.get_file_info(self.fs_path(rel))
        if info.type == pafs.FileType.NotFound:
            return target
        files = [info] if info.type == pafs.FileType.File else self._files(self.fs_path(rel))
        for f in files:
            if not weights and f.path.endswith(WEIGHT_SUFFIXES):
                continue
            local = self.local / Path(f.path).relative_to(self.fs_root)
            if local.is_file() and _same_file(local.stat(), f):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.pull")
            with self.fs.open_input_stream(f.path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            if f.mtime_ns is not None:
                os.utime(tmp, ns=(f.mtime_ns, f.mtime_ns))
            os.replace(tmp, local)
        return target

    def push(self, rel: str | os.PathLike) -> None:
        """Copy ``rel`` (a file or a directory tree) from the local mirror to the storage (nothing for a
        local root)."""
        source = self.local / rel
        if not self.remote or not source.exists():
            return
        paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for p in paths:
            dest = self.fs_path(p.relative_to(self.local).as_posix())
            self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with open(p, "rb") as src, self.fs.open_output_stream(dest) as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)

    def delete_file(self, rel: str | os.PathLike) -> None:
        self.fs.delete_file(self.fs_path(rel))

    def _files(self, fs_dir: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(fs_dir, recursive=True))
        return [i for i in infos if i.type == pafs.FileType.File]


def _same_file(local: os.stat_result, stored: pafs.FileInfo) -> bool:
    """The local copy is the stored file: same size, and the stored modification time it was given on
    download (a file system that reports none is compared by size)."""
    if local.st_size != stored.size:
        return False
    return stored.mtime_ns is None or local.st_mtime_ns == stored.mtime_ns


def storage(cfg: Config) -> Storage:
    """The run's storage: ``run.output_root``, and the local directory the pipeline goes through
    (``tune.config.local_root``: the root itself, or a remote root's mirror)."""
    root, local = cfg.run.output_root, local_root(cfg)
    if not is_uri(root):
        return Storage(uri=str(local), local=local, fs=pafs.LocalFileSystem(), fs_root=str(local))
    fs, fs_root = pafs.FileSystem.from_uri(root)
    return Storage(uri=root, local=local, fs=fs, fs_root=fs_root.rstrip("/") or fs_root)


def push(cfg: Config, *paths: str | os.PathLike) -> None:
    """Copy files or trees the driver wrote under the local root to the run's storage (nothing to do for
    a local root)."""
    st = storage(cfg)
    if st.remote:
        for p in paths:
            st.push(Path(p).resolve().relative_to(st.local))


def pull(cfg: Config, path: str | os.PathLike, *, weights: bool = True) -> Path:
    """Bring ``path`` (under the local root) up to date from the run's storage; returns it.
    ``weights=False`` leaves out weights and resume state (enough for status and reuse decisions)."""
    st = storage(cfg)
    if st.remote:
        st.pull(Path(path).resolve().relative_to(st.local), weights=weights)
    return Path(path)
