"""The bundled default data set: the VADER sentiment ground truth (``data.source: vader``).

Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
Social Media Text", ICWSM 2014.  Four corpora of sentences, each rated by 15-99
independent human raters on an integer scale from -4 (extremely negative) to +4
(extremely positive).  The files ship inside the source distribution of
``vaderSentiment==3.3.2`` (``additional_resources/hutto_ICWSM_2014.tar.gz``), which
``data.vader_download.fetch_vader`` downloads once with pip, checks against ``SDIST_SHA256`` and
unpacks into ``<cache>/vader/hutto_ICWSM_2014/``.

Files per corpus (tab-separated, CRLF line ends):
``<corpus>_GroundTruth.txt`` (id, mean rating, text) and
``<corpus>_anonDataRatings.txt`` (id, mean, sd, ``[r1, r2, ...]`` individual ratings).
The two are joined on (corpus, id); any id in one but not the other, a duplicate
id, a ratings-file mean that is not the mean of its ratings, or a ground-truth mean
that disagrees with them (see ``GROUND_TRUTH_GAP``) is a ``DataError``.
Files are decoded as UTF-8 (a leading BOM is dropped: one file has one); a file that
is not valid UTF-8 is decoded as Latin-1 instead, which never fails, and a WARNING
names it.  (In 3.3.2 all eight files are valid UTF-8.)  Texts are stripped of
surrounding whitespace and otherwise kept as written.

The four tasks, derived only from what the raters gave (r = the sentence's
individual ratings, n = their number, neg / zero / pos = the shares of raters with
r < 0, r = 0, r > 0):

| task    | kind                | labels                            | target                                                         |
|---------|---------------------|-----------------------------------|----------------------------------------------------------------|
| emotion | soft_classification | negative, neutral, positive       | (neg, zero, pos); accuracy = argmax vs the majority class      |
| bentham | regression          | intensity                         | abs(mean(r)) / 4, in [0, 1]                                    |
|         |                     | certainty                         | 1 - sd(r) / 4 (population sd, so in [0, 1]): rater agreement   |
|         |                     | purity                            | max(neg, pos) / (neg + pos): share of the raters who took a    |
|         |                     |                                   | side that took the majority side, in [0.5, 1]; 1 when every    |
|         |                     |                                   | rater gave 0 (nobody contradicts anybody about polarity)       |
| regret  | regression          | regret                            | share of raters who rated the sentence at least 2 points below |
|         |                     |                                   | its median rating: the minority that judged it clearly worse   |
|         |                     |                                   | than most raters did (second thoughts against the consensus)   |
| surd    | classification      | tweets, movies, amazon, nyt       | the source corpus                                              |

Each task carries its own signal: emotion the polarity, bentham its strength and
the raters' agreement, regret the dissent below the consensus (a signal of its
own, |r| <= 0.49 with every other target), surd the source.  The correlations
(``target_correlations``) over all 23,703 sentences are in docs/data.md.

In numbers (3.3.2): 23,703 sentences (tweets 4,200, movies 10,605, amazon 3,708,
nyt 5,190), 23,619 distinct texts (a few sentences repeat across ids and may land
in different splits); majority class negative 9,546, neutral 3,818, positive
10,339 (ties go to the earlier class); 192 sentences rated 0 by every rater.
Mean targets: emotion (0.378, 0.186, 0.436), bentham (0.354, 0.796, 0.936), regret 0.038.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from redheart_tune.model.tasks import TaskSpec

from .errors import DataError
from .raw import RawData

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CORPORA: dict[str, str] = {
    "tweets": "tweets",
    "movies": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}
"""Corpus label -> file name prefix, in the order of the surd class labels."""

RATING_MIN, RATING_MAX = -4, 4
DISSENT_GAP = 2
"""``regret``: how far below a sentence's median rating a rater must be to count as dissenting."""
MEAN_TOL = 1e-4
"""How far a file's stated mean may be from the mean of its ratings (the files round to 9-11 digits)."""
GROUND_TRUTH_GAP = 1.5
"""How far a ground-truth mean may be from the mean of the listed ratings.

In 3.3.2, 199 of the 1,000 tweets with 92-99 raters have a ground-truth mean that is
not the mean of the listed ratings (same sign, up to 1.13 apart, e.g. 140/97 vs
224/99): the published means came from a slightly different rater pool.  Targets
use only the listed ratings; the ground-truth mean serves as a check that the two
files were joined right (same sign, within this gap)."""


def task_specs() -> dict[str, TaskSpec]:
    """The four VADER tasks (see the module docstring)."""
    return {
        "emotion": TaskSpec("emotion", "soft_classification", ("negative", "neutral", "positive")),
        "bentham": TaskSpec("bentham", "regression", ("intensity", "certainty", "purity")),
        "regret": TaskSpec("regret", "regression", ("regret",)),
        "surd": TaskSpec("surd", "classification", tuple(CORPORA)),
    }


