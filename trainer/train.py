"""The training loop: AdamW (weight decay 0), grad clip 1.0, constant or warmup+linear schedule,
dynamic padding with length-bucketed batches, dev evaluation every epoch.

Weight decay is 0 on purpose: decay pulls the trained biases towards zero, not towards their
pretrained values, and with decay 0 AdamW leaves gradient-masked entries exactly unchanged.
"""

from __future__ import annotations

import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from bitfit_serve.model.base import fingerprint_of, load_hf_base
from trainer import metrics as metrics_lib
from trainer import schemes
from trainer.data import REGRESSION, Example, TaskData
from trainer.model import Classifier

# The BitFit paper's learning rates for bias schemes (BERT-base); full fine-tuning uses 2e-5.
PAPER_LR = {"rte": 1e-3, "mrpc": 7e-4, "cola": 7e-4, "sst2": 4e-4, "stsb": 1e-4}
FULL_LR = 2e-5
SCHEDULES = ("paper", "linear")


def default_lr(task: str, scheme: str) -> float:
    if scheme == "full":
        return FULL_LR
    return PAPER_LR.get(task, 1e-3)


@dataclass(frozen=True)
class TrainArgs:
    scheme: str = "bitfit"
    pooling: str = "mean"
    lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 128
    schedule: str = "paper"  # "paper": constant lr; "linear": warmup then linear decay to 0
    warmup_ratio: float = 0.1
    seed: int = 0
    max_train_examples: int | None = None
    rand_count: int | None = None  # entries trained by the random schemes (None: see schemes.select)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests)
    grad_clip: float = 1.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class RunResult:
    model: Classifier  # trained, in eval mode
    selection: schemes.Selection
    base_fingerprint: str  # of the base *before* training
    model_path: Path
    config: Any  # the HF config of the base
    tokenizer: Any
    history: list[dict[str, Any]]  # one entry per epoch: train_loss, dev metrics, seconds
    trainable_base_values: int
    head_values: int
    n_train: int
    n_dev: int
    wall_s: float
    stopped_early: bool = False  # max_steps reached before the last epoch ended


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- batching

@dataclass(frozen=True)
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[float]


def encode(tokenizer: Any, examples: Sequence[Example], max_length: int) -> Encoded:
    """Tokenize exactly as ``bitfit_serve.Engine.tokenize`` does (same call, same truncation)."""
    firsts = [e.texts[0] for e in examples]
    seconds = [e.texts[1] for e in examples] if examples and len(examples[0].texts) == 2 else None
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    return Encoded(enc["input_ids"], enc["token_type_ids"], [float(e.label) for e in examples])


def bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                     bucket_batches: int = 50) -> list[list[int]]:
    """Shuffle, sort each window of ``bucket_batches`` batches by length, cut into batches, and
    shuffle the batch order: little padding, yet every epoch sees a different order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(enc: Encoded, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the chosen sequences to the longest of them (dynamic padding)."""
    width = max(len(enc.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(enc.input_ids[i])
        ids[row, :n] = torch.tensor(enc.input_ids[i])
        types[row, :n] = torch.tensor(enc.token_type_ids[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@torch.no_grad()
def pooled_features(model: Classifier, enc: Encoded, pad_id: int, batch_size: int = 64,
                    progress: bool = False, desc: str = "features") -> torch.Tensor:
    """[N, H] pooled representations in input order (eval mode, batches sorted by length)."""
    model.eval()
    order = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))
    out = torch.empty(len(order), model.head.in_features)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, mininterval=10):
        chunk = order[start:start + batch_size]
        out[chunk] = model.pooled(**collate(enc, chunk, pad_id))
    return out


@torch.no_grad()
def predict(model: Classifier, enc: Encoded, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """[N, C] outputs in input order."""
    return model.head(pooled_features(model, enc, pad_id, batch_size)).numpy()


# ----------------------------------------------------------------------------- training

def _schedule(args: TrainArgs, total_steps: int):
    if args.schedule == "paper":
        return lambda step: 1.0
    if args.schedule == "linear":
        warmup = max(1, int(round(args.warmup_ratio * total_steps)))
        return lambda step: (step + 1) / warmup if step < warmup else \
            max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    raise ValueError(f"schedule: {args.schedule!r} is not one of {SCHEDULES}")


def _loss(outputs: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    if problem_type == REGRESSION:
        return torch.nn.functional.mse_loss(outputs.squeeze(-1), labels)
    return torch.nn.functional.cross_entropy(outputs, labels.long())


def train(data: TaskData, args: TrainArgs, model_path: str | Path | None = None,
          progress: bool = True) -> RunResult:
    """Train ``args.scheme`` on ``data.train``, evaluating on ``data.dev`` after every epoch."""
    started = time.perf_counter()
    if args.schedule not in SCHEDULES:
        raise ValueError(f"schedule: {args.schedule!r} is not one of {SCHEDULES}")
    seed_everything(args.seed)
    path, config, base = load_hf_base(model_path)
    fingerprint = fingerprint_of(base)  # of the untouched base: what the served base must match
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    num_outputs = 1 if data.problem_type == REGRESSION else len(data.labels)
    model = Classifier(base, args.pooling, num_outputs)
    params = dict(base.named_parameters())
    selection = schemes.select(args.scheme, params, args.pooling, seed=args.seed, rand_count=args.rand_count)
    hooks = schemes.apply(selection, base)

    train_enc = encode(tokenizer, data.train, args.max_length)
    dev_enc = encode(tokenizer, data.dev, args.max_length)
    lengths = [len(x) for x in train_enc.input_ids]
    rng = random.Random(args.seed)
    steps_per_epoch = math.ceil(len(lengths) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    trainable = [p for p in base.parameters() if p.requires_grad] + list(model.head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args, total_steps))

    # A frozen encoder gives the same pooled vector every epoch: compute it once (eval mode, so
    # without dropout) and train the head on the cached features.
    frozen = args.scheme == "frozen"
    if frozen:
        train_feats = pooled_features(model, train_enc, pad_id, progress=progress, desc=f"{data.name} features")
        dev_feats = pooled_features(model, dev_enc, pad_id)
    train_labels = torch.tensor(train_enc.labels)
    if data.problem_type == REGRESSION:
        # Train on standardized targets (the head starts near 0, so raw 0-5 scores would spend the
        # first thousand Adam steps moving the head bias); the scale is folded back into the head
        # after training, so the saved head predicts raw scores.
        label_mean, label_std = float(train_labels.mean()), float(train_labels.std().clamp(min=1e-6))
        train_labels = (train_labels - label_mean) / label_std

    history: list[dict[str, Any]] = []
    step = 0
    try:
        for epoch in range(1, args.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            losses = []
            batches = bucketed_batches(lengths, args.batch_size, rng)
            bar = tqdm(batches, desc=f"{data.name} {args.scheme} s{args.seed} epoch {epoch}/{args.epochs}",
                       disable=not progress, mininterval=10 if not sys.stderr.isatty() else 0.1)
            for batch in bar:
                if args.max_steps is not None and step >= args.max_steps:
                    break
                labels = train_labels[batch]
                if frozen:
                    outputs = model.head(train_feats[batch])
                else:
                    outputs = model(**collate(train_enc, batch, pad_id))
                loss = _loss(outputs, labels, data.problem_type)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
            model.eval()
            outputs = model.head(dev_feats).detach().numpy() if frozen else predict(model, dev_enc, pad_id)
            if data.problem_type == REGRESSION:
                outputs = outputs * label_std + label_mean
            dev = metrics_lib.from_outputs(outputs, dev_enc.labels, data.problem_type)
            history.append({"epoch": epoch, "steps": step, "train_loss": float(np.mean(losses)) if losses else None,
                            "dev": dev, "seconds": round(time.perf_counter() - epoch_start, 2)})
            if progress:
                shown = ", ".join(f"{k} {v:.2f}" for k, v in dev.items())
                print(f"[{data.name} {args.scheme} seed {args.seed}] epoch {epoch}: dev {shown}", file=sys.stderr)
            if args.max_steps is not None and step >= args.max_steps:
                break
    finally:
        for h in hooks:
            h.remove()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if data.problem_type == REGRESSION:  # y = std * (w.x + b) + mean
        model.head.weight.mul_(label_std)
        model.head.bias.mul_(label_std).add_(label_mean)
    return RunResult(
        model=model, selection=selection, base_fingerprint=fingerprint, model_path=Path(path),
        config=config, tokenizer=tokenizer, history=history,
        trainable_base_values=selection.count(params), head_values=sum(p.numel() for p in model.head.parameters()),
        n_train=len(data.train), n_dev=len(data.dev), wall_s=round(time.perf_counter() - started, 2),
        stopped_early=len(history) < args.epochs,
    )


def summary(result: RunResult, metric: str) -> dict[str, Any]:
    """Final and best epoch by the task's headline metric."""
    final = result.history[-1]
    best = max(result.history, key=lambda h: h["dev"][metric])
    return {"metric": metric, "final": final["dev"], "final_epoch": final["epoch"],
            "best": best["dev"], "best_epoch": best["epoch"]}


def hardware() -> dict[str, Any]:
    return {"device": "cpu", "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}

