"""Training data: GLUE TSVs, a user's CSV/JSONL, or a local HF ``datasets`` folder -> TaskData.

GLUE quirks (see the data folder's README): read with ``QUOTE_NONE`` (unbalanced quotes in MRPC
and SST-2 would merge rows), CoLA has no header, MRPC's header starts with a UTF-8 BOM.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

REGRESSION = "regression"
CLASSIFICATION = "single_label_classification"


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one text, or a (first, second) pair
    label: int | float  # class id, or the regression target


@dataclass(frozen=True)
class TaskData:
    name: str  # task name for the delta (lowercase, e.g. "rte")
    inputs: tuple[str, ...]  # field names of the texts, e.g. ("sentence1", "sentence2")
    labels: tuple[str, ...]  # class names in class-id order; ("score",) for regression
    problem_type: str
    metric: str  # key of the headline metric, see trainer.metrics
    train: tuple[Example, ...]
    dev: tuple[Example, ...]


@dataclass(frozen=True)
class GlueSpec:
    folder: str
    header: bool
    text_columns: tuple[int, ...]
    label_column: int
    inputs: tuple[str, ...]
    labels: tuple[str, ...]
    raw_labels: tuple[str, ...] | None  # raw value of each class id; None = regression
    metric: str


GLUE: dict[str, GlueSpec] = {
    "sst2": GlueSpec("SST-2", True, (0,), 1, ("sentence",), ("negative", "positive"), ("0", "1"), "accuracy"),
    "cola": GlueSpec("CoLA", False, (3,), 1, ("sentence",), ("unacceptable", "acceptable"), ("0", "1"), "mcc"),
    "mrpc": GlueSpec("MRPC", True, (3, 4), 0, ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                     ("0", "1"), "f1"),
    "rte": GlueSpec("RTE", True, (1, 2), 3, ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                    ("entailment", "not_entailment"), "accuracy"),
    "stsb": GlueSpec("STS-B", True, (7, 8), 9, ("sentence1", "sentence2"), ("score",), None, "spearman"),
    "wnli": GlueSpec("WNLI", True, (1, 2), 3, ("sentence1", "sentence2"), ("not_entailment", "entailment"),
                     ("0", "1"), "accuracy"),
}


def glue_task_name(task: str) -> str:
    """'SST-2', 'sst2', 'STS-B' -> 'sst2', 'stsb'."""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of {', '.join(GLUE)}")
    return key


def read_tsv(path: Path, header: bool) -> list[list[str]]:
    """Rows of a GLUE TSV (header dropped). utf-8-sig strips MRPC's BOM and is a no-op elsewhere."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def load_glue(task: str, root: str | Path) -> TaskData:
    name = glue_task_name(task)
    spec = GLUE[name]
    folder = Path(root) / spec.folder

    def split(file: str) -> tuple[Example, ...]:
        out = []
        for i, row in enumerate(read_tsv(folder / file, spec.header)):
            needed = max(*spec.text_columns, spec.label_column) + 1
            if len(row) < needed:
                raise ValueError(f"{folder / file}: row {i + 1} has {len(row)} columns, expected >= {needed}")
            raw = row[spec.label_column]
            label = float(raw) if spec.raw_labels is None else spec.raw_labels.index(raw)
            out.append(Example(tuple(row[c] for c in spec.text_columns), label))
        return tuple(out)

    problem = REGRESSION if spec.raw_labels is None else CLASSIFICATION
    return TaskData(name, spec.inputs, spec.labels, problem, spec.metric, split("train.tsv"), split("dev.tsv"))


# ----------------------------------------------------------------------------- user data

TSV_QUOTING = ("auto", "none", "csv")


