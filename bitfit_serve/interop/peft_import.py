"""Import a Hugging Face PEFT adapter as a ``bitfit-delta/1`` file (``bitfit-serve import-peft``).

    bitfit-serve import-peft ./sst2-beft --task sst2 --model ./bert-base --out deltas/sst2.safetensors

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Its tensor
names are ``base_model.model.`` + the wrapped model's parameter path, with the adapter name
removed: ``base_model.model.bert.encoder.layer.0.attention.self.value.beft_bias``,
``base_model.model.roberta.embeddings.LayerNorm.ln_tuning_layers.weight``,
``base_model.model.classifier.weight``. Only the safetensors file is read; ``adapter_model.bin``
(a pickle) is never loaded. peft itself is not needed to import, only to train.

Two PEFT methods change nothing but sites (biases and LayerNorm weights, see
``bitfit_serve/model/architectures.py``), so one mixed forward can serve them per row:

**BEFT** (``peft_type: BEFT``, scheme ``peft-beft``). peft wraps each target ``nn.Linear`` and
stores ``<module>.beft_bias`` of shape ``[1, out]``; its forward is ``linear(x) + beft_bias``,
i.e. the bias is *added* to the module's own bias (peft's ``merge`` does ``bias += beft_bias``).
The delta stores values, so the site ``<module>.bias`` gets ``base bias + beft_bias``, taken from
the served base in fp32. BERT/RoBERTa targets map one to one: ``query``/``key``/``value`` ->
``encoder.layer.N.attention.self.{query,key,value}.bias``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense`` and ``pooler.dense`` -> their ``.bias``. A target whose
``<module>.bias`` is not a site, or a module without a bias in the base (peft allows BEFT there;
the delta has no row to put it in), is refused, naming the tensor.

**LN_TUNING** (``peft_type: LN_TUNING``, scheme ``peft-ln_tuning``). peft trains a *copy* of each
target module and stores the copy's parameters as ``<module>.ln_tuning_layers.<param>``: these
are the values themselves, so ``...LayerNorm.ln_tuning_layers.weight`` becomes the site
``...LayerNorm.weight`` (likewise ``.bias``). LN tuning may target any module; a copied
parameter that is not a site (e.g. the ``weight`` of a targeted ``query``) is accepted only if
it still equals the base value exactly (it is then dropped; its bias is a site), else refused.

The same rule covers a base module listed in ``modules_to_save`` (stored as full values): sites
are taken, unchanged non-sites dropped, trained non-sites refused.

**Head** (``modules_to_save=["classifier"]``, or ``task_type="SEQ_CLS"``, which saves it):

* ``BertForSequenceClassification``: ``classifier.{weight,bias}`` over the BERT pooler output
  (dense + tanh on [CLS], the base's pooler) -> ``head.weight``/``head.bias``, pooling ``pooler``.
  The pooler is frozen base weights, so the served base must have one (a checkpoint without
  pooler weights gave the PEFT model a random pooler, which no file holds: refused).
* ``RobertaForSequenceClassification``: its head is ``out_proj(tanh(dense(h[CLS])))``. That is our
  ``pooler`` pooling + a Linear head only if ``classifier.dense.weight`` equals the served base's
  frozen ``pooler.dense.weight`` (exactly, at the adapter's precision): then ``classifier.dense.
  bias`` becomes the site ``pooler.dense.bias`` and ``classifier.out_proj`` the head. Otherwise
  (the usual case: transformers initializes that dense at random and it is trained) the
  adapter is refused, because a per-task dense matrix cannot be served. To train a servable
  RoBERTa adapter, copy the base pooler's weight into ``classifier.dense.weight`` and freeze it.
* Any other single Linear saved outside the encoder (a custom model's ``head``, ``score``): its
  pooling cannot be read from the adapter, so ``--pooling`` (pooler, cls or mean) is required.
  For the two HF classes above ``--pooling`` may be omitted and must agree if given.
* No head saved: refused ("missing head: train with modules_to_save=['classifier']...").

**Labels and problem type**: ``--label`` (repeatable, or comma-separated), else ``id2label``
from a ``config.json`` in the adapter folder, else ``LABEL_0..LABEL_{C-1}`` (``score`` for
regression). The problem type is ``--problem-type``, else that ``config.json``'s
``problem_type``, else ``regression`` for a one-output head and ``single_label_classification``
otherwise. Tensors stored in fp16/bf16 are widened to fp32 (a warning says so).

**The base**: ``--model`` is the base the delta is for (what ``serve --model`` takes: a folder,
``default``, or a hub id resolved by ``model.base.load_hf_base``). Without it,
``base_model_name_or_path`` from ``adapter_config.json`` is used when it is a local model folder
or a hub id already in the local Hugging Face cache (this implicit lookup never downloads); a hub
id naming the bundled model (``all-MiniLM-L6-v2``) falls back to the bundled copy with a
warning; any other hub id is refused ("pass --model"). When the adapter's base is available
locally and is not the ``--model`` folder itself, the two fingerprints must be equal (the trained
base, not just its name, must be the served one): otherwise ``BaseModelMismatch``. When the
adapter's base is a hub id that is not available locally, it cannot be checked: the import goes
on against ``--model`` with a warning (``--model`` equal to that id, loaded at the adapter's
``revision``, counts as checked). In every case the tensor paths must name the served
architecture (``bert.``/``roberta.``) and the delta passes ``delta.check_compatible`` against the
served base (fingerprint, sites, shapes, hidden size, pooler) before it is written.

**Refused, with a one-line reason** (``UnsupportedAdapter`` / ``BaseModelMismatch``, both
``InvalidDelta``): LoRA and every other method that changes weight matrices (AdaLoRA, LoHa,
LoKr, OFT, BOFT, VeRA, FourierFT, HRA, ...): one mixed forward cannot serve a different matrix
per row; IA3: its learned vectors *scale* activations and the delta format has no scale sites
yet; prompt/prefix methods (prompt tuning, p-tuning, prefix tuning, ...): they add virtual
tokens or key/value prefixes the shared forward does not take; any other or unknown method; a
base mismatch; a missing or unservable head; tensors that are not sites and differ from the base.

(About 480 lines: two PEFT methods, three head layouts and every refusal with its reason;
this docstring, the format's documentation, is a third of it.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from bitfit_serve import delta as delta_io
from bitfit_serve.delta import Delta
from bitfit_serve.errors import BaseModelMismatch, InvalidDelta
from bitfit_serve.model.architectures import ARCHITECTURES, architecture_for
from bitfit_serve.model.base import default_model_path, fingerprint, load_hf_base

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
SCHEMES = {"BEFT": "peft-beft", "LN_TUNING": "peft-ln_tuning"}
BEFT_SUFFIX = ".beft_bias"
LN_TUNING_INFIX = ".ln_tuning_layers."

# peft 0.21's PeftType values (and a few LoRA variants' names), grouped by why they cannot be served.
PROMPT_METHODS = frozenset({"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                            "ADAPTION_PROMPT", "CPT", "CARTRIDGE"})
WEIGHT_METHODS = frozenset({
    "LORA", "ADALORA", "ADAMSS", "BOFT", "LILY", "LOHA", "LOKR", "OFT", "POLY", "VERA", "FROD", "PVERA",
    "FOURIERFT", "GLORA", "XLORA", "HRA", "VBLORA", "UNILORA", "MISS", "BONE", "RANDLORA", "ROAD",
    "TRAINABLE_TOKENS", "HIRA", "SHIRA", "C3A", "WAVEFT", "OSF", "DELORA", "GRALORA", "TINYLORA", "PSOFT",
    "PEANUT", "SUPERTUNING", "DEFT", "VELORA", "KASA", "MONTECLORA", "BDLORA",
})

BERT_HEAD_CLASS = "BertForSequenceClassification"
ROBERTA_HEAD_CLASS = "RobertaForSequenceClassification"
ROBERTA_HEAD = ("classifier.dense.weight", "classifier.dense.bias",
                "classifier.out_proj.weight", "classifier.out_proj.bias")
POOLER_WEIGHT, POOLER_BIAS = "pooler.dense.weight", "pooler.dense.bias"
BUNDLED_NAME = "all-minilm-l6-v2"  # the hub name of the bundled default model, lower case

# Where the encoder starts in a tensor path: "bert.encoder.layer.0..." -> prefix "bert.";
# a head ("classifier.dense.weight") has none of these segments.
_BASE_RE = re.compile(r"^(?P<prefix>(?:[A-Za-z_]\w*\.)*?)(?P<rest>(?:embeddings|encoder|pooler)\..+)$")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class UnsupportedAdapter(InvalidDelta):
    """A PEFT adapter that cannot become a delta: the method, a tensor, the head or the labels."""

    code = "unsupported_adapter"


@dataclass(frozen=True)
class Imported:
    """The delta made from an adapter, the base it was checked against, and any warnings."""

    delta: Delta
    peft_type: str
    model_path: Path
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        d = self.delta
        values = sum(t.numel() for t in d.sites.values())
        return (f"task {d.task}, scheme {d.scheme}, {len(d.sites)} sites ({values} values), "
                f"head {d.head_weight.shape[0]}x{d.head_weight.shape[1]}, pooling {d.pooling}, "
                f"{d.problem_type}, labels {','.join(d.labels)}")


@dataclass(frozen=True)
class _Base:
    """A base model's fp32 parameters (HF base names) and what a delta is checked against."""

    path: Path
    config: Any
    params: Mapping[str, torch.Tensor]
    fingerprint: str
    site_shapes: Mapping[str, tuple[int, ...]] = field(repr=False)

    @property
    def model_type(self) -> str:
        return self.config.model_type


