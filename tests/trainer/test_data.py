"""Data readers: GLUE quirks (row counts from the GLUE folder's README), user files, HF folders."""

import json
import os
import re
from pathlib import Path

import pytest

from trainer.data import (GLUE, from_records, glue_task_name, load_files, load_glue, load_hf_folder, read_records,
                          read_tsv, subsample)

GLUE_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "dev.tsv").is_file(), reason="GLUE data not available")

# (train rows, dev rows, class balance of dev) as verified in the GLUE folder's README.
README_COUNTS = {"sst2": (67349, 872), "rte": (2490, 277), "mrpc": (3668, 408), "cola": (8551, 1043),
                 "stsb": (5749, 1500), "wnli": (635, 71)}


@needs_glue
@pytest.mark.parametrize("task", sorted(README_COUNTS))
def test_glue_row_counts(task):
    data = load_glue(task, GLUE_DIR)
    assert (len(data.train), len(data.dev)) == README_COUNTS[task]
    assert all(len(e.texts) == len(data.inputs) for e in data.train + data.dev)


@needs_glue
def test_glue_label_balance_matches_readme():
    dev = {t: load_glue(t, GLUE_DIR).dev for t in ("sst2", "rte", "mrpc", "cola", "wnli")}
    positive = lambda examples, cls: sum(e.label == cls for e in examples)  # noqa: E731
    assert positive(dev["sst2"], 1) == 444
    assert positive(dev["rte"], 0) == 146  # class 0 = entailment
    assert positive(dev["mrpc"], 1) == 279
    assert positive(dev["cola"], 1) == 721
    assert positive(dev["wnli"], 1) == 31
    scores = [e.label for e in load_glue("STS-B", GLUE_DIR).train]
    assert min(scores) >= 0.0 and max(scores) <= 5.0


@needs_glue
def test_cola_has_no_header_and_mrpc_bom_is_stripped():
    first = read_tsv(GLUE_DIR / "CoLA" / "train.tsv", header=False)[0]
    assert first[1] in ("0", "1")  # a data row, not a header
    assert len(load_glue("cola", GLUE_DIR).train) == 8551  # the first row is kept
    with open(GLUE_DIR / "MRPC" / "train.tsv", encoding="utf-8-sig") as f:
        assert f.readline().startswith("Quality")
    assert all(e.label in (0, 1) for e in load_glue("mrpc", GLUE_DIR).dev)


def test_quote_none_keeps_unbalanced_quotes(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    rows = "sentence\tlabel\n\"a film that \tn\n\"quoted\" twice\t1\nplain\t0\n"
    (folder / "train.tsv").write_text(rows.replace("\tn\n", "\t1\n"))
    (folder / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    data = load_glue("SST-2", tmp_path)
    assert [e.texts[0] for e in data.train] == ['"a film that ', '"quoted" twice', "plain"]
    assert [e.label for e in data.train] == [1, 1, 0]


def test_task_names():
    assert [glue_task_name(t) for t in ("SST-2", "sst2", "STS-B", "CoLA", "rte")] == ["sst2", "sst2", "stsb", "cola", "rte"]
    assert set(GLUE) == {"sst2", "cola", "mrpc", "rte", "stsb", "wnli"}
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_task_name("qqp")


def test_user_csv_and_jsonl(tmp_path):
    (tmp_path / "train.csv").write_text('review,stars\n"great, really",pos\nbad,neg\nok,pos\n')
    (tmp_path / "dev.jsonl").write_text(json.dumps({"review": "meh", "stars": "neg"}) + "\n")
    data = load_files("reviews", tmp_path / "train.csv", tmp_path / "dev.jsonl", ["review"], "stars")
    assert data.labels == ("neg", "pos") and data.inputs == ("review",)
    assert data.train[0].texts == ("great, really",) and data.train[0].label == 1
    assert data.dev[0].label == 0
    with pytest.raises(ValueError, match="not one of"):
        from_records("x", [{"t": "a", "y": "p"}, {"t": "b", "y": "n"}], [{"t": "c", "y": "z"}], ["t"], "y")
    with pytest.raises(ValueError, match="missing field"):
        from_records("x", [{"t": "a"}], [], ["t"], "y")


def test_user_tsv_keeps_quotes_as_text_and_rows_apart(tmp_path):
    # With CSV quoting, the quote opening this text would swallow the tab, the newline and the next row.
    (tmp_path / "train.tsv").write_text('text\tlabel\n"so-called" film\tpos\n"bad\tneg\nok\tpos\n')
    data = load_files("q", tmp_path / "train.tsv", tmp_path / "train.tsv", ["text"], "label")
    assert [e.texts[0] for e in data.train] == ['"so-called" film', '"bad', "ok"]
    assert [data.labels[e.label] for e in data.train] == ["pos", "neg", "pos"]


def test_tsv_written_with_csv_quoting_is_read_as_asked_and_refused_when_ambiguous(tmp_path):
    import csv

    path = tmp_path / "quoted.tsv"
    with open(path, "w", newline="") as f:  # as pandas' to_csv(sep="\\t") and csv.writer write TSV
        csv.writer(f, delimiter="\t").writerows([("text", "label"), ('He said "hi"', "pos"), ("ok", "neg")])
    assert '"He said ""hi"""' in path.read_text()
    # Both readings are consistent tables that differ: say which, rather than guess.
    with pytest.raises(ValueError, match="--tsv-quoting none .* or csv"):
        load_files("q", path, path, ["text"], "label")
    read = {q: [e.texts[0] for e in load_files("q", path, path, ["text"], "label", tsv_quoting=q).train]
            for q in ("csv", "none")}
    assert read == {"csv": ['He said "hi"', "ok"], "none": ['"He said ""hi"""', "ok"]}
    # A quoted newline makes the quotes-as-text reading inconsistent: the CSV reading is the only one.
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("text", "label"), ("two\nlines", "pos"), ("ok", "neg")])
    assert [e.texts[0] for e in load_files("q", path, path, ["text"], "label").train] == ["two\nlines", "ok"]


