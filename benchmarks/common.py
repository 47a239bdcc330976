"""Shared pieces of every benchmark: what ran where, real GLUE inputs, models, deltas, timing, JSON.

Nothing here times anything by itself; each script in this folder states its own command in its
docstring and writes ``benchmarks/results/<name>.json`` (+ ``.png``) through :func:`write_result`.

Run them as ``OMP_WAIT_POLICY=PASSIVE python -m benchmarks.<name>`` on a machine shared with other
work: libgomp's default spin-waiting makes each of a forward's ~100 parallel ops wait for a thread
the OS has descheduled (MiniLM 32x32 tokens, 2 threads, load 13 on 2 cores: 315 ms median per
forward spinning vs 2.3 ms passive). The value is recorded with the command.

Fairness rules every script follows:
* all variants of one comparison run in one process, interleaved round-robin (the order rotates
  each repetition), on identical pre-tokenized batches, same dtype, same thread count;
* tokenization and padding are done before timing for every variant (the engine's and HF's
  forwards are what is compared); the HTTP benchmarks measure the whole path instead;
* medians over repetitions, ratios computed from medians of the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = Path(__file__).resolve().parent.parent / "runs"  # git-ignored: generated model folders
DEFAULT_GLUE_DIR = Path("/work/shared/data/glue")
MINILM_ENV = "BITFIT_BENCH_MINILM"  # a MiniLM folder to use instead of the bundled package

# BERT-base shape (bert-base-uncased): timing needs the shape, not trained weights.
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu")


# ---------------------------------------------------------------------------------------- CLI
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
    p.add_argument("--glue-dir", type=Path, default=Path(os.environ.get("BITFIT_GLUE_DIR", DEFAULT_GLUE_DIR)))
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


def sync(device: str) -> None:
    """Wait for queued GPU work so a timer measures the work, not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- environment
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
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **payload,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def plot_path(args: argparse.Namespace, name: str) -> Path:
    return args.out / f"{name}{args.suffix}.png"


def subplots(panels: int, width: float = 11.0):
    """(figure, axes) of ``panels`` plots side by side, drawn off screen: files only, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(width, 4))


def save_figure(fig, args: argparse.Namespace, name: str, title: str, *, threads: bool = True, extra: str = "",
                fontsize: float | None = None) -> None:
    """Title the figure with what ran where (model, device, dtype, this process's threads unless
    ``threads`` is False, then ``extra``) and write it beside the JSON, as ``<name><suffix>.png``."""
    label = [args.model, f"{args.device} {args.dtype}"] + ([f"{args.threads} threads"] if threads else [])
    fig.suptitle(f"{title} ({', '.join(label + ([extra] if extra else []))})", fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(plot_path(args, name), dpi=110)


# ---------------------------------------------------------------------------------------- inputs
# (file, columns of the text or text pair, has a header row)
GLUE_DEV = {
    "SST-2": ("SST-2/dev.tsv", (0,), True),
    "CoLA": ("CoLA/dev.tsv", (3,), False),
    "MRPC": ("MRPC/dev.tsv", (3, 4), True),
    "RTE": ("RTE/dev.tsv", (1, 2), True),
    "STS-B": ("STS-B/dev.tsv", (7, 8), True),
    "QNLI": ("QNLI/dev.tsv", (1, 2), True),
    "WNLI": ("WNLI/dev.tsv", (1, 2), True),
}

Text = str | tuple[str, str]


def glue_dev_texts(glue_dir: Path) -> dict[str, list[Text]]:
    """Every GLUE dev input by task: a sentence, or a sentence pair for the pair tasks."""
    texts = {}
    for task, (file, columns, header) in GLUE_DEV.items():
        path = glue_dir / file
        if not path.is_file():
            raise SystemExit(f"GLUE dev file missing: {path} (pass --glue-dir)")
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        rows = rows[1:] if header else rows
        pick = (lambda r: r[columns[0]]) if len(columns) == 1 else (lambda r: (r[columns[0]], r[columns[1]]))
        texts[task] = [pick(r) for r in rows if len(r) > max(columns)]
    return texts


def sample_texts(glue_dir: Path, n: int, seed: int = 0) -> list[Text]:
    """``n`` GLUE dev inputs, task chosen uniformly then an input of it: the real length mix of
    single sentences (SST-2, CoLA) and pairs (MRPC, RTE, STS-B, QNLI, WNLI)."""
    by_task = glue_dev_texts(glue_dir)
    rng = random.Random(seed)
    tasks = sorted(by_task)
    return [rng.choice(by_task[rng.choice(tasks)]) for _ in range(n)]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(tokenizer, texts: Sequence[Text], max_length: int = 128) -> list[Encoded]:
    out = []
    for t in texts:
        first, second = (t, None) if isinstance(t, str) else t
        enc = tokenizer(first, second, truncation=True, max_length=max_length, return_token_type_ids=True)
        out.append(Encoded(enc["input_ids"], enc["token_type_ids"]))
    return out


def packed_texts(tokenizer, glue_dir: Path, n: int, length: int) -> list[Encoded]:
    """``n`` sequences of exactly ``length`` tokens of real text: consecutive SST-2 dev sentences
    joined until long enough, then truncated (for the fixed 32 x 128 reference shape)."""
    sentences = glue_dev_texts(glue_dir)["SST-2"]
    out, i = [], 0
    while len(out) < n:
        words = []
        while len(tokenizer(" ".join(words))["input_ids"]) < length:
            words.append(sentences[i % len(sentences)])
            i += 1
        enc = tokenizer(" ".join(words), truncation=True, max_length=length, return_token_type_ids=True)
        out.append(Encoded(enc["input_ids"], enc["token_type_ids"]))
    return out


@dataclass(frozen=True)
class Batch:
    """Padded tensors for one batch, the same for every variant."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    token_type_ids: torch.Tensor  # [B, T]
    lengths: tuple[int, ...]  # real tokens per sequence

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def pad(encoded: Sequence[Encoded], pad_id: int, device: str = "cpu") -> Batch:
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        types[i, : len(e)] = torch.tensor(e.token_type_ids)
        mask[i, : len(e)] = 1
    return Batch(ids.to(device), mask.to(device), types.to(device), tuple(len(e) for e in encoded))


