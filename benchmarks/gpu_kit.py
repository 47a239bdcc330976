"""Issue 6, item 8 (benchmarks 1-5 on a GPU) in one device call: what has to travel, made here.

A lent GPU machine has torch, transformers, peft, safetensors, matplotlib and httpx, but neither
the bundled MiniLM package nor ``../shared/data/glue``, and only the repository travels (64 MiB
at most). So, on this machine:

    python -m benchmarks.gpu_kit                     # writes runs/gpu_kit/ (~46 MB, git-ignored)

    # MiniLM's weights in fp16 (the benchmarks run in bf16), its tokenizer and config, and the GLUE
    # dev files the benchmarks read. Then ONE device call (about 8 minutes of the 15 a session has):
    #   run(command="bash benchmarks/gpu_run.sh", carry=["runs/gpu_kit"], timeout_s=560)
    # and unpack what comes back:
    #   tar xzf <files_at>/gpu_results.tgz -C benchmarks/results --strip-components=1

``benchmarks/gpu_run.sh`` runs vs_hf (MiniLM and BERT-base), mixed_tasks, vs_swap, vs_lora and
memory with ``--device cuda --dtype bf16 --suffix _gpu``; ``python -m benchmarks.summary --suffix
_gpu`` then prints the targets from the ``*_gpu.json`` files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.glue import GLUE_DEV, default_glue_dir
from benchmarks.models import RUNS_DIR

KIT_DIR = RUNS_DIR / "gpu_kit"
TRAVEL_LIMIT_BYTES = 64 << 20  # the device tool's limit for everything that travels
WEIGHTS = "model.safetensors"


def write_fp16_model(source: Path, target: Path) -> None:
    """The model folder with its weights in fp16 (half the bytes; the GPU runs bf16 anyway) and
    every other file as it is, so that tokenizer, config and layout stay the bundled model's."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != WEIGHTS:
            shutil.copy2(path, target / path.name)
    weights = {name: t.to(torch.float16) if t.is_floating_point() else t
               for name, t in load_file(source / WEIGHTS).items()}
    save_file(weights, target / WEIGHTS, metadata={"format": "pt"})


def copy_glue_dev(glue_dir: Path, target: Path) -> None:
    """Only the dev files the benchmarks read (``GLUE_DEV``): a transient copy for the device
    call, in a git-ignored folder, never committed."""
    for file, _, _ in GLUE_DEV.values():
        (target / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(glue_dir / file, target / file)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", type=Path, default=default_glue_dir(),
                   help="GLUE folder (TASK/dev.tsv); env GLUE_DIR, default ../shared/data/glue")
    p.add_argument("--out", type=Path, default=KIT_DIR)
    args = p.parse_args()
    from bitfit_serve.model.base import default_model_path

    if args.out.exists():
        shutil.rmtree(args.out)
    write_fp16_model(default_model_path(), args.out / "minilm-fp16")
    copy_glue_dev(args.glue_dir, args.out / "glue")
    size = folder_bytes(args.out)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB; with the repository it must stay under "
          f"{TRAVEL_LIMIT_BYTES >> 20} MiB)")
    if size > TRAVEL_LIMIT_BYTES:
        raise SystemExit("too large to travel to the device machine")


if __name__ == "__main__":
    main()
