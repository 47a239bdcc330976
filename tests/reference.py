"""The reference the engine must equal: a plain Hugging Face model with one task's values copied in.

BERT with ``pooler`` pooling uses ``AutoModelForSequenceClassification`` itself (dense+tanh on
[CLS], then the classifier). Every other case is HF ``AutoModel`` + the pooling + a Linear head,
written here in plain torch, independent of the engine's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from bitfit_serve.delta import Delta


def copy_sites(model: torch.nn.Module, delta: Delta, prefix: str = "") -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in delta.sites.items():
            params[prefix + name].copy_(value)


@torch.no_grad()
def reference_logits(model_dir: Path, delta: Delta, texts: Sequence) -> torch.Tensor:
    """[N, C] logits of ``texts`` (strings, or pairs for pair tasks) under ``delta``, fp32."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if delta.is_pair_task:
        firsts, seconds = [t[0] for t in texts], [t[1] for t in texts]
    else:
        firsts, seconds = list(texts), None
    enc = tokenizer(firsts, seconds, padding=True, truncation=True, max_length=delta.max_length,
                    return_tensors="pt", return_token_type_ids=True)

    arch = delta.architecture
    if arch == "bert" and delta.pooling == "pooler":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, num_labels=delta.num_labels, dtype=torch.float32).eval()
        copy_sites(model, delta, prefix="bert.")
        model.classifier.weight.copy_(delta.head_weight)
        model.classifier.bias.copy_(delta.head_bias)
        return model(**enc).logits

    model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    copy_sites(model, delta)
    return head_logits(model(**enc), enc["attention_mask"], delta)


def head_logits(out, attention_mask: torch.Tensor, delta: Delta) -> torch.Tensor:
    """HF ``AutoModel`` output -> [N, C] logits: the delta's pooling, then its Linear head."""
    hidden = out.last_hidden_state
    if delta.pooling == "pooler":
        pooled = out.pooler_output
    elif delta.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled @ delta.head_weight.T + delta.head_bias
