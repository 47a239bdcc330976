"""Export: a delta (or a ``full`` fine-tuning run) as a folder that standard loaders read.

    bitfit-serve export deltas/sst2.safetensors --out exported/sst2 [--model default]

A delta only means something on its base, through our engine. Exporting writes the base with
the delta's sites copied in, plus the head, in the form a stock library runs **exactly** as the
server does: the same token ids, the same pooling, the same head, so its scores equal
``Engine.predict``'s at 1e-5 in fp32 (tested, ``tests/interop/test_hf_export.py``).

Which pooling goes out in which form
------------------------------------

``pooler`` (dense + tanh on the first token, then the head) -> **transformers**: a
``save_pretrained`` folder of ``AutoModelForSequenceClassification`` plus the tokenizer, with
``num_labels``, ``id2label``, ``label2id`` and ``problem_type`` in ``config.json``::

    pipeline("text-classification", model=DIR, top_k=None)          # {"text":, "text_pair":} for pairs

The pipeline post-processes by ``problem_type``: softmax (single-label), sigmoid (multi-label),
nothing (regression), which is what the server does.

* BERT: ``BertForSequenceClassification`` is ``bert`` (base + pooler) -> dropout -> ``classifier``.
  The base's weights with the delta's sites (biases, LayerNorm gammas, ``pooler.dense.bias``)
  copied in; ``classifier`` = the head.
* RoBERTa: ``RobertaForSequenceClassification`` builds its base **without** a pooler; its head
  (``RobertaClassificationHead``) is dropout -> ``classifier.dense`` -> tanh -> dropout ->
  ``classifier.out_proj`` on the first token (``<s>``): the BERT pooler under another name. So
  ``classifier.dense`` = the base's ``pooler.dense`` weight with the delta's pooler bias (the
  base's when the delta did not train it), ``classifier.out_proj`` = the head. The dropouts are
  inactive in eval mode (``from_pretrained`` and the pipeline run in eval mode).

``mean`` and ``cls`` (the default on MiniLM, so every shipped delta) -> **sentence-transformers**:
no stock ``*ForSequenceClassification`` pools that way, but a ``SentenceTransformer`` chains
modules that do. The folder, in the layout sentence-transformers has read since 2.x (the
legacy ``sentence_transformers.models.*`` class paths, which 6.x still maps):

* ``modules.json``: ``Transformer`` (the folder's root) -> ``Pooling`` (``1_Pooling``) ->
  ``Dense`` (``2_Dense``);
* root: the HF base (``AutoModel``) with the sites copied in, the tokenizer, and
  ``sentence_bert_config.json`` with ``max_seq_length`` = the delta's ``max_length``;
* ``1_Pooling/config.json``: ``pooling_mode_mean_tokens`` (mean over the attention mask) or
  ``pooling_mode_cls_token`` (the first token);
* ``2_Dense``: ``in_features`` H, ``out_features`` C, bias, ``activation_function``
  ``torch.nn.modules.linear.Identity``: the head, so ``SentenceTransformer(DIR).encode(texts)``
  returns the **logits** (pair tasks: ``encode([(first, second), ...])``, tested on 6.x, which
  tokenizes a tuple as a pair with its token type ids). Apply softmax / sigmoid / nothing as
  ``problem_type`` says; ``README.md`` in the folder shows how.

Both forms carry ``bitfit_export.json``: the form, pooling, ``problem_type``, labels
(``id2label``), input field names, ``max_length``, the post-processing to apply, and the
provenance (task, scheme, base model and fingerprint, the delta's version). Both forms set the
tokenizer's ``model_max_length`` to the delta's ``max_length``: the server truncates there, so
pass ``truncation=True`` to a transformers pipeline for inputs that long (sentence-transformers
truncates at ``max_seq_length`` by itself).

The ``full`` scheme (``trainer/export.py::write_checkpoint``) goes through :func:`write_model`
too, with its fine-tuned base: the same two forms, chosen by its pooling, plus the run's
``run.json``; its outputs reproduce the trainer's logits, hence its dev metric.

A base saved without a pooler (common for sentence encoders and RoBERTa) exports ``mean`` /
``cls`` tasks fine; transformers then warns, on loading, that it initialized a pooler the
folder does not use.

What is refused, and why (one-line errors from the CLI, exit code 1)
--------------------------------------------------------------------

* an unreadable or invalid delta file (the reasons ``delta.parse`` gives);
* a delta whose base fingerprint or architecture differs from the base it would be written
  into: its values are only meaningful on the exact weights it was trained on. The base is
  ``--model`` if given, else the delta's ``base_model`` when that is a local model folder, else
  the bundled MiniLM;
* a delta that does not fit that base (unknown sites, wrong shapes, ``pooler`` pooling on a base
  without a pooler): the checks of ``delta.check_compatible``, as the server makes them;
* an output folder that exists and is not empty (nothing is overwritten; the folder is written
  under a temporary name and renamed into place, so a failed export leaves nothing behind);
* a pooling that no standard form reproduces exactly (today every pooling has one; a future
  pooling or architecture without one is refused with a message naming it, rather than
  exported approximately).

The export library needs only ``transformers``; sentence-transformers is needed to *load* the
``mean`` / ``cls`` folders, not to write them.

(About 430 lines: two output forms, each with its architecture variants and the checks that make
its scores equal the server's; this docstring is a third of it.)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bitfit_serve import delta as delta_io
from bitfit_serve.delta import Delta
from bitfit_serve.errors import BaseModelMismatch
from bitfit_serve.model.architectures import architecture_for
from bitfit_serve.model.base import default_model_path, fingerprint, load_hf_base, resolve_model_path

EXPORT_FORMAT = "bitfit-export/1"
EXPORT_INFO = "bitfit_export.json"
TRANSFORMERS = "transformers"
SENTENCE_TRANSFORMERS = "sentence-transformers"
POOLING_FORMS = {"pooler": TRANSFORMERS, "mean": SENTENCE_TRANSFORMERS, "cls": SENTENCE_TRANSFORMERS}
POSTPROCESS = {"single_label_classification": "softmax", "multi_label_classification": "sigmoid",
               "regression": "none"}
# The layout sentence-transformers has read since 2.x (6.x still maps these legacy class paths).
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_DENSE = "sentence_transformers.models.Dense"
ST_IDENTITY = "torch.nn.modules.linear.Identity"


class ExportError(ValueError):
    """The delta or run cannot be written in a standard form that reproduces it exactly."""


@dataclass(frozen=True)
class Exported:
    """What :func:`write_model` wrote: the folder, its form, and how to load it."""

    path: Path
    form: str  # TRANSFORMERS or SENTENCE_TRANSFORMERS
    pooling: str
    problem_type: str
    labels: tuple[str, ...]
    pair: bool = False  # a sentence-pair task

    @property
    def usage(self) -> str:
        return _load_snippet(self.form, self.path, self.problem_type, self.pair)


# ----------------------------------------------------------------------------- delta -> folder

def resolve_base_path(delta: Delta, model: str | os.PathLike | None = None) -> Path:
    """The base a delta is exported onto: ``model`` if given ('default' = the bundled MiniLM, a
    local folder, or a hub id found by ``resolve_model_path``), else the delta's ``base_model``
    when that is a local model folder, else the bundled MiniLM."""
    if model is not None:
        return resolve_model_path(model)
    if delta.base_model and delta.base_model != "default":
        candidate = Path(delta.base_model).expanduser()
        if (candidate / "config.json").is_file():
            return candidate
    return default_model_path()


def export_delta(source: Delta | str | os.PathLike, out: str | os.PathLike,
                 model: str | os.PathLike | None = None) -> Exported:
    """Write ``source`` (a delta, or its file) onto its base as a standard folder at ``out``.

    Raises ``InvalidDelta`` (unreadable / invalid file), ``BaseModelMismatch`` (another base),
    ``ExportError`` (no exact standard form, or ``out`` not empty), ``ValueError`` (``model``
    cannot be found or loaded: ``ModelNotFound``, an unsupported architecture)."""
    file = None if isinstance(source, Delta) else delta_io.read(source)
    delta = source if isinstance(source, Delta) else file.delta
    _check_out(Path(out))
    _form_for(delta.pooling, delta.architecture)  # refuse before loading the base
    path, config, base = load_hf_base(resolve_base_path(delta, model))
    architecture = architecture_for(config.model_type)
    params = dict(base.named_parameters())
    try:
        delta_io.check_compatible(
            delta, fingerprint=fingerprint(params), architecture=config.model_type,
            site_shapes={n: tuple(p.shape) for n, p in params.items() if architecture.is_site(n)},
            hidden_size=config.hidden_size)
    except BaseModelMismatch as e:
        raise type(e)(f"{e.message} (base read from {path}; pass --model with the base the delta "
                      f"was trained on)") from None
    with torch.no_grad():
        for name, value in delta.sites.items():
            params[name].copy_(value)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    provenance = {
        "source": "bitfit-delta", "task": delta.task, "scheme": delta.scheme,
        "delta_version": file.version if file else delta_io.DeltaFile.of(delta).version,
        "base_model": delta.base_model or str(path), "base_path": str(path),
        "base_fingerprint": delta.base_fingerprint, "architecture": delta.architecture,
        "metrics": dict(delta.metrics), "created_at": delta.created_at,
        "trainer_version": delta.trainer_version,
    }
    return write_model(base, tokenizer, delta.head_weight, delta.head_bias, out, pooling=delta.pooling,
                       labels=delta.labels, problem_type=delta.problem_type, inputs=delta.inputs,
                       max_length=delta.max_length, task=delta.task, provenance=provenance)


# ----------------------------------------------------------------------------- base + head -> folder

def write_model(base: torch.nn.Module, tokenizer: Any, head_weight: torch.Tensor, head_bias: torch.Tensor,
                out: str | os.PathLike, *, pooling: str, labels: Sequence[str], problem_type: str,
                inputs: Sequence[str] = ("text",), max_length: int = 128, task: str = "",
                provenance: Mapping[str, Any] | None = None, replace: bool = False) -> Exported:
    """Write ``base`` (an HF ``AutoModel``, sites already in place or fully fine-tuned) + the
    Linear head ``[C, H]`` / ``[C]`` + ``pooling`` as a standard folder (see the module doc).

    The folder is written under a temporary name beside ``out`` and renamed into place. ``out``
    must be absent or empty unless ``replace``; then a previous export there (a folder with a
    ``config.json`` or ``modules.json``) is replaced, and anything else is refused."""
    out = Path(out)
    form = _form_for(pooling, base.config.model_type)
    labels = tuple(labels)
    if problem_type not in POSTPROCESS:
        raise ExportError(f"problem_type: {problem_type!r} is not one of {tuple(POSTPROCESS)}")
    if tuple(head_weight.shape) != (len(labels), base.config.hidden_size) or tuple(head_bias.shape) != (len(labels),):
        raise ExportError(f"head: expected [{len(labels)}, {base.config.hidden_size}] and [{len(labels)}], got "
                          f"{list(head_weight.shape)} and {list(head_bias.shape)}")
    _check_out(out, replace)
    head_weight = head_weight.detach().float().cpu().contiguous()
    head_bias = head_bias.detach().float().cpu().contiguous()
    exported = Exported(out, form, pooling, problem_type, labels, pair=len(inputs) == 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        tokenizer = _truncating_at(tokenizer, max_length)
        if form == TRANSFORMERS:
            _write_transformers(base, tokenizer, head_weight, head_bias, tmp, labels, problem_type)
        else:
            _write_sentence_transformers(base, tokenizer, head_weight, head_bias, tmp, pooling, max_length)
        info = {
            "format": EXPORT_FORMAT, "form": form, "task": task, "pooling": pooling,
            "problem_type": problem_type, "postprocess": POSTPROCESS[problem_type],
            "labels": list(labels), "id2label": {str(i): label for i, label in enumerate(labels)},
            "inputs": list(inputs), "max_length": max_length,
            "architecture": base.config.model_type, **({"provenance": dict(provenance)} if provenance else {}),
        }
        _write_json(tmp / EXPORT_INFO, info)
        (tmp / "README.md").write_text(_readme(exported, task, inputs, max_length, provenance or {}))
        _readable(tmp)
        _move_into_place(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return exported


def _form_for(pooling: str, model_type: str) -> str:
    form = POOLING_FORMS.get(pooling)
    if form is None:
        raise ExportError(f"pooling {pooling!r}: no standard model form reproduces it exactly; not exported")
    if form == TRANSFORMERS and model_type not in ("bert", "roberta"):
        raise ExportError(f"pooling 'pooler' on a {model_type!r} model: no standard *ForSequenceClassification "
                          f"layout known to reproduce it exactly; not exported")
    return form


def _check_out(out: Path, replace: bool = False) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not replace:
            raise ExportError(f"--out {out}: folder exists and is not empty; choose another or remove it")
        if not ((out / "config.json").is_file() or (out / "modules.json").is_file()):
            raise ExportError(f"{out}: exists and does not hold a previous model export; not replacing it")


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists() and replace:
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _readable(folder: Path) -> None:
    """mkdtemp makes 0700, and some writers 0600 files: a model folder is no secret, tools read it."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _truncating_at(tokenizer: Any, max_length: int) -> Any:
    """A copy of the tokenizer with ``model_max_length`` = the task's truncation length."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    tokenizer.init_kwargs["model_max_length"] = max_length
    return tokenizer


@torch.no_grad()
def _write_transformers(base: torch.nn.Module, tokenizer: Any, head_weight: torch.Tensor,
                        head_bias: torch.Tensor, folder: Path, labels: tuple[str, ...], problem_type: str) -> None:
    """``pooler``: an ``AutoModelForSequenceClassification`` folder (BERT or RoBERTa layout)."""
    if getattr(base, "pooler", None) is None:
        raise ExportError("pooling 'pooler' requested but the base model has no pooler")
    config = copy.deepcopy(base.config)
    config.num_labels = len(labels)
    config.id2label = {i: label for i, label in enumerate(labels)}
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = problem_type
    model = AutoModelForSequenceClassification.from_config(config).float().eval()
    state = {k: v.detach().float().cpu() for k, v in base.state_dict().items()}
    if config.model_type == "bert":
        model.bert.load_state_dict(state, strict=True)
        model.classifier.weight.copy_(head_weight)
        model.classifier.bias.copy_(head_bias)
    else:  # roberta: the pooler becomes classifier.dense (RobertaClassificationHead)
        model.roberta.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")}, strict=True)
        model.classifier.dense.weight.copy_(state["pooler.dense.weight"])
        model.classifier.dense.bias.copy_(state["pooler.dense.bias"])
        model.classifier.out_proj.weight.copy_(head_weight)
        model.classifier.out_proj.bias.copy_(head_bias)
    config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_sentence_transformers(base: torch.nn.Module, tokenizer: Any, head_weight: torch.Tensor,
                                 head_bias: torch.Tensor, folder: Path, pooling: str, max_length: int) -> None:
    """``mean`` / ``cls``: Transformer (root) -> Pooling -> Dense (identity) = the head's logits."""
    hidden = base.config.hidden_size
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": ST_DENSE},
    ])
    _write_json(folder / "config_sentence_transformers.json", {
        "__version__": _versions(), "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None})
    (folder / "1_Pooling").mkdir()
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    (folder / "2_Dense").mkdir()
    _write_json(folder / "2_Dense" / "config.json", {
        "in_features": hidden, "out_features": int(head_weight.shape[0]), "bias": True,
        "activation_function": ST_IDENTITY})
    save_file({"linear.weight": head_weight, "linear.bias": head_bias}, folder / "2_Dense" / "model.safetensors")


def _versions() -> dict[str, str]:
    import transformers

    versions = {"transformers": transformers.__version__, "pytorch": torch.__version__}
    try:
        from importlib.metadata import version

        versions["sentence_transformers"] = version("sentence-transformers")
    except Exception:  # not installed: the folder is still the 2.x+ layout
        pass
    return versions


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- README

def _load_snippet(form: str, path: Path | str, problem_type: str, pair: bool = False) -> str:
    if form == TRANSFORMERS:
        example = '{"text": "A man sleeps.", "text_pair": "A man is awake."}' if pair else '"a gripping film"'
        return (f'from transformers import pipeline\n'
                f'clf = pipeline("text-classification", model="{path}", top_k=None)\n'
                f'clf([{example}], truncation=True)')
    example = '("A man sleeps.", "A man is awake.")' if pair else '"a gripping film"'
    post = {"softmax": "logits.softmax(-1)", "sigmoid": "logits.sigmoid()", "none": "logits[:, 0]"}
    return (f'from sentence_transformers import SentenceTransformer\n'
            f'model = SentenceTransformer("{path}")\n'
            f'logits = model.encode([{example}], convert_to_tensor=True)\n'
            f'{"scores" if problem_type != "regression" else "value"} = {post[POSTPROCESS[problem_type]]}')


def _readme(exported: Exported, task: str, inputs: Sequence[str], max_length: int,
            provenance: Mapping[str, Any]) -> str:
    post = POSTPROCESS[exported.problem_type]
    what = {"softmax": "softmax over the logits: one probability per label, summing to 1",
            "sigmoid": "a sigmoid on each logit: one independent probability per label",
            "none": "no function: the single output is the predicted value"}[post]
    labels = "\n".join(f"| {i} | {label} |" for i, label in enumerate(exported.labels))
    if exported.form == TRANSFORMERS:
        how = (f"A `transformers` `AutoModelForSequenceClassification` folder (pooling `pooler`): "
               f"`config.json` holds `id2label` and `problem_type: {exported.problem_type}`, so the "
               f"`text-classification` pipeline applies the right function by itself ({what}).")
    else:
        pooling = "the mean of the token embeddings over the attention mask" if exported.pooling == "mean" \
            else "the first token's embedding ([CLS] / <s>)"
        how = (f"A `sentence-transformers` folder (pooling `{exported.pooling}`: {pooling}). Its last module "
               f"is a `Dense` layer with an identity activation that holds the classifier head, so "
               f"`encode` returns the **logits**, one column per label below. Apply {what}.")
    pair = (f"\n\nThis is a sentence-pair task (`{inputs[0]}`, `{inputs[1]}`): pass each input as a pair."
            if len(inputs) == 2 else "")
    truncation = ("the tokenizer's `model_max_length`; pass `truncation=True` to the pipeline"
                  if exported.form == TRANSFORMERS else "`max_seq_length` in `sentence_bert_config.json`")
    source = ""
    if provenance:
        keys = ("task", "scheme", "base_model", "base_fingerprint", "delta_version", "created_at")
        source = "\n## Provenance\n\n" + "\n".join(f"- {k}: `{provenance[k]}`" for k in keys if provenance.get(k))
    if provenance.get("source") == "bitfit-train full":
        intro = ("Written by `bitfit-train --scheme full`: the fully fine-tuned encoder plus its classifier\n"
                 "head. It reproduces the trainer's outputs (fp32, 1e-5).")
    else:
        intro = ("Exported by `bitfit-serve export` (BitFit: the base encoder with the task's trained biases\n"
                 "and LayerNorm values copied in, plus its classifier head). It reproduces the server's\n"
                 "scores (fp32, 1e-5).")
    return f"""# {task or "bitfit-serve export"}

{intro}

{how}{pair}

## Load it

```python
{exported.usage}
```

Inputs are truncated at {max_length} tokens, as the server does ({truncation}).

## Labels (`problem_type: {exported.problem_type}`)

| id | label |
|---|---|
{labels}

`{EXPORT_INFO}` holds the same in machine-readable form (`id2label`, `postprocess: {post}`).
{source}
"""
