"""Checkpoint layout: one safetensors file per module group, metrics, meta, a manifest, resume state.

A checkpoint directory holds

    group_a.safetensors  group_b.safetensors  group_c.safetensors  independent.safetensors
        the group's tensors under their full state-dict keys ("heads.emotion.mlp.0.weight"),
        loadable without pickle and readable one group at a time;
    metrics.json         everything measured at that epoch (per-module validation loss included);
    meta.json            epoch, full config, seed, data split fingerprint, package version;
    resume_state.pt      optimizer, scheduler, scaler, every RNG, data order (newest checkpoint only by default);
    manifest.json        size and sha256 of every other file, written last, and how long the write took.

A checkpoint is complete only when its manifest exists and every file matches it;
``verify_checkpoint`` is what later stages call before trusting one.  ``plan_space`` checks, before
each one is written, that it fits (``util.faults.SpaceCheck``).

Each file is hashed while it is written, from the bytes in memory as they go to the
file, so a checkpoint's data is never read back to be hashed (the 730M model writes
2.9 GB of weights and 5.8 GB of resume state per checkpoint).  The seconds spent
writing and hashing are logged ("checkpoint 4: wrote 8.70 GB in 11.2 s, hashed in
6.1 s") and kept in the manifest's ``written``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import safe_open

from redheart_tune.model.groups import GROUPS, modules_of_group
from redheart_tune.util.faults import RESUME_STATES_KEPT, CheckpointSize, SpaceCheck, local_trial_dir
from redheart_tune.util.files import sha256_file, write_atomic, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
METRICS = "metrics.json"
META = "meta.json"
RESUME_STATE = "resume_state.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model; the message names the file."""


def group_file(group: str) -> str:
    return f"{group}.safetensors"


