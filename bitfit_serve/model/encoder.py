"""Functional BERT/RoBERTa forward over plain tensors, with per-row bias/gamma banks.

Semantics, for every sequence i of a batch whose rows may belong to any mix of tasks:

    out[i] = HF_model_with_task_values(rows[i])(input_ids[i])

where every banked site is ``x[i] @ W.T + bank[rows[i]]`` (a gather, broadcast over positions)
and every un-banked site uses the shared base vector. No loop over rows or tasks: one gather per
banked site per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from bitfit_serve.model.banks import POOLING_CODES, BankView
from bitfit_serve.model.base import QKV_WEIGHT, BaseModel


@dataclass(frozen=True)
class EncoderBatch:
    """One forward pass worth of sequences, right-padded."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = token, 0 = padding
    token_type_ids: torch.Tensor  # [B, T] long
    rows: torch.Tensor  # [B] long, bank row (task version slot) per sequence
    single_row: int | None = None  # set when every sequence uses the same row: enables fused bias adds
    has_padding: bool = True  # False when every sequence fills T: attention then needs no mask
    # ``rows`` on the host, when known: pooling and head skip what the batch's tasks do not need,
    # with no device sync to find out.
    row_list: tuple[int, ...] = ()

    @classmethod
    def of_rows(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                rows: Sequence[int], has_padding: bool) -> "EncoderBatch":
        """A batch with one bank row per sequence, given on the host (``rows``, ``single_row``
        and ``row_list`` all follow from it)."""
        return cls(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                   rows=torch.tensor(list(rows), dtype=torch.long, device=input_ids.device),
                   single_row=rows[0] if len(set(rows)) == 1 else None, has_padding=has_padding,
                   row_list=tuple(rows))


