"""The training loop: AdamW (weight decay 0), grad clip 1.0, warmup + linear decay (or constant),
a step-based budget, dynamic padding with length-bucketed batches, fp32 or bf16 autocast on CPU or
GPU, and the epoch chosen on a validation split carved from train (dev is only reported).

Weight decay is 0 on purpose: decay pulls the trained biases towards zero, not towards their
pretrained values, and with decay 0 AdamW leaves gradient-masked entries exactly unchanged.
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from bitfit_serve.inputs import EncodedInput, tokenize
from bitfit_serve.inputs import collate as pad_batch
from bitfit_serve.model.base import fingerprint, load_hf_base
from trainer import metrics as metrics_lib
from trainer import schemes
from trainer.data import REGRESSION, Example, TaskData, split_validation
from trainer.model import Classifier

# The BitFit paper's learning rates for bias schemes (BERT-base, ~20 epochs); kept for the tables.
PAPER_LR = {"rte": 1e-3, "mrpc": 7e-4, "cola": 7e-4, "sst2": 4e-4, "stsb": 1e-4}
# Defaults on the default model (MiniLM), from the sweep in benchmarks/results/lr_sweep.md.
BIAS_LR = 1e-3
FULL_LR = 5e-5
FROZEN_LR = 1e-3
# ``--lr auto`` tries these (on the validation split carved from train) and keeps the best.
LR_CANDIDATES = {"bias": (3e-4, 1e-3, 3e-3, 1e-2), "full": (2e-5, 5e-5, 1e-4, 2e-4),
                 "frozen": (3e-4, 1e-3, 3e-3, 1e-2)}
SCHEDULES = ("paper", "linear")
DTYPES = ("float32", "bfloat16")
# A delta that puts this share of the validation set in one class has not learned (loud warning).
ONE_CLASS_SHARE = 0.95
# ... nor has one that scores within this many points of always predicting the majority class.
PRIOR_MARGIN = 1.0


def lr_kind(scheme: str) -> str:
    return scheme if scheme in ("full", "frozen") else "bias"


def default_lr(task: str, scheme: str) -> float:
    """The rate a run gets without ``--lr`` (the same for every task: see LR_CANDIDATES)."""
    return {"full": FULL_LR, "frozen": FROZEN_LR}.get(scheme, BIAS_LR)


@dataclass(frozen=True)
class TrainArgs:
    scheme: str = "bitfit"
    pooling: str = "mean"
    lr: float = BIAS_LR
    # Budget: ``epochs`` if given, else enough epochs for ``steps`` optimizer steps, at most
    # ``max_epochs`` (the paper's cap) but never fewer than ``min_steps`` steps (see plan_epochs).
    epochs: int | None = None
    steps: int = 6000
    max_epochs: int = 20
    min_steps: int = 1000
    batch_size: int = 16
    max_length: int = 128
    schedule: str = "linear"  # "paper": constant lr; "linear": warmup then linear decay to 0
    warmup_ratio: float = 0.06
    seed: int = 0
    # Validation split carved from train: picks the epoch (and --lr auto's rate); dev is reported only.
    val_fraction: float = 0.1
    max_val_examples: int | None = 2000
    # Early stopping: after this many epochs without a better val score, once half the budget is
    # spent and the best epoch has left the class prior (see collapse_warnings).
    patience: int | None = 3
    max_train_examples: int | None = None
    rand_count: int | None = None  # entries trained by the random schemes (None: see schemes.select)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests)
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    dtype: str = "float32"  # "bfloat16": autocast for training (evaluation stays fp32, as served)


def plan_epochs(n_train: int, args: TrainArgs) -> int:
    """Epochs for a run: bias-only training sits at the class prior for ~1,000 steps on MiniLM,
    so the budget is counted in optimizer steps (``args.steps``), capped at ``args.max_epochs``
    epochs, and raised again on tiny data sets so that a run always gets ``args.min_steps``."""
    if args.epochs is not None:
        return args.epochs
    per_epoch = max(1, math.ceil(n_train / args.batch_size))
    epochs = min(args.max_epochs, math.ceil(args.steps / per_epoch))
    return max(1, epochs, math.ceil(args.min_steps / per_epoch))


@dataclass(frozen=True)
class RunResult:
    model: Classifier  # trained, in eval mode, at the selected epoch
    selection: schemes.Selection
    base_fingerprint: str  # of the base *before* training
    model_path: Path
    config: Any  # the HF config of the base
    tokenizer: Any
    history: list[dict[str, Any]]  # one entry per epoch: train_loss, val and dev metrics, seconds
    selected_epoch: int  # the epoch with the best val score: the weights the model holds
    trainable_base_values: int
    head_values: int
    n_train: int
    n_val: int
    n_dev: int
    wall_s: float
    args: TrainArgs
    warnings: tuple[str, ...] = ()  # the delta has not learned (one class, or at the class prior)
    stopped_early: bool = False  # early stopping or max_steps ended the run before its last epoch
    sweep: tuple[dict[str, Any], ...] = ()  # --lr auto: every candidate rate's val score


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- batching

@dataclass(frozen=True)
class Encoded:
    """A split, tokenized (as the engine does: ``bitfit_serve.inputs``), with its labels."""

    sequences: list[EncodedInput]
    labels: list[float]

    def __len__(self) -> int:
        return len(self.sequences)


def encode(tokenizer: Any, examples: Sequence[Example], max_length: int) -> Encoded:
    firsts = [e.texts[0] for e in examples]
    seconds = [e.texts[1] for e in examples] if examples and len(examples[0].texts) == 2 else None
    return Encoded(tokenize(tokenizer, firsts, seconds, max_length), [float(e.label) for e in examples])


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
    """The chosen sequences right-padded to the longest of them, as HF model keyword arguments."""
    return pad_batch([enc.sequences[i] for i in indices], pad_id).as_hf()


@torch.no_grad()
def pooled_features(model: Classifier, enc: Encoded, pad_id: int, batch_size: int = 64,
                    progress: bool = False, desc: str = "features") -> torch.Tensor:
    """[N, H] pooled representations in input order, on the CPU (eval mode, fp32, batches
    sorted by length)."""
    model.eval()
    device = model.head.weight.device
    order = sorted(range(len(enc)), key=lambda i: len(enc.sequences[i]))
    out = torch.empty(len(order), model.head.in_features)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, mininterval=10):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(enc, chunk, pad_id).items()}
        out[chunk] = model.pooled(**batch).float().cpu()
    return out


@torch.no_grad()
def predict(model: Classifier, enc: Encoded, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """[N, C] outputs in input order."""
    head = model.head
    return torch.nn.functional.linear(pooled_features(model, enc, pad_id, batch_size),
                                      head.weight.float().cpu(), head.bias.float().cpu()).numpy()


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
    outputs = outputs.float()
    if problem_type == REGRESSION:
        return torch.nn.functional.mse_loss(outputs.squeeze(-1), labels)
    return torch.nn.functional.cross_entropy(outputs, labels.long())


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; a named device that is missing is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU here (use --device cpu)")
    return resolved


def autocast(device: torch.device, dtype: str):
    """The training forward's precision: fp32, or bf16 autocast where the hardware has bf16
    (CPUs with AVX512-BF16/AMX, GPUs from Ampere on). fp16 would need loss scaling: not offered."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {DTYPES} (float16 training needs loss scaling; "
                         f"use bfloat16)")
    if dtype == "float32":
        return contextlib.nullcontext()
    if device.type == "cpu" and not bf16_supported(device):
        raise ValueError("dtype bfloat16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), where bf16 "
                         "autocast runs ~20x slower than fp32; use float32")
    if device.type == "cuda" and not bf16_supported(device):
        raise ValueError("dtype bfloat16: this GPU does not support bf16; use float32")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: oneDNN bf16 kernels on the CPU, native bf16 on the GPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def collapse_warnings(outputs: np.ndarray, labels: Sequence[float], train_labels: Sequence[float],
                      data: TaskData) -> tuple[str, ...]:
    """Say loudly when a model has not learned: it puts >= 95% of the validation set in one class,
    or scores within 1 point of always predicting the training set's majority class (regression:
    of a constant prediction, which correlates 0)."""
    found = []
    score = metrics_lib.from_outputs(outputs, labels, data.problem_type)[data.metric]
    if data.problem_type == REGRESSION:
        baseline = 0.0
    else:
        predicted = outputs.argmax(axis=1)
        top = int(np.bincount(predicted, minlength=len(data.labels)).argmax())
        share = float((predicted == top).mean())
        if share >= ONE_CLASS_SHARE:
            found.append(f"predicts {data.labels[top]!r} for {100 * share:.0f}% of the validation set")
        majority = int(np.bincount(np.asarray(train_labels, dtype=int), minlength=len(data.labels)).argmax())
        constant = np.zeros_like(outputs)
        constant[:, majority] = 1.0
        baseline = metrics_lib.from_outputs(constant, labels, data.problem_type)[data.metric]
    if score <= baseline + PRIOR_MARGIN:
        found.append(f"validation {data.metric} {score:.1f} is within {PRIOR_MARGIN:g} point of the "
                     f"{'constant prediction' if data.problem_type == REGRESSION else 'majority class'} "
                     f"({baseline:.1f})")
    return tuple(found)