def split_state_by_group(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Partition a model state dict by the group declaration; every key must belong to a declared module."""
    from redheart_tune.model.groups import GROUP_OF, param_prefix_owner

    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for key, value in state.items():
        out[GROUP_OF[param_prefix_owner(key)]][key] = value.detach().to("cpu").contiguous()
    return out


# ---------------------------------------------------------------------------
# Resume state


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step touches, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": {
            "algo": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(_as_tuple(rng["python"]))
    n = rng["numpy"]
    np.random.set_state(
        (n["algo"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------------------
# Write


class HashingWriter:
    """A binary file that computes the sha256 of what passes through ``write``, from the bytes in memory."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._digest = f, hashlib.sha256()
        self.bytes = 0
        self.hash_s = 0.0
        """Seconds spent hashing (the rest of the time is serialising and writing)."""

    def write(self, data) -> int:
        t = time.perf_counter()
        self._digest.update(data)
        self.hash_s += time.perf_counter() - t
        self.bytes += memoryview(data).nbytes
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def write_hashed(path: Path, write: Callable[[HashingWriter], object]) -> tuple[dict, float]:
    """``write(f)`` into ``path`` through a HashingWriter: the manifest entry (bytes, sha256) and the
    seconds spent hashing.  The file's size must match what passed through the writer."""
    with open(path, "wb") as raw:
        f = HashingWriter(raw)
        write(f)
    size = Path(path).stat().st_size
    if size != f.bytes:  # something wrote around the writer: its hash would be wrong
        raise CheckpointError(f"{path}: {size} bytes on disk, {f.bytes} hashed")
    return {"bytes": f.bytes, "sha256": f.hexdigest()}, f.hash_s


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (contiguous, on the CPU) in the safetensors format, written tensor by tensor from their
    own memory: an 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes),
    then the data.  Tensors go in safetensors' own order (larger elements first, then by name), so each
    one is aligned to its element size.  Unlike ``safetensors.torch.save``, no copy of the file is made
    in memory; ``safe_open`` and ``load_file`` read it."""
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        t = tensors[name]
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name}: a checkpoint tensor must be contiguous and on the CPU")
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in names:
        t = tensors[name]
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _json_bytes(obj: Any) -> bytes:
    """``obj`` as indented JSON (NaN and Infinity allowed), as ``tune.files.write_json_atomic`` writes it."""
    return json.dumps(obj, indent=2, allow_nan=True).encode("utf-8")


def write_checkpoint(
    directory: Path,
    *,
    model_state: dict[str, torch.Tensor],
    metrics: dict,
    meta: dict,
    resume_state: dict | None,
) -> Path:
    """Write a complete checkpoint into ``directory`` (which must not exist yet); the manifest goes last.

    Every file is hashed as it is written; the seconds spent writing and hashing are logged and kept in
    the manifest's ``written`` (``write_timing``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=False)
    start = time.perf_counter()
    entries: dict[str, dict] = {}
    hash_s = 0.0
    weights = 0

    def put(name: str, write: Callable[[HashingWriter], object], *, atomic: bool = False) -> None:
        nonlocal hash_s
        if atomic:  # small JSON: a temporary file, flushed and renamed
            out: list = []
            write_atomic(directory / name, lambda tmp: out.extend(write_hashed(tmp, write)))
            entry, seconds = out
        else:
            entry, seconds = write_hashed(directory / name, write)
        entries[name] = entry
        hash_s += seconds

    for group, tensors in split_state_by_group(model_state).items():
        meta_st = {"group": group, "format": str(FORMAT_VERSION)}
        put(group_file(group), lambda f, t=tensors, m=meta_st: write_safetensors(f, t, m))
        weights += entries[group_file(group)]["bytes"]
    put(METRICS, lambda f: f.write(_json_bytes(metrics)), atomic=True)
    put(META, lambda f: f.write(_json_bytes({**meta, "format": FORMAT_VERSION})), atomic=True)
    if resume_state is not None:
        put(RESUME_STATE, lambda f: torch.save(resume_state, f))
    total = sum(e["bytes"] for e in entries.values())
    write_s = time.perf_counter() - start - hash_s
    written = {
        "bytes": total,
        "weights_bytes": weights,
        "resume_state_bytes": entries.get(RESUME_STATE, {}).get("bytes", 0),
        "write_s": round(write_s, 4),
        "hash_s": round(hash_s, 4),
    }
    manifest = {"format": FORMAT_VERSION, "files": dict(sorted(entries.items())), "written": written}
    write_json_atomic(directory / MANIFEST, manifest)
    log.warning(
        "checkpoint %s: wrote %.2f GB in %.1f s, hashed in %.1f s (weights %.2f GB, resume state %.2f GB)",
        meta.get("epoch", directory.name),
        total / 1e9,
        write_s,
        hash_s,
        weights / 1e9,
        written["resume_state_bytes"] / 1e9,
    )
    return directory


def write_timing(directory: Path) -> dict:
    """How the checkpoint in ``directory`` was written: bytes, weights_bytes, resume_state_bytes, write_s
    (serialising and writing, hashing excluded) and hash_s; {} for a checkpoint older than this record."""
    return json.loads((Path(directory) / MANIFEST).read_text()).get("written", {})


def measured_size(directory: Path) -> CheckpointSize | None:
    """The size of the checkpoint in ``directory`` as its manifest recorded it when it was written (the
    resume state's too, when it was dropped since); None for a checkpoint older than that record."""
    written = write_timing(directory)
    if not written:
        return None
    epoch = json.loads((Path(directory) / META).read_text())["epoch"]
    weights, resume = written["weights_bytes"], written["resume_state_bytes"]
    return CheckpointSize(weights, resume, written["bytes"], f"as measured at epoch {epoch}")


