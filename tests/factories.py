"""Tiny random BERT/RoBERTa checkpoints and random deltas for fast tests. No downloads.

The BERT tokenizer is the bundled MiniLM's WordPiece vocabulary; the RoBERTa one is a byte-level
BPE trained here on a few sentences, so pair encoding (``</s></s>``) is the real RoBERTa format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

from bitfit_serve.delta import Delta
from bitfit_serve.model.base import default_model_path, fingerprint, load_hf_base

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, hidden_act="gelu")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a gripping and beautifully made film",
    "the plot is thin and the acting is wooden",
    "a man is playing a guitar on the street",
    "she said that the results were not what anyone expected",
    "hello world, this is a test of the tokenizer!",
]

SENTENCES = [
    "a gripping, beautifully made film",
    "the plot is thin",
    "Nobody expected the results.",
    "hello world",
    "A man is playing a guitar on the street while people walk by and listen.",
    "x",
    "the quick brown fox jumps over the lazy dog again and again",
    "what a waste of two hours",
]


def make_tiny_model(folder: Path, architecture: str = "bert", seed: int = 0) -> Path:
    """Write a tiny random checkpoint + tokenizer into ``folder`` (HF layout) and return it."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if architecture == "bert":
        tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, type_vocab_size=2, **TINY))
    elif architecture == "roberta":
        tokenizer = _tiny_roberta_tokenizer()
        model = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), type_vocab_size=1, pad_token_id=1,
                                           bos_token_id=0, eos_token_id=2, **TINY))
    else:
        raise ValueError(architecture)
    # Random init leaves biases at 0 and gammas at 1; make them non-trivial so a wrong row shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_roberta_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 5, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                      ("<s>", bpe.token_to_id("<s>")))
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                cls_token="<s>", sep_token="</s>")


def random_delta(model_dir: Path | None, task: str, *, sites: Iterable[str] | str = "all",
                 num_labels: int = 2, problem_type: str = "single_label_classification",
                 pooling: str = "mean", inputs: Sequence[str] = ("text",), max_length: int = 64,
                 scale: float = 0.5, seed: int = 0, hf_base=None) -> Delta:
    """A delta whose values are the base's plus noise at the chosen sites ("all", "biases",
    "gammas", or an explicit list), so every task measurably differs from the base."""
    if hf_base is None:
        _, _, hf_base = load_hf_base(model_dir)
    params = dict(hf_base.named_parameters())
    from bitfit_serve.model.architectures import SITE_RE

    all_sites = [n for n in params if SITE_RE.match(n)]
    if sites == "all":
        chosen = all_sites
    elif sites == "biases":
        chosen = [n for n in all_sites if n.endswith(".bias")]
    elif sites == "gammas":
        chosen = [n for n in all_sites if n.endswith("LayerNorm.weight")]
    else:
        chosen = list(sites)
    g = torch.Generator().manual_seed(seed)
    values = {n: (params[n].detach() + scale * torch.randn(params[n].shape, generator=g)).float() for n in chosen}
    hidden = hf_base.config.hidden_size
    if problem_type == "regression":
        num_labels = 1
        labels = ("score",)
    else:
        labels = tuple(f"label_{i}" for i in range(num_labels))
    return Delta.of(
        task=task, sites=values,
        head_weight=torch.randn(num_labels, hidden, generator=g) / hidden ** 0.5,  # logits O(1), like a trained head
        head_bias=torch.randn(num_labels, generator=g),
        labels=labels, problem_type=problem_type, pooling=pooling,
        base_fingerprint=fingerprint(dict(hf_base.named_parameters())), architecture=hf_base.config.model_type,
        base_model=str(model_dir), inputs=tuple(inputs), max_length=max_length, scheme="test",
    )