def batches_of(encoded: Sequence[Encoded], batch_size: int, count: int, pad_id: int, device: str,
               seed: int = 0) -> list[Batch]:
    """``count`` batches of ``batch_size`` inputs drawn at random (no length sorting: the mix a
    server sees when one batch collects whatever arrived)."""
    rng = random.Random(seed)
    return [pad(rng.sample(list(encoded), batch_size), pad_id, device) for _ in range(count)]


# ---------------------------------------------------------------------------------------- models
def model_path(name: str) -> Path:
    """minilm -> the bundled all-MiniLM-L6-v2 (or the folder in $BITFIT_BENCH_MINILM: a GPU machine
    has no bundled package, see gpu_kit.py); bert-base / tiny -> random weights, saved once under runs/."""
    from bitfit_serve.model.base import default_model_path

    if name == "minilm":
        return Path(os.environ[MINILM_ENV]) if os.environ.get(MINILM_ENV) else default_model_path()
    if name in ("bert-base", "tiny"):
        folder = RUNS_DIR / f"{name}-random"
        if not (folder / "config.json").is_file():
            build_random_bert(folder, BERT_BASE if name == "bert-base" else TINY)
        return folder
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not minilm/bert-base/tiny nor a HF model folder")
    return path


def build_random_bert(folder: Path, shape: Mapping, seed: int = 0) -> Path:
    """A BERT with random weights and the bundled MiniLM's WordPiece tokenizer (same vocab as
    bert-base-uncased). Biases and LayerNorms get small random values so they are not trivial."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"), local_files_only=True)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **shape))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # several processes may build it at once: the first rename wins
    return folder


def hf_classifier(path: Path, num_labels: int, dtype: torch.dtype, device: str):
    """Plain HF ``AutoModelForSequenceClassification``, eval mode, serving dtype."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the classifier head is new on purpose: deltas fill it
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    return model.to(device=device, dtype=dtype).eval()


def bitfit_sites(hf_base) -> list[str]:
    """The sites BitFit trains: every bias of the encoder, plus the pooler's (pooling = pooler)."""
    from bitfit_serve.model.architectures import SITE_RE

    return [n for n, _ in hf_base.named_parameters() if SITE_RE.match(n) and n.endswith(".bias")]


class DeltaFactory:
    """Random trained-like deltas: base values plus small noise on the BitFit sites, a random head.

    BitFit moves biases by ~1e-2; ``scale`` 0.02 gives values of that size. Pooling is the
    pooler, so the engine does exactly the work of HF's sequence classifier."""

    def __init__(self, path: Path, scale: float = 0.02, num_labels: int = 2):
        from bitfit_serve.model.base import fingerprint_of, load_hf_base

        _, config, hf_base = load_hf_base(path)
        self.path, self.scale, self.num_labels = path, scale, num_labels
        self.hidden = config.hidden_size
        self.model_type = config.model_type
        params = dict(hf_base.named_parameters())
        self.base = {n: params[n].detach().float().clone() for n in bitfit_sites(hf_base)}
        self.fingerprint = fingerprint_of(hf_base)

    def __call__(self, task: str, seed: int, inputs: tuple[str, ...] = ("text",)):
        from bitfit_serve.delta import Delta

        g = torch.Generator().manual_seed(seed)
        sites = {n: v + self.scale * torch.randn(v.shape, generator=g) for n, v in self.base.items()}
        return Delta(
            task=task, sites=sites,
            head_weight=torch.randn(self.num_labels, self.hidden, generator=g) / self.hidden ** 0.5,
            head_bias=torch.randn(self.num_labels, generator=g) * 0.1,
            labels=tuple(f"label_{i}" for i in range(self.num_labels)),
            problem_type="single_label_classification", pooling="pooler",
            base_fingerprint=self.fingerprint, architecture=self.model_type, base_model=str(self.path),
            inputs=inputs, max_length=128, scheme="bitfit",
        )