class _Sites:
    """Resolves a site name to the vector to add: [B, 1, D] per-row gather, or the shared [D]."""

    def __init__(self, base: BaseModel, view: BankView, batch: EncoderBatch):
        self._weights = base.weights
        self._banks = view.sites
        self._rows = batch.rows
        self._single_row = batch.single_row

    def __call__(self, name: str) -> torch.Tensor:
        bank = self._banks.get(name)
        if bank is None:
            return self._weights[name]
        if self._single_row is not None:
            return bank[self._single_row]  # [D]: lets F.linear fuse the add
        return bank.index_select(0, self._rows).unsqueeze(1)  # [B, 1, D]

    def cat(self, names: list[str]) -> torch.Tensor:
        """Several sites side by side, as one bias for a fused matmul: [sum D] or [B, 1, sum D]."""
        parts = [self(n) for n in names]
        if all(t.dim() == 1 for t in parts):
            return torch.cat(parts)
        batch = self._rows.shape[0]
        return torch.cat([t.expand(batch, 1, -1) if t.dim() == 1 else t for t in parts], dim=-1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [B, T, in] -> [B, T, out]; ``bias`` is [out] (fused) or [B, 1, out] (per-row).

    Per-row: the output starts as each row's bias and the matmul accumulates into it (BLAS
    beta=1), as cheap as a fused bias; adding the bias after the matmul is one more pass over
    the output."""
    if bias.dim() == 1:
        return F.linear(x, weight, bias)
    out = bias.expand(*x.shape[:-1], weight.shape[0]).contiguous()
    out.view(-1, weight.shape[0]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return out


def _linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x @ W.T + bias``: the matmul accumulates into ``residual + bias``, so a
    per-row bias costs no pass over the output of its own (it rides on the residual add)."""
    out = residual + bias  # bias [out] or [B, 1, out] broadcasts over positions
    out.view(-1, weight.shape[0]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return out


def _layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with shared ([H]) or per-row ([B, 1, H]) gamma/beta.

    F.layer_norm only takes shared parameters. The common mixed case, per-row beta with a shared
    gamma (BitFit trains biases), adds beta in place on its output: one pass, no temporary
    (a mixed batch-8 forward on CPU: 0.952x -> 0.983x one task, against a no-affine norm + addcmul)."""
    if gamma.dim() == 1:
        out = F.layer_norm(x, x.shape[-1:], gamma, beta if beta.dim() == 1 else None, eps)
        return out if beta.dim() == 1 else out.add_(beta)
    return torch.addcmul(beta, F.layer_norm(x, x.shape[-1:], None, None, eps), gamma)


def encode(base: BaseModel, view: BankView, batch: EncoderBatch) -> torch.Tensor:
    """[B, T] token ids -> [B, T, H] final hidden states."""
    cfg, w = base.config, base.weights
    site = _Sites(base, view, batch)
    eps = cfg.layer_norm_eps
    B, T = batch.input_ids.shape
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    act = ACT2FN[cfg.hidden_act]

    position_ids = base.architecture.position_ids(batch.input_ids, cfg.pad_token_id)
    x = (F.embedding(batch.input_ids, w["embeddings.word_embeddings.weight"])
         + F.embedding(batch.token_type_ids, w["embeddings.token_type_embeddings.weight"])
         + F.embedding(position_ids, w["embeddings.position_embeddings.weight"]))
    x = _layer_norm(x, site("embeddings.LayerNorm.weight"), site("embeddings.LayerNorm.bias"), eps)

    # [B, 1, 1, T] True = attend; SDPA broadcasts it over heads and query positions. Without
    # padding no mask is needed, which lets SDPA pick its fastest kernel.
    keep = batch.attention_mask.bool()[:, None, None, :] if batch.has_padding else None

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, heads, T, head_dim]
        return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        qkv_bias = site.cat([p + "attention.self.query.bias", p + "attention.self.key.bias",
                             p + "attention.self.value.bias"])
        q, k, v = _linear(x, w[p + QKV_WEIGHT], qkv_bias).split(cfg.hidden_size, dim=-1)
        ctx = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v), attn_mask=keep)
        ctx = ctx.transpose(1, 2).reshape(B, T, cfg.hidden_size)
        attn = _linear_residual(ctx, w[p + "attention.output.dense.weight"],
                                site(p + "attention.output.dense.bias"), x)
        x = _layer_norm(attn, site(p + "attention.output.LayerNorm.weight"),
                        site(p + "attention.output.LayerNorm.bias"), eps)
        h = act(_linear(x, w[p + "intermediate.dense.weight"], site(p + "intermediate.dense.bias")))
        h = _linear_residual(h, w[p + "output.dense.weight"], site(p + "output.dense.bias"), x)
        x = _layer_norm(h, site(p + "output.LayerNorm.weight"), site(p + "output.LayerNorm.bias"), eps)
    return x


def pool(base: BaseModel, view: BankView, batch: EncoderBatch, hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B, H], each row pooled the way its task was trained (pooler / cls / mean)."""
    kinds = {view.row_pooling[r] for r in batch.row_list}
    if len(kinds) == 1:  # one task, or several that pool alike (the usual case): only that pooling
        return _pool_as(kinds.pop(), base, view, batch, hidden)
    codes = view.pooling.index_select(0, batch.rows)  # [B]
    cls = hidden[:, 0]
    pooled = torch.where((codes == POOLING_CODES["mean"]).unsqueeze(1), _mean_pool(batch, hidden), cls)
    uses_pooler = codes == POOLING_CODES["pooler"]
    if "pooler.dense.weight" in base.weights and bool(uses_pooler.any()):
        pooled = torch.where(uses_pooler.unsqueeze(1), _pooler(base, view, batch, cls), pooled)
    return pooled


def _pool_as(code: int, base: BaseModel, view: BankView, batch: EncoderBatch, hidden: torch.Tensor) -> torch.Tensor:
    """Every row pooled the same way: the same values as ``pool``, a third of the ops."""
    if code == POOLING_CODES["mean"]:
        return _mean_pool(batch, hidden)
    cls = hidden[:, 0]
    if code == POOLING_CODES["pooler"] and "pooler.dense.weight" in base.weights:
        return _pooler(base, view, batch, cls)
    return cls


def _mean_pool(batch: EncoderBatch, hidden: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's real tokens."""
    if not batch.has_padding:
        return hidden.mean(1)
    mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _pooler(base: BaseModel, view: BankView, batch: EncoderBatch, cls: torch.Tensor) -> torch.Tensor:
    """BERT's pooler, tanh(dense(cls)), with each row's pooler bias."""
    bias = _Sites(base, view, batch)("pooler.dense.bias")  # [D], or [B, 1, D] per row
    return torch.tanh(_linear(cls.unsqueeze(1), base.weights["pooler.dense.weight"], bias).squeeze(1))


def classify(view: BankView, batch: EncoderBatch, pooled: torch.Tensor) -> torch.Tensor:
    """[B, H] -> [B, W] logits, W the widest head class in the batch:
    out[i] = head_w[rows[i]] @ pooled[i] + head_b[rows[i]].

    Columns beyond a row's label count are -inf, so softmax over the padded width is exact. Rows
    whose heads share a width class (the usual case: every task binary or every task alike) take
    one batched matmul; each other class present adds one.
    """
    rows = batch.row_list or tuple(batch.rows.tolist())
    row = batch.single_row
    if row is not None:  # one task: one matmul with its head, no gathers
        if not view.row_width[row]:
            return _headless(pooled)
        n, head = view.row_labels[row], view.heads[view.row_width[row]]
        slot = view.row_slot[row]
        return F.linear(pooled, head.weight[slot, :n], head.bias[slot, :n])
    widths = [view.row_width[r] for r in rows]
    width = max(max(widths), 1)
    if len(set(widths)) == 1:
        logits = _heads_of(view, rows, width, pooled)
    else:
        logits = pooled.new_full((len(rows), width), float("-inf"))
        for w in sorted(set(widths)):
            idx = [i for i, x in enumerate(widths) if x == w]
            at = torch.tensor(idx, device=pooled.device)
            logits[at, :max(w, 1)] = _heads_of(view, [rows[i] for i in idx], w, pooled.index_select(0, at))
    labels = [view.row_labels[r] for r in rows]
    if all(n == width for n in labels):
        return logits  # every task uses the whole width: nothing to mask
    valid = torch.arange(width, device=logits.device).unsqueeze(0) < torch.tensor(
        labels, device=logits.device).unsqueeze(1)
    return logits.masked_fill(~valid, float("-inf"))


def _headless(pooled: torch.Tensor) -> torch.Tensor:
    """Rows with no head (row 0, the base, or a free row): one zero logit each."""
    return pooled.new_zeros(pooled.shape[0], 1)


def _heads_of(view: BankView, rows: Sequence[int], width: int, pooled: torch.Tensor) -> torch.Tensor:
    """[b, H] -> [b, width]: each row through its head in the ``width`` class (one gather, one bmm)."""
    if not width:
        return _headless(pooled)
    head = view.heads[width]
    slots = torch.tensor([view.row_slot[r] for r in rows], device=pooled.device)
    weight = head.weight.index_select(0, slots)  # [b, width, H]
    bias = head.bias.index_select(0, slots)  # [b, width]
    return torch.baddbmm(bias.unsqueeze(-1), weight, pooled.unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def forward(base: BaseModel, view: BankView, batch: EncoderBatch) -> torch.Tensor:
    """Token ids -> [B, W] logits, each row through its own task's values and head."""
    hidden = encode(base, view, batch)
    return classify(view, batch, pool(base, view, batch, hidden))
