"""Task registry, raw-row loading (local files, hub errors) and the train/selection/evaluation splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldmole.experiment.data import CLASSIFICATION_KIND, TASKS, get_task, load_split_rows, load_task
from ldmole.experiment.data.examples import MalformedRowError, rows_to_examples
from ldmole.experiment.data.splits import carve_train_validation_test
from tests.helpers import DATA_DIR, FIXTURE_DATA, SHARED_DATA, needs_data, scaled

# Row counts per local directory and split, from shared/data/SOURCES.md.
LOCAL_ROW_COUNTS = {
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "commonsense_qa": {"train": 9741, "validation": 1221},
    "openbookqa": {"train": 4957, "validation": 500, "test": 500},
    "glue_rte": {"train": 2490, "validation": 277, "test": 3000},
    "glue_cola": {"train": 8551, "validation": 1043, "test": 1063},
    "glue_mrpc": {"train": 3668, "validation": 408, "test": 1725},
    "hellaswag": {"validation": 10042},
    "mmlu_pro": {"validation": 70, "test": 12032},
}
# Splits whose rows carry label -1 (GLUE test): every row is invalid for training or evaluation.
UNLABELLED_SPLITS = {("glue_rte", "test"), ("glue_cola", "test")}
TASK_OF_DIR = {spec.local_dir: spec for spec in TASKS.values()}

SWAG_ROWS = [
    {"video-id": f"anetv_{i}", "fold-ind": str(i), "startphrase": f"Someone walks. He {i}", "sent1": "Someone walks.",
     "sent2": f"He {i}", "gold-source": "gold", "ending0": "runs.", "ending1": "sits.", "ending2": "jumps.",
     "ending3": "waves.", "label": i % 4}
    for i in range(40)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---- registry -----------------------------------------------------------------------------


def test_registry_covers_the_paper_tasks_with_their_hub_names():
    assert set(TASKS) == {"arc_c", "arc_e", "csqa", "obqa", "hellaswag", "swag", "mmlu_pro", "cola", "rte", "mrpc"}
    assert (get_task("arc_c").hub_path, get_task("arc_c").hub_config) == ("allenai/ai2_arc", "ARC-Challenge")
    assert (get_task("swag").hub_path, get_task("swag").hub_config) == ("allenai/swag", "regular")
    assert (get_task("rte").hub_path, get_task("rte").hub_config) == ("nyu-mll/glue", "rte")
    assert get_task("rte").task_kind is CLASSIFICATION_KIND and get_task("rte").num_labels == 2
    assert get_task("rte").max_length == 512 and get_task("csqa").max_length == 1024


def test_load_task_takes_a_task_name_or_its_spec():
    by_name = load_task(task="arc_c", data_dir=DATA_DIR, selection_size=2)
    by_spec = load_task(get_task("arc_c"), DATA_DIR, selection_size=2)
    assert by_name.spec is by_spec.spec is get_task("arc_c")
    assert [e.uid for e in by_name.selection] == [e.uid for e in by_spec.selection] and len(by_name.selection) == 2


def test_a_task_without_a_hub_path_needs_data_dir():
    import dataclasses

    local_only = dataclasses.replace(get_task("rte"), name="rte_local_only", hub_path=None)
    with pytest.raises(ValueError, match="'rte_local_only' has no hub_path .*pass data_dir= .*glue_rte/train.jsonl"):
        load_split_rows(local_only, "train")


def test_unknown_task_error_lists_valid_names_and_suggests_the_closest():
    with pytest.raises(ValueError) as caught:
        get_task("arc-c")
    message = str(caught.value)
    assert "'arc-c'" in message and "did you mean 'arc_c'" in message and "mmlu_pro" in message, message


# ---- raw rows -----------------------------------------------------------------------------


def test_missing_data_dir_error_names_the_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        load_split_rows(get_task("arc_c"), "train", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "arc_challenge") in message and "put train.jsonl there" in message, message
    assert "drop data_dir=" in message


def test_missing_split_file_error_names_the_path_and_fix(tmp_path):
    (tmp_path / "glue_rte").mkdir()
    with pytest.raises(FileNotFoundError) as caught:
        load_split_rows(get_task("rte"), "validation", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "glue_rte" / "validation.jsonl") in message and "'rte'" in message, message
    assert "put validation.jsonl there or drop data_dir=" in message


def test_json_list_and_parquet_files_load_like_jsonl(tmp_path):
    rows = [{"sentence": "A.", "label": 0, "idx": 0}, {"sentence": "B.", "label": 1, "idx": 1}]
    (tmp_path / "glue_cola").mkdir()
    (tmp_path / "glue_cola" / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "glue_cola" / "validation.parquet")
    from_json = load_split_rows(get_task("cola"), "train", tmp_path)
    from_parquet = load_split_rows(get_task("cola"), "validation", tmp_path)
    assert from_json == rows and from_parquet == rows
    assert from_json[1].origin.endswith("train.json item 2")
    assert from_parquet[0].origin.endswith("validation.parquet row 1")


def test_rows_remember_their_file_line_even_after_blank_lines(tmp_path):
    path = tmp_path / "glue_cola" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"sentence": "A.", "label": 0}\n\n{"sentence": "B.", "label": 7}\n', encoding="utf-8")
    rows = load_split_rows(get_task("cola"), "train", tmp_path)
    assert [row.number for row in rows] == [1, 3]
    with pytest.raises(MalformedRowError, match=r"train\.jsonl line 3: field 'label'"):
        rows_to_examples(get_task("cola"), rows, "train")


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "glue_cola" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"sentence": "A.", "label": 0}\n{"sentence": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.jsonl line 2: invalid JSON"):
        load_split_rows(get_task("cola"), "train", tmp_path)


def test_hub_failure_says_the_hub_was_unreachable_and_suggests_data_dir(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ConnectionError) as caught:
        load_split_rows(get_task("obqa"), "train")
    message = str(caught.value)
    assert "allenai/openbookqa" in message and "hub unreachable" in message and "data_dir=" in message, message


def test_hub_rows_are_plain_dicts_with_a_row_origin(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_list([{"sentence": "A.", "label": 1}]))
    rows = load_split_rows(get_task("cola"), "train")
    assert rows == [{"sentence": "A.", "label": 1}]
    assert rows[0].origin == "nyu-mll/glue (cola) split train row 1"



def test_hub_repository_with_a_loading_script_falls_back_to_the_parquet_conversion(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found swag.py")
        return datasets.Dataset.from_list([{"startphrase": "He walks.", "label": 0}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = load_split_rows(get_task("swag"), "validation")
    assert rows == [{"startphrase": "He walks.", "label": 0}]
    assert calls == [("allenai/swag", "regular", "validation", None),
                     ("allenai/swag", "regular", "validation", "refs/convert/parquet")]


def test_other_hub_errors_do_not_retry_the_parquet_conversion(monkeypatch):
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(kwargs.get("revision"))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ConnectionError):
        load_split_rows(get_task("swag"), "validation")
    assert calls == [None]

# ---- splits and protocols -----------------------------------------------------------------


def test_synthetic_swag_file_loads_under_both_protocols(tmp_path):
    write_jsonl(tmp_path / "swag" / "train.jsonl", SWAG_ROWS)
    write_jsonl(tmp_path / "swag" / "validation.jsonl", SWAG_ROWS[:8])
    data = load_task("swag", tmp_path, selection_size=5, seed=1)
    assert (len(data.train), len(data.selection), len(data.evaluation)) == (35, 5, 8)
    assert {e.uid for e in data.train}.isdisjoint(e.uid for e in data.selection)
    assert data.evaluation[2].answer == 2 and data.evaluation[2].prompt.startswith(
        "Choose the sentence that best completes the start phrase below:\nstart phrase: Someone walks. He 2\n")
    reference = load_task("swag", tmp_path, protocol="reference")
    assert len(reference.train) == 40 and reference.selection is reference.evaluation


def test_mmlu_pro_training_prompts_drop_the_category_and_held_out_prompts_keep_it(tmp_path):
    rows = [{"question": f"Q{i}?", "options": ["a", "b", "c"], "answer_index": i % 3, "category": "computer_science"}
            for i in range(30)]
    write_jsonl(tmp_path / "mmlu_pro" / "test.jsonl", rows)
    for protocol in ("selection", "reference"):
        data = load_task("mmlu_pro", tmp_path, protocol=protocol)
        assert all(e.prompt.startswith("Below is a multiple-choice question. Please") for e in data.train)
        held_out = data.selection + data.evaluation
        assert all(e.prompt.startswith("Below is a multiple-choice question about computer science.") for e in held_out)


def test_selection_carve_is_deterministic_and_seed_dependent(tmp_path):
    write_jsonl(tmp_path / "swag" / "train.jsonl", SWAG_ROWS)
    write_jsonl(tmp_path / "swag" / "validation.jsonl", SWAG_ROWS[:4])
    first = [e.uid for e in load_task("swag", tmp_path, seed=42).selection]
    again = [e.uid for e in load_task("swag", tmp_path, seed=42).selection]
    other = [e.uid for e in load_task("swag", tmp_path, seed=7).selection]
    assert first == again and first != other
    assert len(first) == 4  # default: min(500, 10% of 40)


def test_skipped_rows_are_counted_per_part(tmp_path):
    bad = dict(SWAG_ROWS[0], label=-1)
    write_jsonl(tmp_path / "swag" / "train.jsonl", SWAG_ROWS)
    write_jsonl(tmp_path / "swag" / "validation.jsonl", [bad, SWAG_ROWS[1], bad])
    data = load_task("swag", tmp_path, skip_bad_rows=True)
    assert data.skipped == {"train": 0, "selection": 0, "evaluation": 2}
    assert [e.uid for e in data.evaluation] == ["swag/validation/2"]
    with pytest.raises(MalformedRowError, match=r"validation\.jsonl line 1: field 'label'"):
        load_task("swag", tmp_path)


def test_unknown_protocol_and_bad_selection_size_are_errors(tmp_path):
    write_jsonl(tmp_path / "swag" / "train.jsonl", SWAG_ROWS)
    write_jsonl(tmp_path / "swag" / "validation.jsonl", SWAG_ROWS[:4])
    with pytest.raises(ValueError, match="did you mean 'reference'"):
        load_task("swag", tmp_path, protocol="referenc")
    with pytest.raises(ValueError, match=r"selection_size=40 must lie in \[1, 39\]"):
        load_task("swag", tmp_path, selection_size=40)


def test_carve_matches_the_reference_two_step_train_test_split():
    import datasets

    for count in (12032, 101, 15):
        table = datasets.Dataset.from_dict({"i": list(range(count))})
        outer = table.train_test_split(test_size=0.2, seed=42)
        inner = outer["test"].train_test_split(test_size=0.5, seed=42)
        expected = [list(outer["train"]["i"]), list(inner["train"]["i"]), list(inner["test"]["i"])]
        assert [list(part) for part in carve_train_validation_test(count)] == expected, f"count={count}"


# ---- the shared local data ----------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("local_dir", sorted(LOCAL_ROW_COUNTS))
def test_local_data_rows_match_sources_md(local_dir):
    folder = SHARED_DATA / local_dir
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    spec = TASK_OF_DIR[local_dir]
    for split, expected in LOCAL_ROW_COUNTS[local_dir].items():
        rows = load_split_rows(spec, split, SHARED_DATA)
        assert len(rows) == expected, f"{local_dir}/{split}: expected {expected} rows, got {len(rows)}"
        examples, skipped = rows_to_examples(spec, rows, split, skip_bad_rows=True)
        expected_skips = expected if (local_dir, split) in UNLABELLED_SPLITS else 0
        assert skipped == expected_skips, f"{local_dir}/{split}: {skipped} malformed rows, expected {expected_skips}"


def test_mmlu_pro_carve_is_deterministic_disjoint_and_complete():
    data = load_task("mmlu_pro", DATA_DIR)
    again = load_task("mmlu_pro", DATA_DIR, seed=7)  # the carve ignores the training seed
    sizes = (len(data.train), len(data.selection), len(data.evaluation))
    assert sizes == scaled((9625, 1203, 1204), (6, 1, 1)), sizes
    uids = [[e.uid for e in part] for part in (data.train, data.selection, data.evaluation)]
    assert uids == [[e.uid for e in part] for part in (again.train, again.selection, again.evaluation)]
    everything = set().union(*map(set, uids))
    assert len(everything) == scaled(12032, 8) == sum(sizes)
    reference = load_task("mmlu_pro", DATA_DIR, protocol="reference", eval_only=True)
    assert [e.uid for e in reference.evaluation] == uids[1] and reference.train == []
    with pytest.raises(ValueError, match="drop selection_size"):
        load_task("mmlu_pro", DATA_DIR, selection_size=100)


def test_hellaswag_needs_eval_only_because_its_train_split_is_absent():
    with pytest.raises(FileNotFoundError) as caught:
        load_task("hellaswag", DATA_DIR)
    message = str(caught.value)
    assert str(DATA_DIR / "hellaswag" / "train.jsonl") in message and "eval_only=True" in message, message
    data = load_task("hellaswag", DATA_DIR, eval_only=True)
    assert (len(data.train), len(data.selection), len(data.evaluation)) == (0, 0, scaled(10042, 8))


def test_arc_challenge_protocols_split_train_and_keep_validation_for_reporting():
    data = load_task("arc_c", DATA_DIR)
    assert (len(data.train), len(data.selection), len(data.evaluation)) == scaled((1008, 111, 299), (7, 1, 8))
    reference = load_task("arc_c", DATA_DIR, protocol="reference")
    assert (len(reference.train), len(reference.selection)) == scaled((1119, 299), (8, 8))
    assert [e.uid for e in reference.selection] == [e.uid for e in data.evaluation]


# ---- the in-repository fixture ------------------------------------------------------------

FIXTURE_FILES = sorted(path.relative_to(FIXTURE_DATA) for path in FIXTURE_DATA.glob("*/*.jsonl"))


@pytest.mark.parametrize("local_dir", sorted({spec.local_dir for spec in TASKS.values()} - {"swag"}))
def test_fixture_has_every_split_a_task_reads_and_every_row_is_valid(local_dir):
    spec = TASK_OF_DIR[local_dir]
    for split in sorted({spec.train_split, spec.eval_split}):
        if local_dir == "hellaswag" and split == "train":
            continue  # no train split exists locally (SOURCES.md)
        rows = load_split_rows(spec, split, FIXTURE_DATA)
        examples, skipped = rows_to_examples(spec, rows, split, skip_bad_rows=True)
        assert len(rows) == 8 and skipped == 0, f"{local_dir}/{split}: {len(rows)} rows, {skipped} malformed"


@needs_data
@pytest.mark.parametrize("relative", FIXTURE_FILES, ids=[str(path) for path in FIXTURE_FILES])
def test_fixture_rows_are_the_first_rows_of_the_shared_data(relative):
    fixture = (FIXTURE_DATA / relative).read_text().splitlines()
    with open(SHARED_DATA / relative) as handle:
        shared = [next(handle).rstrip("\n") for _ in fixture]
    assert fixture == shared, f"{relative} must be the first {len(fixture)} rows of the shared copy, verbatim"