def train(data: TaskData, args: TrainArgs, model_path: str | Path | None = None,
          progress: bool = True) -> RunResult:
    """Train ``args.scheme`` on ``data.train`` minus a validation split carved from it.

    After every epoch the model is scored on the validation split (and on ``data.dev``, for the
    learning curves only); the returned model holds the epoch with the best validation score."""
    started = time.perf_counter()
    if args.schedule not in SCHEDULES:
        raise ValueError(f"schedule: {args.schedule!r} is not one of {SCHEDULES}")
    device = resolve_device(args.device)
    precision = autocast(device, args.dtype)
    seed_everything(args.seed)
    data, val = split_validation(data, args.val_fraction, args.seed, args.max_val_examples)
    path, config, base = load_hf_base(model_path)
    base_fingerprint = fingerprint(dict(base.named_parameters()))  # of the untouched base: what the served base must match
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    num_outputs = 1 if data.problem_type == REGRESSION else len(data.labels)
    model = Classifier(base, args.pooling, num_outputs)
    params = dict(base.named_parameters())
    selection = schemes.select(args.scheme, params, args.pooling, seed=args.seed, rand_count=args.rand_count)
    model.to(device)
    hooks = schemes.apply(selection, base)

    train_enc = encode(tokenizer, data.train, args.max_length)
    val_enc = encode(tokenizer, val, args.max_length)
    dev_enc = encode(tokenizer, data.dev, args.max_length) if data.dev else None
    lengths = [len(x) for x in train_enc.sequences]
    rng = random.Random(args.seed)
    steps_per_epoch = math.ceil(len(lengths) / args.batch_size)
    epochs = plan_epochs(len(lengths), args)
    total_steps = steps_per_epoch * epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    trainable = [p for p in base.parameters() if p.requires_grad] + list(model.head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args, total_steps))

    # A frozen encoder gives the same pooled vector every epoch: compute it once (eval mode, so
    # without dropout) and train the head on the cached features.
    frozen = args.scheme == "frozen"
    if frozen:
        train_feats = pooled_features(model, train_enc, pad_id, progress=progress,
                                      desc=f"{data.name} features").to(device)
        eval_feats = {"val": pooled_features(model, val_enc, pad_id),
                      "dev": pooled_features(model, dev_enc, pad_id) if dev_enc else None}
    train_labels = torch.tensor(train_enc.labels)
    label_mean, label_std = 0.0, 1.0
    if data.problem_type == REGRESSION:
        # Train on standardized targets (the head starts near 0, so raw 0-5 scores would spend the
        # first thousand Adam steps moving the head bias); the scale is folded back into the head
        # after training, so the saved head predicts raw scores.
        label_mean, label_std = float(train_labels.mean()), float(train_labels.std().clamp(min=1e-6))
        train_labels = (train_labels - label_mean) / label_std
    train_labels = train_labels.to(device)

    @torch.no_grad()
    def outputs_of(split: str, enc: Encoded) -> np.ndarray:
        """fp32 outputs in raw units (what the engine serves), for val or dev."""
        if frozen:
            head = model.head
            out = torch.nn.functional.linear(eval_feats[split], head.weight.float().cpu(),
                                             head.bias.float().cpu()).numpy()
        else:
            out = predict(model, enc, pad_id)
        return out * label_std + label_mean if data.problem_type == REGRESSION else out

    history: list[dict[str, Any]] = []
    best: tuple[float, int, list[torch.Tensor], np.ndarray] | None = None  # score, epoch, weights, val outputs
    step, stopped_early = 0, False
    try:
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            losses = []
            batches = bucketed_batches(lengths, args.batch_size, rng)
            bar = tqdm(batches, desc=f"{data.name} {args.scheme} lr {args.lr:g} s{args.seed} epoch {epoch}/{epochs}",
                       disable=not progress, mininterval=10 if not sys.stderr.isatty() else 0.1)
            for batch in bar:
                if args.max_steps is not None and step >= args.max_steps:
                    break
                labels = train_labels[batch]
                with precision:
                    if frozen:
                        outputs = model.head(train_feats[batch])
                    else:
                        outputs = model(**{k: v.to(device) for k, v in collate(train_enc, batch, pad_id).items()})
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
            val_outputs = outputs_of("val", val_enc)
            val_metrics = metrics_lib.from_outputs(val_outputs, val_enc.labels, data.problem_type)
            dev = metrics_lib.from_outputs(outputs_of("dev", dev_enc), dev_enc.labels, data.problem_type) \
                if dev_enc else None
            score = val_metrics[data.metric]
            if best is None or score > best[0]:
                best = (score, epoch, [p.detach().clone() for p in trainable], val_outputs)
            history.append({"epoch": epoch, "steps": step, "train_loss": float(np.mean(losses)) if losses else None,
                            "lr": args.lr, "val": val_metrics, "dev": dev,
                            "seconds": round(time.perf_counter() - epoch_start, 2)})
            if progress:
                shown = f"val {data.metric} {score:.2f}" + (f", dev {dev[data.metric]:.2f}" if dev else "")
                print(f"[{data.name} {args.scheme} lr {args.lr:g} seed {args.seed}] epoch {epoch}/{epochs}: {shown}",
                      file=sys.stderr)
            if args.max_steps is not None and step >= args.max_steps:
                stopped_early = epoch < epochs
                break
            if (args.patience and epoch - best[1] >= args.patience and step >= total_steps / 2
                    and epoch < epochs and not collapse_warnings(best[3], val_enc.labels, train_enc.labels, data)):
                stopped_early = True  # only once the best epoch has left the class prior: a run
                break  # still sitting there (often for 1,000+ steps) must get its whole budget
    finally:
        for h in hooks:
            h.remove()
    assert best is not None
    with torch.no_grad():  # back to the epoch with the best validation score
        for p, kept in zip(trainable, best[2]):
            p.copy_(kept)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if data.problem_type == REGRESSION:  # y = std * (w.x + b) + mean
        model.head.weight.mul_(label_std)
        model.head.bias.mul_(label_std).add_(label_mean)
    model.cpu()
    warnings = collapse_warnings(best[3], val_enc.labels, [e.label for e in data.train], data)
    for warning in warnings if progress else ():
        print(f"WARNING [{data.name} {args.scheme} lr {args.lr:g}]: the model has not learned: {warning}. "
              f"Try --lr auto, more --steps, or another --scheme.", file=sys.stderr)
    return RunResult(
        model=model, selection=selection, base_fingerprint=base_fingerprint, model_path=Path(path),
        config=config, tokenizer=tokenizer, history=history, selected_epoch=best[1],
        trainable_base_values=selection.count(params), head_values=sum(p.numel() for p in model.head.parameters()),
        n_train=len(data.train), n_val=len(val), n_dev=len(data.dev), wall_s=round(time.perf_counter() - started, 2),
        args=args, warnings=warnings, stopped_early=stopped_early,
    )