@torch.no_grad()
def load_delta_into(model, delta) -> None:
    """Copy a delta's values into a HF sequence classifier in place (its sites and its head)."""
    base = model.base_model
    params = dict(base.named_parameters())
    for name, value in delta.sites.items():
        params[name].copy_(value)
    model.classifier.weight.copy_(delta.head_weight)
    model.classifier.bias.copy_(delta.head_bias)


def engine_batch(engine, batch: Batch, rows: Sequence[int]):
    """The same padded tensors as an EncoderBatch with one bank row per sequence."""
    from bitfit_serve.model.encoder import EncoderBatch

    return EncoderBatch.of_rows(batch.input_ids, batch.attention_mask, batch.token_type_ids, rows,
                                has_padding=min(batch.lengths) < batch.shape[1])


# ---------------------------------------------------------------------------------------- timing
def interleave(variants: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1,
               device: str = "cpu", cpu_out: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, run round-robin; the order rotates every repetition so no
    variant always follows the same neighbour (cache state, thermal, the other agents' load).

    ``cpu_out`` (optional) receives the process CPU seconds of each call (all threads): unlike wall
    time it barely moves when other processes take the cores, so on a shared machine it is the
    steadier measure of the work each variant does."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            cpu_start, start = time.process_time(), time.perf_counter()
            variants[n]()
            sync(device)
            times[n].append(time.perf_counter() - start)
            if cpu_out is not None:
                cpu_out.setdefault(n, []).append(time.process_time() - cpu_start)
    return times


def summarize_variants(times: Mapping[str, list[float]], cpu: Mapping[str, list[float]], seqs: int) -> dict[str, dict]:
    """Per variant of one ``interleave`` run: median wall seconds per call, sequences per second
    (``seqs`` per call), median process CPU seconds, and the raw timings behind them."""
    out = {}
    for v, t in times.items():
        median = stats(t)["median"]
        out[v] = {"median_s": median, "seq_per_s": seqs / median, "raw_s": t,
                  "cpu_median_s": stats(cpu[v])["median"], "cpu_raw_s": cpu[v]}
    return out


def paired_ratio(reference: Sequence[float], variant: Sequence[float]) -> float:
    """Median over repetitions of ``reference[r] / variant[r]`` (the variant's speed relative to
    the reference, as a throughput ratio). ``interleave`` runs every variant on the same batch
    within a repetition, back to back, so a slow spell of the machine hits both sides of a pair:
    the per-repetition ratios cancel it, the ratio of the two medians does not."""
    assert len(reference) == len(variant), "paired timings come from one interleave run"
    return statistics.median(r / v for r, v in zip(reference, variant))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of raw values, no interpolation: the smallest value
    with at least q% of the values at or below it (of 100 values, p99 is the 99th, not the max)."""
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def stats(values: Sequence[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "p50": percentile(values, 50),
            "p99": percentile(values, 99), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------------------------------- FLOPs
def forward_flops(config, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one encoder forward over a padded [batch, seq_len] batch (2 per MAC):
    Q/K/V/output projections, the MLP, and attention scores + weighted sum. Pooler and head are
    negligible and left out. MiniLM at 32 x 128: 91.8 GFLOP."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = batch_size * seq_len
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * h
    return float(tokens * layers * per_token_layer)


def matmul_rate(device: str, dtype: torch.dtype, reps: int = 20, rows: int = 4096) -> dict:
    """The machine's measured matmul rate (FLOP/s) on the shapes a MiniLM/BERT forward uses:
    the best median over a few [rows, k] @ [k, n] products (rows = 4096 = 32 x 128 tokens). It is the denominator of the
    "fraction of the matmul rate" (MFU) figures."""
    shapes = [(rows, 384, 1536), (rows, 1536, 384), (rows, 384, 1152), (rows, 768, 3072)]
    best, per_shape = 0.0, {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(n, k, device=device, dtype=dtype)
        torch.nn.functional.linear(a, b)
        sync(device)
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            sync(device)
            samples.append(time.perf_counter() - start)
        rate = 2 * m * k * n / statistics.median(samples)
        per_shape[f"{m}x{k}x{n}"] = rate
        best = max(best, rate)
    return {"flops_per_s": best, "per_shape_flops_per_s": per_shape}


def gemm_probe(config, tokens: int, device: str, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    """A callable doing one encoder layer's four projection matmuls (fused QKV, attention output,
    MLP in, MLP out) on random [tokens, *] inputs, and its FLOPs. Timed interleaved with the
    forwards, it gives the matmul rate under the same contention as they run, the denominator of
    the "fraction of the matmul rate" figure."""
    h, i = config.hidden_size, config.intermediate_size
    x = torch.randn(tokens, h, device=device, dtype=dtype)
    mid = torch.randn(tokens, i, device=device, dtype=dtype)
    weights = [torch.randn(3 * h, h, device=device, dtype=dtype), torch.randn(h, h, device=device, dtype=dtype),
               torch.randn(i, h, device=device, dtype=dtype)]
    w_out = torch.randn(h, i, device=device, dtype=dtype)

    def run():
        for w in weights:
            torch.nn.functional.linear(x, w)
        return torch.nn.functional.linear(mid, w_out)

    return run, float(2 * tokens * (3 * h * h + h * h + 2 * h * i))


def cycling(fn: Callable[[object], object], items: Sequence[object]) -> Callable[[], object]:
    """A no-argument callable that applies ``fn`` to the next item each call (its own counter, so
    every variant built this way sees the same item sequence)."""
    state = {"i": 0}

    def call():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return fn(item)

    return call


# ---------------------------------------------------------------------------------------- HTTP server
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` listens on ``port``. A port picked free may be taken by another
    process before the server binds it: that process's /ready must not pass for the server's
    (whose bind then fails and it exits)."""
    import psutil

    try:
        process = psutil.Process(pid)
        connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6
        sockets = connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in sockets)


