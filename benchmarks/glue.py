"""The inputs every benchmark times: real GLUE dev texts (single sentences and sentence pairs at
their real length mix, or packed to a fixed length), tokenized once and padded into the same
:class:`Batch` tensors for every variant, so that tokenization and padding stay outside the
timings. The GLUE folder is ``--glue-dir``, else env ``GLUE_DIR``, else ``../shared/data/glue``
relative to the current directory, as for ``bitfit-train``.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from bitfit_serve import inputs
from bitfit_serve.inputs import EncodedInput

# (file, columns of the text or text pair, has a header row)
GLUE_DEV = {
    "SST-2": ("SST-2/dev.tsv", (0,), True),
    "CoLA": ("CoLA/dev.tsv", (3,), False),
    "MRPC": ("MRPC/dev.tsv", (3, 4), True),
    "RTE": ("RTE/dev.tsv", (1, 2), True),
    "STS-B": ("STS-B/dev.tsv", (7, 8), True),
    "QNLI": ("QNLI/dev.tsv", (1, 2), True),
    "WNLI": ("WNLI/dev.tsv", (1, 2), True),
}

Text = str | tuple[str, str]


def default_glue_dir() -> Path:
    """The GLUE folder when ``--glue-dir`` is not given: env ``GLUE_DIR``, else ``../shared/data/glue``
    relative to the current directory (the rule of ``bitfit-train``)."""
    return Path(os.environ.get("GLUE_DIR", "../shared/data/glue"))


def glue_dev_texts(glue_dir: Path) -> dict[str, list[Text]]:
    """Every GLUE dev input by task: a sentence, or a sentence pair for the pair tasks."""
    texts = {}
    for task, (file, columns, header) in GLUE_DEV.items():
        path = glue_dir / file
        if not path.is_file():
            raise SystemExit(f"GLUE dev file missing: {path} (pass --glue-dir or set GLUE_DIR)")
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        rows = rows[1:] if header else rows
        pick = (lambda r: r[columns[0]]) if len(columns) == 1 else (lambda r: (r[columns[0]], r[columns[1]]))
        texts[task] = [pick(r) for r in rows if len(r) > max(columns)]
    return texts


def sample_texts(glue_dir: Path, n: int, seed: int = 0) -> list[Text]:
    """``n`` GLUE dev inputs, task chosen uniformly then an input of it: the real length mix of
    single sentences (SST-2, CoLA) and pairs (MRPC, RTE, STS-B, QNLI, WNLI)."""
    by_task = glue_dev_texts(glue_dir)
    rng = random.Random(seed)
    tasks = sorted(by_task)
    return [rng.choice(by_task[rng.choice(tasks)]) for _ in range(n)]


def split_texts(texts: Sequence[Text]) -> tuple[list[str], list[tuple[str, str]]]:
    """GLUE inputs into single sentences and sentence pairs."""
    return [t for t in texts if isinstance(t, str)], [t for t in texts if not isinstance(t, str)]


def tokenize(tokenizer, texts: Sequence[Text], max_length: int = 128) -> list[EncodedInput]:
    """Each text (or pair) as the server tokenizes it (``bitfit_serve.inputs.tokenize``)."""
    out = []
    for t in texts:
        first, second = (t, None) if isinstance(t, str) else t
        out += inputs.tokenize(tokenizer, [first], None if second is None else [second], max_length)
    return out


def packed_texts(tokenizer, glue_dir: Path, n: int, length: int) -> list[EncodedInput]:
    """``n`` sequences of exactly ``length`` tokens of real text: consecutive SST-2 dev sentences
    joined until long enough, then truncated (for the fixed 32 x 128 reference shape)."""
    sentences = glue_dev_texts(glue_dir)["SST-2"]
    out, i = [], 0
    while len(out) < n:
        words = []
        while len(tokenizer(" ".join(words))["input_ids"]) < length:
            words.append(sentences[i % len(sentences)])
            i += 1
        out += inputs.tokenize(tokenizer, [" ".join(words)], None, length)
    return out


@dataclass(frozen=True)
class Batch:
    """Padded tensors for one batch, the same for every variant."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    token_type_ids: torch.Tensor  # [B, T]
    lengths: tuple[int, ...]  # real tokens per sequence

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def pad(encoded: Sequence[EncodedInput], pad_id: int, device: str = "cpu") -> Batch:
    padded = inputs.collate(encoded, pad_id).to(device)
    return Batch(padded.input_ids, padded.attention_mask, padded.token_type_ids, tuple(len(e) for e in encoded))


def batches_of(encoded: Sequence[EncodedInput], batch_size: int, count: int, pad_id: int, device: str,
               seed: int = 0) -> list[Batch]:
    """``count`` batches of ``batch_size`` inputs drawn at random (no length sorting: the mix a
    server sees when one batch collects whatever arrived)."""
    rng = random.Random(seed)
    return [pad(rng.sample(list(encoded), batch_size), pad_id, device) for _ in range(count)]