# ----------------------------------------------------------------------------- reading

def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UnsupportedAdapter(f"{adapter_dir}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnsupportedAdapter(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(config, dict):
        raise UnsupportedAdapter(f"{path}: not a JSON object")
    return config


def check_method(peft_type: str) -> None:
    """Raise UnsupportedAdapter unless ``peft_type`` changes only bias/LayerNorm sites."""
    if peft_type in SCHEMES:
        return
    if not peft_type:
        raise UnsupportedAdapter(f"{ADAPTER_CONFIG}: no peft_type; not a PEFT adapter")
    if peft_type == "IA3":
        raise UnsupportedAdapter("unsupported PEFT method IA3: its learned vectors scale keys, values and "
                                 "feed-forward activations; the delta format has no scale sites yet")
    if peft_type in PROMPT_METHODS:
        raise UnsupportedAdapter(f"unsupported PEFT method {peft_type}: it adds virtual tokens or key/value "
                                 f"prefixes, which the shared encoder forward does not take")
    if peft_type in WEIGHT_METHODS:
        raise UnsupportedAdapter(f"unsupported PEFT method {peft_type}: it changes weight matrices, which one "
                                 f"mixed forward cannot serve per row (importable: BEFT, LN_TUNING)")
    raise UnsupportedAdapter(f"unsupported PEFT method {peft_type}: only BEFT and LN_TUNING change nothing "
                             f"but bias and LayerNorm sites")


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        hint = (f" ({ADAPTER_PICKLE} is a pickle and is never loaded: re-save with "
                f"save_pretrained(..., safe_serialization=True))" if (adapter_dir / ADAPTER_PICKLE).exists() else "")
        raise UnsupportedAdapter(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{hint}")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for every malformation
        raise UnsupportedAdapter(f"{path}: not a valid safetensors file: {e}") from e


# ----------------------------------------------------------------------------- the base

def _load(path: str | Path | None, revision: str | None = None) -> _Base:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a CLI's stderr is for its warnings and its one error line
    try:
        path, config, model = load_hf_base(path) if revision is None else load_hf_base(path, revision=revision)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    params = {name: p.detach() for name, p in model.named_parameters()}
    arch = architecture_for(config.model_type)
    return _Base(Path(path), config, params, fingerprint(params),
                 {n: tuple(t.shape) for n, t in params.items() if arch.is_site(n)})


def _local_base(named: str | None, revision: str | None) -> Path | None:
    """The adapter's base as a local model folder: the path itself, or a hub id already in the
    Hugging Face cache (``local_files_only``: never a download). None when not available."""
    if not named:
        return None
    path = Path(named).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists() or named.startswith((".", "/", "~")) or not _HUB_ID_RE.fullmatch(named):
        return None
    try:
        from huggingface_hub import snapshot_download

        found = Path(snapshot_download(named, revision=revision, local_files_only=True))
    except Exception:  # not cached, no hub library, or an id the hub library rejects
        return None
    return found if (found / "config.json").is_file() else None


def _served_base(named: str | None, revision: str | None, model: str | None, warnings: list[str]) -> _Base:
    adapter_base = _local_base(named, revision)
    if model is not None and model == named:  # the very model the adapter names, at its revision
        return _load(model, revision)
    if model is not None:
        served = _load(None if model == "default" else model)
    elif adapter_base is not None:
        served = _load(adapter_base)
    elif named and named.strip("/").rsplit("/", 1)[-1].lower() == BUNDLED_NAME:
        warnings.append(f"the adapter's base {named!r} is not available locally: using the bundled "
                        f"{default_model_path()} of the same name (fingerprint not verified)")
        return _load(None)
    elif named:
        raise UnsupportedAdapter(f"base: the adapter was trained on {named!r}, which is neither a local folder "
                                 f"nor in the Hugging Face cache: pass --model with a local copy of it")
    else:
        raise UnsupportedAdapter(f"base: {ADAPTER_CONFIG} names no base_model_name_or_path: pass --model")
    if adapter_base is None:
        what = f"the adapter names {named!r}, which is not available locally" if named else \
            f"{ADAPTER_CONFIG} names no base_model_name_or_path"
        warnings.append(f"cannot verify the base: {what}; trusting --model {model} (the delta carries its "
                        f"fingerprint)")
        return served
    if adapter_base.resolve() == served.path.resolve():
        return served
    try:
        trained = _load(adapter_base)
    except (OSError, ValueError) as e:
        raise BaseModelMismatch(f"base: cannot load the adapter's base {named} to compare it with "
                                f"{served.path}: {e}") from e
    if trained.fingerprint != served.fingerprint:
        raise BaseModelMismatch(
            f"base: the adapter was trained on {named} (fingerprint {trained.fingerprint[:16]}...), "
            f"which is not the served base {served.path} ({served.fingerprint[:16]}...)")
    return served


# ----------------------------------------------------------------------------- tensors -> sites

def _equal(stored: torch.Tensor, base: torch.Tensor) -> bool:
    """Equal at the adapter's precision (a bf16 copy of an fp32 weight is still the same weight)."""
    return stored.shape == base.shape and torch.equal(stored.float(), base.to(stored.dtype).float())


def _split(tensors: Mapping[str, torch.Tensor], base: _Base) -> tuple[dict, dict]:
    """Adapter tensors -> (encoder tensors by path inside the base model, head tensors by path)."""
    encoder: dict[str, tuple[str, torch.Tensor]] = {}
    head: dict[str, tuple[str, torch.Tensor]] = {}
    prefixes = set()
    for key, t in sorted(tensors.items()):
        if not key.startswith(PEFT_PREFIX):
            raise UnsupportedAdapter(f"{key}: not a PeftModel tensor name (no {PEFT_PREFIX!r} prefix); "
                                     f"save the adapter with PeftModel.save_pretrained")
        name = key[len(PEFT_PREFIX):]
        m = _BASE_RE.match(name)
        if m:
            prefixes.add(m["prefix"])
            encoder[m["rest"]] = (key, t)
        else:
            head[name] = (key, t)
    if len(prefixes) > 1:
        raise UnsupportedAdapter(f"adapter tensors sit under several encoders ({sorted(prefixes)}); expected one")
    arch = next(iter(prefixes), "").rstrip(".")
    if arch in ARCHITECTURES and arch != base.model_type:
        raise BaseModelMismatch(f"architecture: the adapter was trained on a {arch} model ({arch}.* tensors), "
                                f"the served base {base.path} is {base.model_type}")
    return encoder, head


def _site_values(peft_type: str, encoder: Mapping[str, tuple[str, torch.Tensor]], base: _Base,
                 sites: dict[str, tuple[torch.Tensor, str]]) -> None:
    arch = base.model_type
    for rest, (key, t) in encoder.items():
        if peft_type == "BEFT" and rest.endswith(BEFT_SUFFIX):
            module = rest[: -len(BEFT_SUFFIX)]
            site = module + ".bias"
            if site not in base.params:
                if module + ".weight" in base.params:
                    raise UnsupportedAdapter(f"{key}: BEFT adds a bias to {module}, which has none in the served "
                                             f"base: there is no bias site to hold it")
                raise UnsupportedAdapter(f"{key}: {module} is not a module of the served {arch} base")
            if site not in base.site_shapes:
                raise UnsupportedAdapter(f"{key}: {site} is not a servable site (BEFT targets must be query, key, "
                                         f"value or dense layers of the encoder or its pooler)")
            if t.numel() != base.params[site].numel():
                raise UnsupportedAdapter(f"{key}: {t.numel()} values, but {site} has {base.params[site].numel()}")
            value = base.params[site].float() + t.reshape(-1).float()  # peft's forward: linear(x) + beft_bias
        else:
            site = rest.replace(LN_TUNING_INFIX, ".") if peft_type == "LN_TUNING" else rest
            if site not in base.params:
                raise UnsupportedAdapter(f"{key}: {site} is not a parameter of the served {arch} base")
            if tuple(t.shape) != tuple(base.params[site].shape):
                raise UnsupportedAdapter(f"{key}: shape {list(t.shape)} does not match the base's "
                                         f"{site} {list(base.params[site].shape)}")
            if site not in base.site_shapes:
                if _equal(t, base.params[site]):
                    continue  # a frozen copy (e.g. the weight of an LN-tuned Linear): nothing to serve
                raise UnsupportedAdapter(f"{key}: trains {site}, which is not a servable site (only biases and "
                                         f"LayerNorm weights are: one mixed forward cannot change a matrix per row)")
            value = t.float()
        _put(sites, site, value, key)


def _put(sites: dict[str, tuple[torch.Tensor, str]], site: str, value: torch.Tensor, key: str) -> None:
    if site in sites:
        raise UnsupportedAdapter(f"{key}: sets site {site}, which {sites[site][1]} already sets")
    sites[site] = (value.detach().to(torch.float32).contiguous(), key)


# ----------------------------------------------------------------------------- the head

def _head(head: Mapping[str, tuple[str, torch.Tensor]], head_class: str | None, base: _Base,
          pooling: str | None, sites: dict[str, tuple[torch.Tensor, str]]) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(pooling, head weight, head bias); a RoBERTa head's dense bias goes into ``sites``."""
    names = set(head)
    if not names:
        raise UnsupportedAdapter("missing head: the adapter saves no classifier; train with "
                                 "modules_to_save=['classifier'] (or task_type='SEQ_CLS') so that it is saved")
    if names == set(ROBERTA_HEAD) and head_class in (None, ROBERTA_HEAD_CLASS):
        _agree(pooling, "pooler", ROBERTA_HEAD_CLASS)
        key, dense_weight = head["classifier.dense.weight"]
        if POOLER_WEIGHT not in base.params:
            raise UnsupportedAdapter(f"{key}: RoBERTa's classifier.dense can only be served as the base pooler, "
                                     f"and the served base {base.path} has no pooler.dense")
        if not _equal(dense_weight, base.params[POOLER_WEIGHT]):
            raise UnsupportedAdapter(
                f"{key}: the RoBERTa head's dense weight differs from the served base's {POOLER_WEIGHT}; only its "
                f"bias can be served (as {POOLER_BIAS}, 'pooler' pooling): initialize classifier.dense from the "
                f"base pooler and freeze its weight when training")
        key, dense_bias = head["classifier.dense.bias"]
        _put(sites, POOLER_BIAS, dense_bias, key)
        return "pooler", head["classifier.out_proj.weight"][1], head["classifier.out_proj.bias"][1]
    modules = {n.rsplit(".", 1)[0] for n in names}
    if len(modules) == 1 and names == {f"{m}.{p}" for m in modules for p in ("weight", "bias")}:
        (module,) = modules
        weight, bias = head[f"{module}.weight"][1], head[f"{module}.bias"][1]
        if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise UnsupportedAdapter(f"head: {module} is not a Linear layer (weight {list(weight.shape)}, "
                                     f"bias {list(bias.shape)})")
        if head_class == BERT_HEAD_CLASS or (head_class is None and module == "classifier"
                                             and base.model_type == "bert"):
            _agree(pooling, "pooler", BERT_HEAD_CLASS)
            return "pooler", weight, bias
        if pooling is None:
            raise UnsupportedAdapter(f"head: {module} is the Linear head of {head_class or 'an unknown model class'}; "
                                     f"its pooling cannot be read from the adapter: pass --pooling (pooler, cls, mean)")
        return pooling, weight, bias
    raise UnsupportedAdapter(
        f"head: unrecognized head tensors {sorted(names)} ({head_class or 'unknown class'}): expected "
        f"classifier.weight/bias ({BERT_HEAD_CLASS}) or classifier.dense + classifier.out_proj ({ROBERTA_HEAD_CLASS})")


def _agree(pooling: str | None, implied: str, head_class: str) -> None:
    if pooling is not None and pooling != implied:
        raise UnsupportedAdapter(f"--pooling {pooling}: the adapter's {head_class} head was trained on "
                                 f"{implied!r} pooling")


def _labels(adapter_dir: Path, num_outputs: int, labels: Sequence[str] | None,
            problem_type: str | None) -> tuple[tuple[str, ...], str]:
    folder_config: dict[str, Any] = {}
    path = adapter_dir / "config.json"
    if path.is_file():
        try:
            folder_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UnsupportedAdapter(f"{path}: cannot read it as JSON ({e})") from e
    problem_type = (problem_type or folder_config.get("problem_type")
                    or ("regression" if num_outputs == 1 else "single_label_classification"))
    id2label = folder_config.get("id2label") or {}
    if labels:
        chosen = tuple(labels)
        source = "--label"
    elif id2label:
        try:
            chosen = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
        except KeyError:
            raise UnsupportedAdapter(f"{path}: id2label keys are not 0..{len(id2label) - 1}") from None
        source = f"{path} id2label"
    else:
        chosen = ("score",) if problem_type == "regression" else tuple(f"LABEL_{i}" for i in range(num_outputs))
        source = "default"
    if len(chosen) != num_outputs:
        raise UnsupportedAdapter(f"labels: {len(chosen)} from {source}, but the head has {num_outputs} outputs")
    return chosen, problem_type


# ----------------------------------------------------------------------------- the import

def import_peft(adapter_dir: str | Path, task: str, *, model: str | None = None, pooling: str | None = None,
                labels: Sequence[str] | None = None, problem_type: str | None = None,
                inputs: Sequence[str] = ("text",), max_length: int = 128) -> Imported:
    """Convert a PEFT adapter folder into a delta checked against the served base (not written).

    ``model``: the base to serve on (a folder, or "default"); None = the adapter's own base when it
    is available locally. Raises UnsupportedAdapter / BaseModelMismatch (InvalidDelta) with a
    one-line reason, FileNotFoundError / ValueError for a ``model`` that cannot be loaded."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    peft_type = str(config.get("peft_type") or "").upper()
    check_method(peft_type)
    tensors = read_adapter_tensors(adapter_dir)
    warnings: list[str] = []
    named = config.get("base_model_name_or_path")
    base = _served_base(named, config.get("revision"), model, warnings)

    encoder, head = _split(tensors, base)
    sites: dict[str, tuple[torch.Tensor, str]] = {}
    _site_values(peft_type, encoder, base, sites)
    head_class = (config.get("auto_mapping") or {}).get("base_model_class")
    pooling, head_weight, head_bias = _head(head, head_class, base, pooling, sites)
    chosen_labels, problem_type = _labels(adapter_dir, head_weight.shape[0], labels, problem_type)
    narrow = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.dtype != torch.float32})
    if narrow:
        warnings.append(f"adapter tensors in {', '.join(narrow)} were widened to float32")

    target_modules = config.get("target_modules")
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = sorted(target_modules)
    delta = Delta.of(
        task=task, sites={name: value for name, (value, _) in sorted(sites.items())},
        head_weight=head_weight.detach().float().contiguous(), head_bias=head_bias.detach().float().contiguous(),
        labels=chosen_labels, problem_type=problem_type, pooling=pooling,
        base_fingerprint=base.fingerprint, architecture=base.model_type, base_model=str(named or base.path),
        inputs=tuple(inputs), max_length=max_length, scheme=SCHEMES[peft_type],
        train_args={"source": "peft", "peft_type": peft_type, "peft_version": str(config.get("peft_version", "")),
                    "target_modules": target_modules, "modules_to_save": config.get("modules_to_save"),
                    "head_class": head_class, "adapter": str(adapter_dir)},
    )
    delta_io.check_compatible(delta, fingerprint=base.fingerprint, architecture=base.model_type,
                              site_shapes=base.site_shapes, hidden_size=base.config.hidden_size)
    return Imported(delta, peft_type, base.path, tuple(warnings))
