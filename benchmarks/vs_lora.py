"""Engine vs HF PEFT LoRA multi-adapter serving (mixed ``adapter_names`` batches).

    python -m benchmarks.vs_lora                     # MiniLM, CPU fp32, 2 threads
    python -m benchmarks.vs_lora --model bert-base --suffix _bertbase --reps 4
    python -m benchmarks.vs_lora --device cuda --dtype bf16 --suffix _gpu

Baseline: ``get_peft_model`` over ``AutoModelForSequenceClassification`` with k LoRA adapters
(r=8, alpha=16, on query/value, random non-zero A and B) and a classifier head per adapter
(``modules_to_save``, PEFT's default for SEQ_CLS); a batch's sequences go round-robin to the k
adapters through ``adapter_names`` (PEFT's mixed-batch inference, unmerged). Engine: k BitFit
tasks, the same batches, one row per sequence. ``hf_one_task`` (plain model, no adapter) is the
single-model ceiling. Interleaved round-robin, for k = 8 and 64 at batch 32; then batch-1 latency
(one GLUE input, one adapter / task per call) and the time to load one adapter / delta from disk.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import cli, glue, models, plotting, timing
from bitfit_serve import delta as delta_io
from bitfit_serve.engine import Engine

NAME = "vs_lora"


def lora_model(path: Path, adapters: int, num_labels: int, dtype: torch.dtype, device: str, seed: int):
    """A PEFT model with ``adapters`` LoRA adapters ("a0", "a1", ...), each with its own head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS",
                        init_lora_weights=False)  # random B too: an adapter that changes the output
    model = get_peft_model(models.hf_classifier(path, num_labels, torch.float32, "cpu"), config, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:  # per-adapter heads: random, like a trained one
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.to(device=device, dtype=dtype).eval()


def main() -> None:
    import peft

    p = cli.parser(__doc__)
    p.add_argument("--adapters", default="8,64")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-calls", type=int, default=150)
    p.add_argument("--load-trials", type=int, default=20)
    args = p.parse_args()
    cli.setup(args)
    load_before = cli.load_average()
    reps = args.reps or (2 if args.quick else 8)
    calls = 6 if args.quick else args.latency_calls
    trials = 3 if args.quick else args.load_trials
    counts = [2, 4] if args.quick else [int(x) for x in args.adapters.split(",")]
    b = 8 if args.quick else args.batch_size
    dtype = cli.torch_dtype(args.dtype)
    path = models.model_path(args.model)

    factory = models.DeltaFactory(path)
    engine = Engine.from_pretrained(path, device=args.device, dtype=dtype)
    rows = [engine.add_task(factory(f"task{i}", seed=i)).row for i in range(max(counts))]
    hf = models.hf_classifier(path, factory.num_labels, dtype, args.device)
    pad_id = engine.base.config.pad_token_id
    texts = glue.tokenize(engine.base.tokenizer, glue.sample_texts(args.glue_dir, 2000, seed=args.seed))
    batches = glue.batches_of(texts, b, 4, pad_id, args.device, seed=args.seed + b)

    def run_engine(batch: glue.Batch, k: int) -> torch.Tensor:
        return engine.forward(models.engine_batch(engine, batch, [rows[i % k] for i in range(batch.shape[0])]))

    def run_lora(model, batch: glue.Batch, k: int) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         token_type_ids=batch.token_type_ids,
                         adapter_names=[f"a{i % k}" for i in range(batch.shape[0])]).logits.float().cpu()

    @torch.inference_mode()
    def run_hf(batch: glue.Batch) -> torch.Tensor:
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  token_type_ids=batch.token_type_ids).logits.float().cpu()

    results, lora_models = {}, {}
    for k in counts:
        model = lora_models[k] = lora_model(path, k, factory.num_labels, dtype, args.device, seed=args.seed + k)
        # PEFT's own check that mixing is real: sequences on different adapters get different logits.
        probe = run_lora(model, glue.pad([texts[0]] * 2, pad_id, args.device), 2)
        distinct = bool((probe[0] - probe[1]).abs().max() > 1e-4)
        cpu: dict[str, list[float]] = {}
        times = timing.interleave({
            "engine": timing.cycling(lambda x: run_engine(x, k), batches),
            "lora": timing.cycling(lambda x: run_lora(model, x, k), batches),
            "hf_one_task": timing.cycling(run_hf, batches),
        }, reps=reps, device=args.device, cpu_out=cpu)
        case = {"adapters": k, "batch": b, "adapters_give_distinct_outputs": distinct,
                "batch_shapes": [x.shape for x in batches]}
        case.update(timing.summarize_variants(times, cpu, b))
        case["paired_ratio_engine_over_lora"] = timing.paired_ratio(times["lora"], times["engine"])
        case["cpu_ratio_engine_over_lora"] = case["lora"]["cpu_median_s"] / case["engine"]["cpu_median_s"]
        case["ratio_engine_over_lora"] = case["engine"]["seq_per_s"] / case["lora"]["seq_per_s"]
        case["ratio_lora_over_hf_one_task"] = case["lora"]["seq_per_s"] / case["hf_one_task"]["seq_per_s"]
        case["ratio_engine_over_hf_one_task"] = case["engine"]["seq_per_s"] / case["hf_one_task"]["seq_per_s"]
        results[f"k{k}"] = case
        print(f"{k:3d} adapters, batch {b}: engine {case['engine']['seq_per_s']:7.1f}  lora {case['lora']['seq_per_s']:7.1f}"
              f"  hf(1 task) {case['hf_one_task']['seq_per_s']:7.1f} seq/s  engine/lora {case['ratio_engine_over_lora']:.2f}x"
              f"  lora/hf {case['ratio_lora_over_hf_one_task']:.2f}x")

    # Batch-1 latency: one GLUE input, the task / adapter changing every call.
    k = counts[0]
    one = glue.batches_of(texts, 1, calls, pad_id, args.device, seed=args.seed + 7)
    turn = {"engine": 0, "lora": 0}

    def engine_b1(batch):
        turn["engine"] += 1
        return engine.forward(models.engine_batch(engine, batch, [rows[turn["engine"] % k]]))

    def lora_b1(batch):
        turn["lora"] += 1
        with torch.inference_mode():
            return lora_models[k](input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  token_type_ids=batch.token_type_ids,
                                  adapter_names=[f"a{turn['lora'] % k}"]).logits.float().cpu()

    cpu = {}
    times = timing.interleave({"engine": timing.cycling(engine_b1, one), "lora": timing.cycling(lora_b1, one),
                               "hf_one_task": timing.cycling(run_hf, one)}, reps=calls, warmup=3, device=args.device,
                              cpu_out=cpu)
    latency = {v: {s: x * 1e3 for s, x in timing.stats(t).items() if s != "n"} for v, t in times.items()}
    latency["ratio_p50_engine_over_lora"] = latency["engine"]["p50"] / latency["lora"]["p50"]
    latency["ratio_p99_engine_over_lora"] = latency["engine"]["p99"] / latency["lora"]["p99"]
    latency["ratio_p50_lora_over_hf"] = latency["lora"]["p50"] / latency["hf_one_task"]["p50"]
    latency["raw_s"] = times
    latency["cpu_median_ms"] = {v: timing.stats(c)["median"] * 1e3 for v, c in cpu.items()}
    latency["cpu_raw_s"] = cpu
    print(f"batch-1 p50: engine {latency['engine']['p50']:.2f} ms  lora {latency['lora']['p50']:.2f} ms  "
          f"hf {latency['hf_one_task']['p50']:.2f} ms  engine/lora {latency['ratio_p50_engine_over_lora']:.2f}x")

    loading = load_times(engine, factory, lora_models[k], trials)
    print(f"load one from disk (median): delta {loading['delta_ms']['median']:.2f} ms ({loading['delta_tensors']} tensors)"
          f"  PEFT load_adapter {loading['lora_ms']['median']:.2f} ms")

    cli.write_result(args, NAME, {"model": str(path), "peft": peft.__version__,
                                  "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"], "heads": "per adapter"},
                                  "cases": results, "latency_b1_ms": latency, "load_one": loading}, load_before)
    plot(args, results, latency, loading)