def write_task_files(factory: DeltaFactory, folder: Path, names: Sequence[str], pair_every: int = 2) -> dict[str, bool]:
    """One delta file per task in a server's deltas folder; every ``pair_every``-th task takes
    sentence pairs (like MRPC/RTE), the others single sentences. Returns task -> is a pair task."""
    from bitfit_serve import delta as delta_io

    folder.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for i, name in enumerate(names):
        pairs[name] = pair_every > 0 and i % pair_every == 1
        inputs = ("sentence1", "sentence2") if pairs[name] else ("text",)
        delta_io.save(factory(name, seed=i, inputs=inputs), folder / f"{name}.safetensors")
    return pairs


# The server's /metrics counters of its forward passes: seconds, passes, sequences.
FORWARD_COUNTERS = ("bitfit_forward_duration_seconds_sum", "bitfit_forward_duration_seconds_count",
                    "bitfit_batch_size_sum")


def forward_activity(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """What the server's model did between two scrapes of FORWARD_COUNTERS: how many forwards, their
    mean time and size, and the share of the wall time it was busy (how loaded the server was)."""
    seconds, passes, sequences = (after[n] - before[n] for n in FORWARD_COUNTERS)
    return {"forward_passes": passes, "forward_ms_mean": seconds / passes * 1e3 if passes else None,
            "sequences_per_forward": sequences / passes if passes else None,
            "forward_busy_share": seconds / wall_s}


class Server:
    """The real ``bitfit-serve serve`` process on 127.0.0.1 and a free port, stopped on exit."""

    def __init__(self, model: Path, deltas: Path, *flags: str, log_path: Path | None = None,
                 timeout_s: float = 300.0):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = ["bitfit-serve", "serve", "--model", str(model), "--deltas", str(deltas),
                        "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *flags]
        self._log = open(log_path or os.devnull, "w")
        import subprocess

        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: {' '.join(self.command)}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200 and listens(self.proc.pid, self.port):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server not ready after {timeout_s:.0f} s: {' '.join(self.command)}")
            time.sleep(0.2)

    def metrics(self, *names: str) -> dict[str, float]:
        """Several unlabelled samples from one scrape, so that they describe the same moment."""
        import httpx

        found = {}
        for line in httpx.get(self.url + "/metrics", timeout=10.0).text.splitlines():
            name, _, value = line.partition(" ")
            if name in names:
                found[name] = float(value)
        missing = set(names) - set(found)
        if missing:
            raise KeyError(f"not in /metrics: {sorted(missing)}")
        return found

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def split_texts(texts: Sequence[Text]) -> tuple[list[str], list[tuple[str, str]]]:
    """GLUE inputs into single sentences and sentence pairs."""
    return [t for t in texts if isinstance(t, str)], [t for t in texts if not isinstance(t, str)]