@needs_glue
def test_glue_mrpc_as_a_user_tsv_reads_with_quotes_as_text():
    # MRPC's unbalanced quotes merge rows under CSV quoting, which then has rows of the wrong width.
    path = GLUE_DIR / "MRPC" / "train.tsv"
    with pytest.raises(ValueError, match="fields in the header"):
        read_records(path, tsv_quoting="csv")
    assert len(read_records(path)) == len(read_records(path, tsv_quoting="none")) == 3668


@pytest.mark.parametrize("name,content,message", [
    ("short.csv", "text,label\ngood film,pos\nbad film\nok film,neg\n", "line 3: 2 fields in the header"),
    ("long.tsv", "text\tlabel\ngood\tpos\textra\n", "line 2: 2 fields in the header"),
    ("header_only.csv", "text,label\n", "no rows"),
    ("broken.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b",\n', "line 2: not JSON"),
    ("array.jsonl", '[{"text": "a", "label": "pos"}]\n', "line 1: a JSON list, not an object"),
    ("null.jsonl", '{"text": null, "label": "pos"}\n{"text": "b", "label": "neg"}\n',
     "row 1: empty value in field(s) ['text']"),
    ("empty_label.csv", "text,label\na,pos\nb,\nc,neg\n", "row 2: empty value in field(s) ['label']"),
])
def test_bad_user_files_are_refused_before_training_naming_file_and_row(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        load_files("x", tmp_path / name, tmp_path / name, ["text"], "label")
    assert name in str(raised.value)


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    (tmp_path / "bom.jsonl").write_text('\ufeff{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n',
                                        encoding="utf-8")
    data = load_files("x", tmp_path / "bom.jsonl", tmp_path / "bom.jsonl", ["text"], "label")
    assert [e.texts for e in data.train] == [("a",), ("b",)]


@pytest.mark.parametrize("target", ["", "high", "nan", "inf", None])
def test_regression_targets_must_be_finite_numbers(target):
    rows = [{"a": "x", "s": "1.5"}, {"a": "y", "s": target}]
    with pytest.raises(ValueError, match="row 2"):
        from_records("sim", rows, rows[:1], ["a"], "s", regression=True)


def test_user_pairs_regression():
    rows = [{"a": "x", "b": "y", "s": "1.5"}, {"a": "p", "b": "q", "s": 4}]
    data = from_records("sim", rows, rows, ["a", "b"], "s", regression=True)
    assert data.problem_type == "regression" and data.labels == ("score",) and data.metric == "spearman"
    assert data.train[1] .texts == ("p", "q") and data.train[1].label == 4.0


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=features),
        "validation": datasets.Dataset.from_dict({"text": ["fine"], "label": [1]}, features=features)})
    dd.save_to_disk(str(tmp_path / "ds"))
    data = load_hf_folder("hf", tmp_path / "ds", ["text"], "label")
    assert data.labels == ("neg", "pos")
    assert [e.label for e in data.train] == [1, 0] and data.dev[0].texts == ("fine",)


def test_subsample_is_seeded():
    rows = [{"t": str(i), "y": str(i % 2)} for i in range(100)]
    data = from_records("x", rows, rows[:3], ["t"], "y")
    a, b, c = subsample(data, 10, 0), subsample(data, 10, 0), subsample(data, 10, 1)
    assert len(a.train) == 10 and a.train == b.train and a.train != c.train and a.dev == data.dev
    assert subsample(data, None, 0) is data


def test_validation_split_is_disjoint_seeded_stratified_and_capped():
    from trainer.data import split_validation

    rows = [{"text": f"sentence {i}", "label": "a" if i % 4 else "b"} for i in range(400)]  # 300 a, 100 b
    data = from_records("t", rows, rows[:5], ["text"], "label")
    train, val = split_validation(data, 0.1, seed=3)
    assert len(val) == 40 and len(train.train) == 360
    assert not {e.texts for e in val} & {e.texts for e in train.train}  # disjoint
    assert sorted(e.texts for e in val + train.train) == sorted(e.texts for e in data.train)  # a partition
    assert sum(e.label == data.labels.index("b") for e in val) == 10  # stratified: b keeps its 25%
    again, val_again = split_validation(data, 0.1, seed=3)
    assert val_again == val and again == train  # seeded
    assert split_validation(data, 0.1, seed=4)[1] != val
    assert len(split_validation(data, 0.5, seed=0, max_examples=50)[1]) == 50
    assert train.dev == data.dev  # dev is never touched


def test_validation_split_keeps_every_class_on_both_sides_and_refuses_bad_fractions():
    from trainer.data import split_validation

    rows = [{"text": f"s{i}", "label": "rare" if i == 0 or i == 1 else "common"} for i in range(30)]
    data = from_records("t", rows, rows, ["text"], "label")
    train, val = split_validation(data, 0.1, seed=0)
    rare = data.labels.index("rare")
    assert sum(e.label == rare for e in val) == 1 and sum(e.label == rare for e in train.train) == 1
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            split_validation(data, bad, seed=0)


def test_user_data_without_a_dev_file(tmp_path):
    from trainer.data import load_files

    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(10)))
    data = load_files("t", tmp_path / "t.csv", None, ["text"], "label")
    assert len(data.train) == 10 and data.dev == ()
