"""Loader for the user's Red Heart JSON records (``data.source: redheart``).

The file is a JSON list of records (docs/data.md, "the Red Heart format";
an example is tests/data/redheart_sample.json)::

    {"id": "...", "text": "...", "title": "...", "action": "...", "label": "OTHER",
     "emotions": [0.1, 0.05, 0.15, 0.05, 0.2, 0.25, 0.2],   # Joy, Trust, Fear, Surprise,
                                                             # Sadness, Disgust, Anger
     "regret_factor": 0.15,
     "bentham_scores": {"intensity": .4, "duration": .6, "certainty": .8, "propinquity": .9},
     "surd_metrics": {"selection": .7, "uncertainty": .3, "risk": .2, "decision": .5},
     "timestamp": "2025-08-16T04:14:52.065151"}

Input text is ``text + " " + title``, cut to its first 512 characters.

| task    | kind                | labels                                              | from                |
|---------|---------------------|-----------------------------------------------------|---------------------|
| emotion | soft_classification | joy, trust, fear, surprise, sadness, disgust, anger | ``emotions`` (list) |
| bentham | regression          | intensity, duration, certainty, propinquity         | ``bentham_scores``  |
| regret  | regression          | regret                                              | ``regret_factor``   |
| surd    | regression          | selection, uncertainty, risk, decision              | ``surd_metrics``    |

Validation is strict, so that a misread field (``emotions`` read as a dict gives
all-zero labels) stops the load instead of training on it.  Every used field must be
present, of the right type (a bool is not a number), finite and in [0, 1];
``emotions`` must be a list of 7 non-negative numbers summing to 1 (within
``EMOTION_SUM_TOL``; they are then rescaled to sum to exactly 1); the two dicts
must have exactly their 4 keys; ids must be unique strings; ``text`` must not be
empty or only whitespace (``title`` may be empty).  ``action``, ``label`` and ``timestamp`` are not used and not
checked.  No missing target is ever filled with a constant: a bad record stops the
load (``on_bad_record="error"``) or is dropped and counted (``"skip"``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from redheart_tune.model.tasks import TaskSpec

from .errors import DataError
from .raw import LoadReport, RawData

log = logging.getLogger(__name__)

EMOTION_LABELS: tuple[str, ...] = ("joy", "trust", "fear", "surprise", "sadness", "disgust", "anger")
BENTHAM_KEYS: tuple[str, ...] = ("intensity", "duration", "certainty", "propinquity")
SURD_KEYS: tuple[str, ...] = ("selection", "uncertainty", "risk", "decision")
TEXT_CHARS = 512
"""Characters of ``text + " " + title`` kept; the rest is cut off."""
EMOTION_SUM_TOL = 1e-3
"""How far the 7 emotion shares may sum from 1 (LLM-written decimals, e.g. 0.333 * 3)."""
REPORTED_REASONS = 5
"""How many skip reasons a ``LoadReport`` keeps."""

__all__ = ["LoadReport", "load_redheart", "task_specs"]


def task_specs() -> dict[str, TaskSpec]:
    """The four tasks of the Red Heart records (see the module docstring)."""
    return {
        "emotion": TaskSpec("emotion", "soft_classification", EMOTION_LABELS),
        "bentham": TaskSpec("bentham", "regression", BENTHAM_KEYS),
        "regret": TaskSpec("regret", "regression", ("regret",)),
        "surd": TaskSpec("surd", "regression", SURD_KEYS),
    }


class _BadRecord(Exception):
    """One record's problem: the field and what is wrong (internal, becomes a DataError)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field = field


def _number(value: Any, field: str) -> float:
    """A finite real number in [0, 1]; bools and strings are rejected, not coerced."""
    # bool is a subclass of int in Python, so it must be rejected by name.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadRecord(field, f"expected a number in [0, 1], got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise _BadRecord(field, f"expected a finite number in [0, 1], got {value!r}")
    if not 0.0 <= x <= 1.0:
        raise _BadRecord(field, f"expected a number in [0, 1], got {value!r}")
    return x