def read_records(path: Path, tsv_quoting: str = "auto") -> list[dict]:
    """CSV (header row, standard quoting), TSV (header row) or JSONL (one object per line), chosen
    by extension. Errors name the file and line.

    TSV has two conventions: quotes are text (GLUE: ``QUOTE_NONE``, ``tsv_quoting="none"``), or
    fields are quoted as pandas and ``csv.writer`` write them (``"csv"``). ``"auto"`` reads both
    ways and uses the one reading when they agree or only one is a consistent table; when both
    are and they differ, it refuses, naming the first difference, rather than guess."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_table(path, ",", csv.QUOTE_MINIMAL)
    elif suffix == ".tsv":
        if tsv_quoting not in TSV_QUOTING:
            raise ValueError(f"tsv_quoting: {tsv_quoting!r} is not one of {TSV_QUOTING}")
        rows = _read_tsv(path, tsv_quoting)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path} line {number}: not JSON ({e}); the file must hold one JSON "
                                 f"object per line (JSONL)") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: a JSON {type(row).__name__}, not an object")
            rows.append(row)
    return rows


def _read_table(path: Path, delimiter: str, quoting: int) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        rows = []
        for row in reader:
            if None in row or None in row.values():  # more / fewer fields than the header
                raise ValueError(f"{path} line {reader.line_num}: {len(reader.fieldnames or [])} fields in the "
                                 f"header, a different number in this row")
            rows.append(row)
    return rows


def _read_tsv(path: Path, tsv_quoting: str) -> list[dict]:
    if tsv_quoting != "auto":
        return _read_table(path, "\t", csv.QUOTE_NONE if tsv_quoting == "none" else csv.QUOTE_MINIMAL)
    readings, errors = [], []
    for quoting in (csv.QUOTE_NONE, csv.QUOTE_MINIMAL):
        try:
            readings.append(_read_table(path, "\t", quoting))
        except ValueError as e:
            errors.append(e)
    if not readings:
        raise errors[0]
    if len(readings) == 1 or readings[0] == readings[1]:
        return readings[0]
    plain, quoted = readings
    row = next((i for i, (a, b) in enumerate(zip(plain, quoted)) if a != b), min(len(plain), len(quoted)))
    seen = plain[row] if row < len(plain) else "(no row)"
    raise ValueError(f"{path}: reads differently with quotes as text ({len(plain)} rows) and as CSV quoting "
                     f"({len(quoted)} rows); first difference at row {row + 1}: {seen!r}. Say which: "
                     f"--tsv-quoting none (quotes are text, as in GLUE) or csv (quoted as pandas writes TSV)")


def from_records(name: str, train: Sequence[dict], dev: Sequence[dict] | None, text_fields: Sequence[str],
                 label_field: str, regression: bool = False,
                 labels: Sequence[str] | None = None, sources: tuple[str, str] = ("train", "dev")) -> TaskData:
    """Build a task from row dicts. Class names are ``labels`` if given, else the sorted distinct
    training labels (so class ids do not depend on row order). Missing or empty texts and labels,
    and regression targets that are not finite numbers, are refused before any training, naming
    the row (``sources``: what to call the two splits in messages, e.g. their files). ``dev``
    None: no dev set (the trainer still picks epochs on a split of ``train``)."""
    text_fields = tuple(text_fields)
    dev_given = dev is not None
    dev = dev if dev is not None else []
    if len(text_fields) not in (1, 2):
        raise ValueError(f"text fields: give one or two, got {list(text_fields)}")
    for source, rows in zip(sources, (train, dev)):
        if not rows and (rows is train or dev_given):
            raise ValueError(f"{source}: no rows")
        for i, row in enumerate(rows):
            missing = [f for f in (*text_fields, label_field) if f not in row]
            if missing:
                raise ValueError(f"{source} row {i + 1}: missing field(s) {missing}")
            empty = [f for f in (*text_fields, label_field) if row[f] is None or str(row[f]).strip() == ""]
            if empty:
                raise ValueError(f"{source} row {i + 1}: empty value in field(s) {empty}")
    if regression:
        classes: tuple[str, ...] = ("score",)
    else:
        classes = tuple(labels) if labels else tuple(sorted({str(r[label_field]) for r in train}))
        if len(classes) < 2:
            raise ValueError(f"label field {label_field!r}: need at least two classes, got {list(classes)}")

    def convert(rows: Sequence[dict], source: str) -> tuple[Example, ...]:
        out = []
        for i, row in enumerate(rows):
            raw = row[label_field]
            if regression:
                try:
                    label: int | float = float(raw)
                except (TypeError, ValueError):
                    label = math.nan
                if not math.isfinite(label):
                    raise ValueError(f"{source} row {i + 1}: regression target {raw!r} is not a finite number")
            elif str(raw) in classes:
                label = classes.index(str(raw))
            else:
                raise ValueError(f"{source} row {i + 1}: label {raw!r} is not one of {list(classes)}")
            out.append(Example(tuple(str(row[f]) for f in text_fields), label))
        return tuple(out)

    problem = REGRESSION if regression else CLASSIFICATION
    metric = "spearman" if regression else "accuracy"
    return TaskData(name, text_fields, classes, problem, metric, convert(train, sources[0]), convert(dev, sources[1]))


def load_files(name: str, train_path: str | Path, dev_path: str | Path | None, text_fields: Sequence[str],
               label_field: str, regression: bool = False, labels: Sequence[str] | None = None,
               tsv_quoting: str = "auto") -> TaskData:
    """A task from your files; ``dev_path`` None: no dev set (only the validation split carved from train)."""
    dev = read_records(Path(dev_path), tsv_quoting) if dev_path is not None else None
    return from_records(name, read_records(Path(train_path), tsv_quoting), dev,
                        text_fields, label_field, regression, labels, sources=(str(train_path), str(dev_path)))


def load_hf_folder(name: str, path: str | Path, text_fields: Sequence[str], label_field: str,
                   regression: bool = False, train_split: str = "train",
                   dev_split: str = "validation") -> TaskData:
    """A ``DatasetDict`` saved with ``save_to_disk``. Needs the optional ``datasets`` package;
    integer labels with a ``ClassLabel`` feature keep that feature's names and order."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError("reading a Hugging Face datasets folder needs the 'datasets' package "
                           "(pip install datasets); CSV/JSONL files work without it") from None
    dd = datasets.load_from_disk(str(path))
    for split in (train_split, dev_split):
        if split not in dd:
            raise ValueError(f"{path}: no split {split!r} (has {list(dd)})")
    feature = dd[train_split].features.get(label_field)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) and not regression else None
    train, dev = (list(dd[s]) for s in (train_split, dev_split))
    if names:
        train, dev = ([{**r, label_field: names[r[label_field]]} for r in rows] for rows in (train, dev))
    return from_records(name, train, dev, text_fields, label_field, regression, names)