def load_times(engine: Engine, factory: models.DeltaFactory, model, trials: int) -> dict:
    """Median time to make one more task servable from a file: ``Engine.add_task(path)`` (read,
    validate, write a bank row, publish) vs PEFT ``load_adapter`` (read, build modules, copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        delta = factory("loaded", seed=999)
        delta_io.save(delta, tmp / "loaded.safetensors")
        model.save_pretrained(tmp / "lora", selected_adapters=["a0"])
        adapter_dir = next(p.parent for p in (tmp / "lora").rglob("adapter_config.json"))
        delta_ms, lora_ms = [], []
        for i in range(trials):
            start = time.perf_counter()
            engine.add_task(tmp / "loaded.safetensors")
            delta_ms.append((time.perf_counter() - start) * 1e3)
            engine.remove_task("loaded")
            start = time.perf_counter()
            model.load_adapter(adapter_dir, adapter_name=f"loaded{i}")
            lora_ms.append((time.perf_counter() - start) * 1e3)
            model.delete_adapter(f"loaded{i}")
        return {"delta_ms": {"median": statistics.median(delta_ms), "raw": delta_ms},
                "lora_ms": {"median": statistics.median(lora_ms), "raw": lora_ms},
                "delta_tensors": len(delta.sites) + 2, "delta_file_bytes": (tmp / "loaded.safetensors").stat().st_size}


def plot(args, results: dict, latency: dict, loading: dict) -> None:
    fig, (a, b, c) = plotting.subplots(3, width=13)
    cases = list(results.values())
    x = range(len(cases))
    for v, off, label in (("hf_one_task", -0.27, "HF, one task"), ("engine", 0.0, "engine (BitFit tasks)"),
                          ("lora", 0.27, "PEFT LoRA mixed")):
        a.bar([i + off for i in x], [r[v]["seq_per_s"] for r in cases], 0.27, label=label)
    for i, r in enumerate(cases):
        a.annotate(f"{r['ratio_engine_over_lora']:.2f}x", (i, r["engine"]["seq_per_s"]), ha="center", va="bottom", fontsize=8)
    a.set_xticks(list(x), [f"{r['adapters']} tasks\nbatch {r['batch']}" for r in cases])
    a.set_ylabel("sequences / s (median)")
    a.legend(fontsize=8)
    a.set_title("mixed batches")
    names = ["hf_one_task", "engine", "lora"]
    b.bar(["HF", "engine", "LoRA"], [latency[n]["p50"] for n in names], color=["C0", "C1", "C2"], label="p50")
    b.scatter(["HF", "engine", "LoRA"], [latency[n]["p99"] for n in names], color="k", marker="_", s=400, label="p99")
    b.set_ylabel("ms")
    b.set_title("batch-1 latency")
    b.legend(fontsize=8)
    c.bar(["delta add_task", "PEFT load_adapter"], [loading["delta_ms"]["median"], loading["lora_ms"]["median"]],
          color=["C1", "C2"])
    c.set_ylabel("ms (median)")
    c.set_title("load one from disk")
    plotting.save_figure(fig, args, NAME, "engine vs PEFT LoRA")


if __name__ == "__main__":
    main()
