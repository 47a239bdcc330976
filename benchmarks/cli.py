"""What every benchmark script shares around its measurement: the common command-line options
(:func:`parser`) and applying them (:func:`setup`: threads, seeds, the tiny model under
``--quick``), the dtype names those options take, what ran where (:func:`environment`, the
command line, the load average) and writing ``benchmarks/results/<name><suffix>.json`` with all of
that beside the script's own payload (:func:`write_result`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.glue import default_glue_dir

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm",
                   help="minilm (bundled, real weights), bert-base (random weights, BERT-base shape), "
                        "tiny (for smoke tests) or a local HF BERT folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (same for every variant)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (same for every variant)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default per script)")
    p.add_argument("--glue-dir", type=Path, default=default_glue_dir(),
                   help="GLUE folder (TASK/dev.tsv); env GLUE_DIR, default ../shared/data/glue")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for <name>.json and <name>.png")
    p.add_argument("--suffix", default="", help="appended to the result name, e.g. _gpu or _bertbase")
    p.add_argument("--quick", action="store_true",
                   help="few repetitions and small cases, on the tiny model unless --model says otherwise: "
                        "checks that the script runs, measures nothing")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply the shared options once: threads, seeds, and the tiny model under --quick."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.quick and args.model == "minilm":
        args.model = "tiny"
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and load_average() > (os.cpu_count() or 1):
        print(f"warning: load average {load_average()} > {os.cpu_count()} cores and OMP_WAIT_POLICY is not "
              f"PASSIVE: spinning OpenMP threads will dominate the timings (run with OMP_WAIT_POLICY=PASSIVE)",
              file=sys.stderr)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float:
    """1-minute load average: other processes on this machine compete for the same cores."""
    return round(os.getloadavg()[0], 2)


def environment(device: str = "cpu") -> dict:
    import transformers

    env = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        # libgomp's default spin-waiting turns every parallel op into a wait for a descheduled
        # thread when other processes hold the cores; PASSIVE makes waiting threads sleep.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    try:
        import psutil

        env["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def command() -> str:
    """The command line that ran, with the OpenMP variables it ran under."""
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ)
    return env + "python -m benchmarks." + Path(sys.argv[0]).stem + "".join(" " + shlex.quote(a) for a in sys.argv[1:])


def write_result(args: argparse.Namespace, name: str, payload: dict, load_before: float) -> Path:
    """benchmarks/results/<name><suffix>.json with the environment, command and load average."""
    out = args.out / f"{name}{args.suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": command(),
        "finished_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(args.device),
        "load_average_1min": {"before": load_before, "after": load_average()},
        # paths relative to where the command ran: no machine's absolute path in a result
        "settings": {k: os.path.relpath(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **payload,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return out
