"""What the benchmarks compare: the model folders (the bundled MiniLM, or random-weight BERTs of
a given shape built once under ``runs/``), plain HF sequence classifiers, random trained-like
BitFit deltas (:class:`DeltaFactory`) and the ways to hand them to HF models, the engine and a
server's deltas folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from benchmarks.glue import Batch

RUNS_DIR = Path(__file__).resolve().parent.parent / "runs"  # git-ignored: generated model folders
MINILM_ENV = "BITFIT_BENCH_MINILM"  # a MiniLM folder to use instead of the bundled package

# BERT-base shape (bert-base-uncased): timing needs the shape, not trained weights.
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu")


def model_path(name: str) -> Path:
    """minilm -> the bundled all-MiniLM-L6-v2 (or the folder in $BITFIT_BENCH_MINILM: a GPU machine
    has no bundled package, see gpu_kit.py); bert-base / tiny -> random weights, saved once under runs/."""
    from bitfit_serve.model.base import default_model_path

    if name == "minilm":
        return Path(os.environ[MINILM_ENV]) if os.environ.get(MINILM_ENV) else default_model_path()
    if name in ("bert-base", "tiny"):
        folder = RUNS_DIR / f"{name}-random"
        if not (folder / "config.json").is_file():
            build_random_bert(folder, BERT_BASE if name == "bert-base" else TINY)
        return folder
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not minilm/bert-base/tiny nor a HF model folder")
    return path


def build_random_bert(folder: Path, shape: Mapping, seed: int = 0) -> Path:
    """A BERT with random weights and the bundled MiniLM's WordPiece tokenizer (same vocab as
    bert-base-uncased). Biases and LayerNorms get small random values so they are not trivial."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"), local_files_only=True)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **shape))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # several processes may build it at once: the first rename wins
    return folder


def hf_classifier(path: Path, num_labels: int, dtype: torch.dtype, device: str):
    """Plain HF ``AutoModelForSequenceClassification``, eval mode, serving dtype."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the classifier head is new on purpose: deltas fill it
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    return model.to(device=device, dtype=dtype).eval()


def bitfit_sites(hf_base) -> list[str]:
    """The sites BitFit trains: every bias of the encoder, plus the pooler's (pooling = pooler)."""
    from bitfit_serve.model.architectures import SITE_RE

    return [n for n, _ in hf_base.named_parameters() if SITE_RE.match(n) and n.endswith(".bias")]


class DeltaFactory:
    """Random trained-like deltas: base values plus small noise on the BitFit sites, a random head.

    BitFit moves biases by ~1e-2; ``scale`` 0.02 gives values of that size. Pooling is the
    pooler, so the engine does exactly the work of HF's sequence classifier."""

    def __init__(self, path: Path, scale: float = 0.02, num_labels: int = 2):
        from bitfit_serve.model.base import fingerprint, load_hf_base

        _, config, hf_base = load_hf_base(path)
        self.path, self.scale, self.num_labels = path, scale, num_labels
        self.hidden = config.hidden_size
        self.model_type = config.model_type
        params = dict(hf_base.named_parameters())
        self.base = {n: params[n].detach().float().clone() for n in bitfit_sites(hf_base)}
        self.fingerprint = fingerprint(dict(hf_base.named_parameters()))

    def __call__(self, task: str, seed: int, inputs: tuple[str, ...] = ("text",)):
        from bitfit_serve.delta import Delta

        g = torch.Generator().manual_seed(seed)
        sites = {n: v + self.scale * torch.randn(v.shape, generator=g) for n, v in self.base.items()}
        return Delta.of(
            task=task, sites=sites,
            head_weight=torch.randn(self.num_labels, self.hidden, generator=g) / self.hidden ** 0.5,
            head_bias=torch.randn(self.num_labels, generator=g) * 0.1,
            labels=tuple(f"label_{i}" for i in range(self.num_labels)),
            problem_type="single_label_classification", pooling="pooler",
            base_fingerprint=self.fingerprint, architecture=self.model_type, base_model=str(self.path),
            inputs=inputs, max_length=128, scheme="bitfit",
        )


@torch.no_grad()
def load_delta_into(model, delta) -> None:
    """Copy a delta's values into a HF sequence classifier in place (its sites and its head)."""
    base = model.base_model
    params = dict(base.named_parameters())
    for name, value in delta.sites.items():
        params[name].copy_(value)
    model.classifier.weight.copy_(delta.head_weight)
    model.classifier.bias.copy_(delta.head_bias)


def engine_batch(engine, batch: Batch, rows: Sequence[int]):
    """The same padded tensors as an EncoderBatch with one bank row per sequence."""
    from bitfit_serve.model.encoder import EncoderBatch

    return EncoderBatch.of_rows(batch.input_ids, batch.attention_mask, batch.token_type_ids, rows,
                                has_padding=min(batch.lengths) < batch.shape[1])


def write_task_files(factory: DeltaFactory, folder: Path, names: Sequence[str], pair_every: int = 2) -> dict[str, bool]:
    """One delta file per task in a server's deltas folder; every ``pair_every``-th task takes
    sentence pairs (like MRPC/RTE), the others single sentences. Returns task -> is a pair task."""
    from bitfit_serve import delta as delta_io

    folder.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for i, name in enumerate(names):
        pairs[name] = pair_every > 0 and i % pair_every == 1
        inputs = ("sentence1", "sentence2") if pairs[name] else ("text",)
        delta_io.save(factory(name, seed=i, inputs=inputs), folder / f"{name}.safetensors")
    return pairs