def _string(record: dict[str, Any], field: str) -> str:
    if field not in record:
        raise _BadRecord(field, "missing")
    value = record[field]
    if not isinstance(value, str):
        raise _BadRecord(field, f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _emotions(record: dict[str, Any]) -> np.ndarray:
    if "emotions" not in record:
        raise _BadRecord("emotions", "missing")
    value = record["emotions"]
    if isinstance(value, dict):
        raise _BadRecord(
            "emotions",
            "is a dict, but the format is a list of 7 shares in the order "
            f"{', '.join(EMOTION_LABELS)} (convert the dict to that list)",
        )
    if not isinstance(value, list) or len(value) != len(EMOTION_LABELS):
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise _BadRecord("emotions", f"expected a list of {len(EMOTION_LABELS)} numbers, got {got}")
    shares = np.array([_number(v, f"emotions[{i}]") for i, v in enumerate(value)], dtype=np.float64)
    total = float(shares.sum())
    if abs(total - 1.0) > EMOTION_SUM_TOL:
        raise _BadRecord(
            "emotions", f"the 7 shares must sum to 1 (within {EMOTION_SUM_TOL}), they sum to {total:.6g}"
        )
    return shares / total


def _scores(record: dict[str, Any], field: str, keys: tuple[str, ...]) -> np.ndarray:
    if field not in record:
        raise _BadRecord(field, "missing")
    value = record[field]
    if not isinstance(value, dict):
        raise _BadRecord(field, f"expected a dict with keys {list(keys)}, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    unknown = sorted(set(value) - set(keys))
    if missing or unknown:
        raise _BadRecord(
            field, f"expected exactly the keys {list(keys)}; missing {missing}, unknown {unknown}"
        )
    return np.array([_number(value[k], f"{field}.{k}") for k in keys], dtype=np.float64)


def _parse_record(record: Any) -> tuple[str, str, dict[str, np.ndarray]]:
    """(id, text, targets) of one record, or ``_BadRecord``."""
    if not isinstance(record, dict):
        raise _BadRecord("(record)", f"expected a JSON object, got {type(record).__name__}")
    record_id = _string(record, "id")
    if not record_id.strip():
        raise _BadRecord("id", "is empty")
    text = _string(record, "text")
    if not text.strip():
        raise _BadRecord("text", "is empty or only whitespace; a record needs its anecdote")
    text = (text + " " + _string(record, "title"))[:TEXT_CHARS]
    if "regret_factor" not in record:
        raise _BadRecord("regret_factor", "missing")
    targets = {
        "emotion": _emotions(record),
        "bentham": _scores(record, "bentham_scores", BENTHAM_KEYS),
        "regret": np.array([_number(record["regret_factor"], "regret_factor")]),
        "surd": _scores(record, "surd_metrics", SURD_KEYS),
    }
    return record_id, text, targets


def _read_json(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(
            f"Red Heart data file {path} does not exist (resolved from the working directory "
            f"{Path.cwd()}). Set data.path to your JSON file, e.g. data.path=data/records.json."
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}). Save the file as UTF-8 JSON.") from e
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. Fix the file there."
        ) from e
    if not isinstance(records, list):
        raise DataError(
            f"{path}: the top level must be a JSON list of records, got a {type(records).__name__}. "
            "Wrap the records in [ ... ]."
        )
    return records


def load_redheart(path: Path, on_bad_record: str) -> tuple[RawData, LoadReport]:
    """Parse and validate a Red Heart JSON file.

    on_bad_record: ``"error"`` raises ``DataError`` at the first bad record;
        ``"skip"`` drops bad records, logs a WARNING with the count and the first
        reasons, and returns them in the ``LoadReport``.
    Raises ``DataError`` for a missing or unreadable file, invalid JSON (with line
    and column), a top level that is not a list, duplicate ids, and when no record
    is left.
    """
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    records = _read_json(path)
    ids: list[str] = []
    texts: list[str] = []
    columns: dict[str, list[np.ndarray]] = {name: [] for name in task_specs()}
    seen: dict[str, int] = {}
    reasons: list[str] = []
    skipped = 0
    for index, record in enumerate(records):
        shown_id = record.get("id") if isinstance(record, dict) else None
        try:
            record_id, text, targets = _parse_record(record)
            if record_id in seen:
                raise _BadRecord("id", f"duplicate of record {seen[record_id]}")
        except _BadRecord as e:
            message = f"{path}: record {index} (id {shown_id!r}): {e}"
            if on_bad_record == "error":
                raise DataError(
                    f"{message}. Fix the record, or set data.on_bad_record=skip to drop bad records."
                ) from None
            skipped += 1
            if len(reasons) < REPORTED_REASONS:
                reasons.append(message)
            continue
        seen[record_id] = index
        ids.append(record_id)
        texts.append(text)
        for name, value in targets.items():
            columns[name].append(value)

    report = LoadReport(str(path), total=len(records), kept=len(ids), skipped=skipped, reasons=tuple(reasons))
    if not ids:
        detail = f" ({skipped} bad; first: {reasons[0]})" if reasons else ""
        raise DataError(f"{path}: no usable records out of {len(records)}{detail}. Check the file's format.")
    if skipped:
        log.warning(
            "%s: skipped %d of %d bad records (data.on_bad_record=skip). First reasons:\n  %s",
            path,
            skipped,
            len(records),
            "\n  ".join(reasons),
        )
    n = len(ids)
    data = RawData(
        ids=tuple(ids),
        texts=tuple(texts),
        targets={name: np.stack(col).astype(np.float32) for name, col in columns.items()},
        target_mask={name: np.ones(n, dtype=bool) for name in columns},
        tasks=task_specs(),
        strata=None,
    )
    return data, report