def plan_space(
    model, measured: CheckpointSize | None, keep_resume_state: str, epochs: list[int]
) -> SpaceCheck:
    """Inside a Tune trial whose checkpoints of ``epochs`` are still to be written: the check each one
    passes before it is written, sized by ``measured`` (the checkpoint resumed from) or estimated from
    ``model``.  Logs the one-line warning when they will not all fit.

    A checkpoint is staged in the temporary folder (``tempfile``'s, as ``tune.trainable`` writes it)
    before Tune copies it into the trial's folder."""
    destination = local_trial_dir()
    check = SpaceCheck(
        size=measured or CheckpointSize.estimate(model),
        staging=Path(tempfile.gettempdir()),
        destination=destination,
        keep_resume=RESUME_STATES_KEPT if keep_resume_state == "latest" else None,
    )
    held = len(list(destination.glob(f"checkpoint_*/{RESUME_STATE}"))) if destination else 0
    line = check.start_line(epochs, held)
    if line is not None:
        log.warning(line)
    return check


def drop_resume_state(fs, directory: str | Path) -> None:
    """Remove a checkpoint's resume state and rewrite its manifest (the weights stay untouched).

    ``fs`` is the pyarrow filesystem the checkpoint lives on (a local directory or a bucket): the
    manifest is written first, so it never lists a missing file.
    """
    import pyarrow.fs as pafs

    directory = str(directory)
    target, manifest_path = f"{directory}/{RESUME_STATE}", f"{directory}/{MANIFEST}"
    if fs.get_file_info(target).type == pafs.FileType.NotFound:
        return
    with fs.open_input_stream(manifest_path) as f:
        manifest = json.loads(f.readall())
    manifest["files"].pop(RESUME_STATE, None)
    if isinstance(fs, pafs.LocalFileSystem):
        write_json_atomic(Path(manifest_path), manifest)
    else:  # an object store replaces an object whole: the write is atomic by itself
        with fs.open_output_stream(manifest_path) as f:
            f.write(json.dumps(manifest, indent=2).encode())
    fs.delete_file(target)


# ---------------------------------------------------------------------------
# Read


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    epoch: int
    meta: dict
    metrics: dict
    has_resume_state: bool


def verify_checkpoint(directory: Path, *, hashes: bool = True) -> CheckpointInfo:
    """Check a checkpoint against its manifest (sizes, and sha256 when ``hashes``); raise CheckpointError naming the file."""
    directory = Path(directory)
    man_path = directory / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(
            f"{directory}: no {MANIFEST}; the checkpoint was never completed (interrupted write). "
            "It is skipped; resume from an earlier checkpoint."
        )
    try:
        manifest = json.loads(man_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{man_path}: unreadable manifest ({exc})") from exc
    for name in [group_file(g) for g in GROUPS] + [METRICS, META]:
        if name not in manifest["files"]:
            raise CheckpointError(
                f"{directory / name}: not listed in the manifest; the checkpoint is incomplete"
            )
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the manifest lists it); the checkpoint is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the manifest says {entry['bytes']}: truncated or overwritten"
            )
        if hashes and sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the manifest: the file is corrupt")
    meta = json.loads((directory / META).read_text())
    metrics = json.loads((directory / METRICS).read_text())
    return CheckpointInfo(
        path=directory,
        epoch=int(meta["epoch"]),
        meta=meta,
        metrics=metrics,
        has_resume_state=RESUME_STATE in manifest["files"],
    )


def load_group(directory: Path, group: str, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read one group's tensors (lazily: only this file is opened)."""
    path = Path(directory) / group_file(group)
    modules_of_group(group)  # unknown group -> KeyError naming the known ones
    if not path.is_file():
        raise CheckpointError(f"{path}: missing group file")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from exc


def load_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """All four group files merged into one state dict."""
    state: dict[str, torch.Tensor] = {}
    for group in GROUPS:
        state.update(load_group(directory, group))
    return state


def load_resume_state(directory: Path) -> dict:
    path = Path(directory) / RESUME_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: this checkpoint keeps no resume state (train.keep_resume_state: latest keeps it in the newest only)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