# ----------------------------------------------------------------------------- parse


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of ``path``, decoded as UTF-8 (BOM dropped) or Latin-1."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        log.warning("%s is not valid UTF-8 (%s); decoding it as Latin-1", path, e)
        text = raw.decode("latin-1")
    # Split on \n only: str.splitlines() would also split on \x0b, \x1c, U+2028 ...
    # inside a sentence.
    lines = text.replace("\r\n", "\n").split("\n")
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def _parse_ground_truth(path: Path) -> dict[str, tuple[float, str]]:
    rows: dict[str, tuple[float, str]] = {}
    for number, line in _read_lines(path):
        fields = line.split("\t", 2)
        try:
            if len(fields) != 3:
                raise ValueError(f"expected 3 tab-separated fields (id, mean, text), got {len(fields)}")
            sentence_id, mean, text = fields[0].strip(), float(fields[1]), fields[2].strip()
            if not text:
                raise ValueError("empty text")
            if sentence_id in rows:
                raise ValueError(f"duplicate id {sentence_id!r}")
        except ValueError as e:
            raise DataError(f"{path}: line {number}: {e}. Delete {path.parent} to fetch it again.") from e
        rows[sentence_id] = (mean, text)
    return rows


@dataclass(frozen=True, eq=False)
class _Ratings:
    """One ratings file: per sentence its stated mean and its ratings, ragged."""

    row: dict[str, int]  # id -> row
    stated_mean: np.ndarray  # (S,) float64
    counts: np.ndarray  # (S,) int64 raters per sentence
    flat: np.ndarray  # (sum(counts),) int64 all ratings, sentence after sentence


def _parse_ratings(path: Path) -> _Ratings:
    row: dict[str, int] = {}
    means: list[float] = []
    lists: list[str] = []
    numbers: list[int] = []
    for number, line in _read_lines(path):
        fields = line.split("\t")
        try:
            if len(fields) != 4:
                raise ValueError(
                    f"expected 4 tab-separated fields (id, mean, sd, ratings), got {len(fields)}"
                )
            sentence_id, mean, listed = fields[0].strip(), float(fields[1]), fields[3].strip()
            if not (listed.startswith("[") and listed.endswith("]")):
                raise ValueError(f"ratings {listed[:30]!r} are not a [r1, r2, ...] list")
            if sentence_id in row:
                raise ValueError(f"duplicate id {sentence_id!r}")
        except ValueError as e:
            raise DataError(f"{path}: line {number}: {e}. Delete {path.parent} to fetch it again.") from e
        row[sentence_id] = len(means)
        means.append(mean)
        lists.append(listed[1:-1])
        numbers.append(number)
    counts = np.array([item.count(",") + 1 for item in lists], dtype=np.int64)
    try:
        # One conversion for the whole file: per-line numpy calls take most of the load time.
        flat = np.array(",".join(lists).split(","), dtype=np.int64)
    except ValueError:
        for number, item in zip(numbers, lists, strict=True):
            try:
                np.array(item.split(","), dtype=np.int64)
            except ValueError as e:
                raise DataError(
                    f"{path}: line {number}: ratings are not integers ({e}). Delete {path.parent} to fetch it again."
                ) from e
        raise
    if flat.size and (flat.min() < RATING_MIN or flat.max() > RATING_MAX):
        first_bad = np.flatnonzero((flat < RATING_MIN) | (flat > RATING_MAX))[0]
        sentence = int(np.searchsorted(np.cumsum(counts), first_bad, "right"))
        raise DataError(
            f"{path}: line {numbers[sentence]}: a rating is outside [{RATING_MIN}, {RATING_MAX}]. "
            f"Delete {path.parent} to fetch it again."
        )
    return _Ratings(row=row, stated_mean=np.array(means, dtype=np.float64), counts=counts, flat=flat)