def subsample(data: TaskData, max_train_examples: int | None, seed: int) -> TaskData:
    """A seeded random subset of the training set (dev untouched); None or >= size keeps all."""
    if max_train_examples is None or max_train_examples >= len(data.train):
        return data
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(data.train)), max_train_examples))
    return replace(data, train=tuple(data.train[i] for i in keep))


def split_validation(data: TaskData, fraction: float, seed: int,
                     max_examples: int | None = 2000) -> tuple[TaskData, tuple[Example, ...]]:
    """Carve a seeded validation split from ``data.train``: ``(data without it, val)``.

    Epochs, early stopping and learning rates are chosen on this split, never on ``data.dev``
    (the set the tables report). Classification splits are stratified: every class keeps its share
    (at least one example in val and one in train per class that has two). ``max_examples`` caps
    the split so that a large train set (SST-2's 67k) does not spend minutes per epoch on it."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction: {fraction!r} must be between 0 and 1 (exclusive)")
    n = len(data.train)
    size = max(1, round(fraction * n))
    if max_examples is not None:
        size = min(size, max_examples)
    if n < 2:
        raise ValueError(f"{data.name}: {n} training example(s), too few to carve a validation split")
    rng = random.Random(seed)
    if data.problem_type == REGRESSION:
        chosen = set(rng.sample(range(n), size))
    else:
        by_class: dict[int, list[int]] = {}
        for i, example in enumerate(data.train):
            by_class.setdefault(int(example.label), []).append(i)
        chosen = set()
        for members in by_class.values():
            share = round(size * len(members) / n)
            take = min(len(members) - 1, max(1, share)) if len(members) > 1 else 0
            chosen.update(rng.sample(members, take))
    train = tuple(e for i, e in enumerate(data.train) if i not in chosen)
    val = tuple(data.train[i] for i in sorted(chosen))
    return replace(data, train=train), val