def sweep(data: TaskData, args: TrainArgs, candidates: Sequence[float] | None = None,
          model_path: str | Path | None = None, progress: bool = True) -> RunResult:
    """``--lr auto``: train at every candidate rate (same seed, so the same validation split) and
    return the run with the best validation score, its ``sweep`` listing every candidate."""
    candidates = tuple(candidates or LR_CANDIDATES[lr_kind(args.scheme)])
    rows: list[dict[str, Any]] = []
    winner: RunResult | None = None
    for lr in candidates:
        result = train(data, replace(args, lr=lr), model_path, progress)
        chosen = result.history[result.selected_epoch - 1]
        rows.append({"lr": lr, "val": chosen["val"][data.metric], "selected_epoch": result.selected_epoch,
                     "epochs_run": len(result.history), "dev": (chosen["dev"] or {}).get(data.metric),
                     "warnings": list(result.warnings), "wall_s": result.wall_s})
        if winner is None or rows[-1]["val"] > max(r["val"] for r in rows[:-1]):
            winner = result
        if progress:
            print(f"[{data.name} {args.scheme} sweep] lr {lr:g}: val {data.metric} {rows[-1]['val']:.2f} "
                  f"(epoch {result.selected_epoch})", file=sys.stderr)
    assert winner is not None
    return replace(winner, sweep=tuple(rows),
                   wall_s=round(sum(r["wall_s"] for r in rows), 2))


def summary(result: RunResult, metric: str) -> dict[str, Any]:
    """The selected epoch (best on the validation split): its val and dev metrics ("final", what
    the delta carries), and the last epoch's dev metrics for the learning curve."""
    chosen = result.history[result.selected_epoch - 1]
    last = result.history[-1]
    return {"metric": metric, "selected_epoch": result.selected_epoch, "val": chosen["val"],
            "final": chosen["dev"], "final_epoch": chosen["epoch"], "last": last["dev"], "last_epoch": last["epoch"]}


def hardware(device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    return {"device": device, "dtype": dtype, "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