def targets_from_ratings(counts: np.ndarray, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Targets of S sentences from their ratings (see the module docstring).

    counts: (S,) raters per sentence; flat: their ratings, sentence after sentence.
    Returns emotion (S, 3), bentham (S, 3), regret (S, 1), all float32.
    """
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = counts.astype(np.float64)
    r = flat.astype(np.float64)

    def per_sentence(values: np.ndarray) -> np.ndarray:  # (S,) mean over each sentence's raters
        return np.add.reduceat(values, starts) / n

    # Median of each sentence's ratings: sort within sentences, average the two middle ones.
    ordered = r[np.lexsort((r, np.repeat(np.arange(len(counts)), counts)))]
    median = (ordered[starts + (counts - 1) // 2] + ordered[starts + counts // 2]) / 2  # (S,)

    neg, zero, pos = per_sentence(r < 0), per_sentence(r == 0), per_sentence(r > 0)
    mean = per_sentence(r)
    sd = np.sqrt(np.maximum(per_sentence(r * r) - mean * mean, 0.0))  # population sd
    intensity = np.abs(mean) / RATING_MAX
    certainty = np.clip(1.0 - sd / RATING_MAX, 0.0, 1.0)
    sided = neg + pos
    purity = np.where(sided > 0, np.maximum(neg, pos) / np.where(sided > 0, sided, 1.0), 1.0)
    return {
        "emotion": np.stack([neg, zero, pos], axis=1).astype(np.float32),
        "bentham": np.stack([intensity, certainty, purity], axis=1).astype(np.float32),
        "regret": per_sentence(r <= np.repeat(median, counts) - DISSENT_GAP)[:, None].astype(np.float32),
    }


def target_columns(data: RawData) -> dict[str, np.ndarray]:
    """Every target as a named (N,) column: one per regression output or soft class, one indicator per surd class."""
    columns: dict[str, np.ndarray] = {}
    for task, spec in data.tasks.items():
        values = data.targets[task]
        for j, label in enumerate(spec.labels):
            name = task if spec.dim == 1 else f"{task}/{label}"
            columns[name] = (values == j).astype(np.float64) if values.ndim == 1 else values[:, j]
    return columns


def target_correlations(data: RawData) -> pd.DataFrame:
    """Pearson correlation of every pair of ``target_columns`` (the table in docs/data.md)."""
    import pandas as pd

    columns = target_columns(data)
    return pd.DataFrame(
        np.corrcoef(np.stack(list(columns.values()))), index=list(columns), columns=list(columns)
    )


def load_vader(directory: Path) -> RawData:
    """Parse, join and map the four corpora in ``directory`` (as made by ``fetch_vader``).

    Rows come corpus by corpus in ``CORPORA`` order, each in ground-truth file
    order; ids are ``<corpus>/<id>``.  ``strata`` is the corpus index, for a
    stratified split.
    """
    ids: list[str] = []
    texts: list[str] = []
    columns: dict[str, list[np.ndarray]] = {"emotion": [], "bentham": [], "regret": []}
    corpus_index: list[np.ndarray] = []
    for c, (corpus, prefix) in enumerate(CORPORA.items()):
        truth_path = directory / f"{prefix}_GroundTruth.txt"
        ratings_path = directory / f"{prefix}_anonDataRatings.txt"
        for path in (truth_path, ratings_path):
            if not path.is_file():
                raise DataError(f"{path} is missing. Delete {directory} to fetch the VADER files again.")
        truth = _parse_ground_truth(truth_path)
        ratings = _parse_ratings(ratings_path)
        if truth.keys() != ratings.row.keys():
            only_truth = sorted(truth.keys() - ratings.row.keys())[:5]
            only_ratings = sorted(ratings.row.keys() - truth.keys())[:5]
            raise DataError(
                f"{truth_path.name} and {ratings_path.name} in {directory} do not hold the same ids "
                f"(only in ground truth, first 5: {only_truth}; only in ratings: {only_ratings}). "
                f"Delete {directory} to fetch the VADER files again."
            )
        sentence_ids = list(truth)
        # Reorder the ratings into ground-truth order.
        order = np.array([ratings.row[i] for i in sentence_ids], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(ratings.counts)[:-1]])
        counts = ratings.counts[order]
        flat = np.concatenate([ratings.flat[s : s + k] for s, k in zip(starts[order], counts, strict=True)])
        actual = (
            np.add.reduceat(flat.astype(np.float64), np.concatenate([[0], np.cumsum(counts)[:-1]])) / counts
        )
        stated = ratings.stated_mean[order]
        truth_mean = np.array([truth[i][0] for i in sentence_ids])

        bad = np.flatnonzero(np.abs(stated - actual) > MEAN_TOL)
        if bad.size:
            i = bad[0]
            raise DataError(
                f"{ratings_path}: id {sentence_ids[i]!r}: stated mean {stated[i]} is not the mean of its "
                f"ratings ({actual[i]:.6f}). Delete {directory} to fetch the VADER files again."
            )
        # See GROUND_TRUTH_GAP: some ground-truth means come from another rater pool;
        # a wrong join would show as sign flips or large gaps.
        gap = np.abs(truth_mean - actual)
        bad = np.flatnonzero((np.sign(truth_mean) != np.sign(actual)) | (gap > GROUND_TRUTH_GAP))
        if bad.size:
            i = bad[0]
            raise DataError(
                f"{directory}: {corpus} id {sentence_ids[i]!r}: ground-truth mean {truth_mean[i]} and the mean "
                f"of the individual ratings {actual[i]:.6f} disagree; the two files do not belong together. "
                f"Delete {directory} to fetch the VADER files again."
            )
        differing = int((gap > MEAN_TOL).sum())
        if differing:
            log.info(
                "%s: %d ground-truth means differ from the mean of the listed ratings (same sign, within %s); "
                "targets use the listed ratings",
                truth_path.name,
                differing,
                GROUND_TRUTH_GAP,
            )
        ids.extend(f"{corpus}/{i}" for i in sentence_ids)
        texts.extend(truth[i][1] for i in sentence_ids)
        corpus_index.append(np.full(len(sentence_ids), c, dtype=np.int64))
        for name, value in targets_from_ratings(counts, flat).items():
            columns[name].append(value)

    n = len(ids)
    strata = np.concatenate(corpus_index)
    targets = {name: np.concatenate(col) for name, col in columns.items()}
    targets["surd"] = strata.copy()
    return RawData(
        ids=tuple(ids),
        texts=tuple(texts),
        targets=targets,
        target_mask={name: np.ones(n, dtype=bool) for name in targets},
        tasks=task_specs(),
        strata=strata,
    )
