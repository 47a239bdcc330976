"""Engine vs plain Hugging Face: one task, same batches, same dtype and threads.

    python -m benchmarks.vs_hf                       # MiniLM, CPU fp32, 2 threads
    python -m benchmarks.vs_hf --model bert-base --suffix _bertbase --reps 5
    python -m benchmarks.vs_hf --device cuda --dtype bf16 --suffix _gpu

Baseline: ``AutoModelForSequenceClassification`` holding the task's values (its biases and head
copied in), ``eval()`` + ``inference_mode``. Engine: ``Engine.forward`` on the same padded
tensors with the task's bank row. Cases, each interleaved round-robin:

* ``fixed_32x128``: 32 sequences of exactly 128 tokens of real text (the reference shape), also
  giving the fraction of the measured matmul rate each side reaches (MFU); the rate comes from a
  GEMM probe (one layer's projection matmuls at 4096 tokens) timed interleaved with the forwards,
  so it sees the same load from other processes;
* ``glue_b{1,8,32,128}``: random GLUE dev inputs at their real length mix, padded per batch;
* ``latency_b1``: one GLUE input per call, p50/p99 over many calls.
"""

from __future__ import annotations

import torch

from benchmarks import cli, glue, models, plotting, timing
from bitfit_serve.engine import Engine

NAME = "vs_hf"


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--latency-calls", type=int, default=200)
    args = p.parse_args()
    cli.setup(args)
    load_before = cli.load_average()
    reps = args.reps or (2 if args.quick else 12)
    calls = 6 if args.quick else args.latency_calls
    dtype = cli.torch_dtype(args.dtype)
    path = models.model_path(args.model)

    deltas = models.DeltaFactory(path)
    delta = deltas("task0", seed=1)
    engine = Engine.from_pretrained(path, device=args.device, dtype=dtype)
    row = engine.add_task(delta).row
    hf = models.hf_classifier(path, delta.num_labels, dtype, args.device)
    models.load_delta_into(hf, delta)
    pad_id = engine.base.config.pad_token_id
    tokenizer = engine.base.tokenizer

    def run_engine(batch: glue.Batch):
        return engine.forward(models.engine_batch(engine, batch, [row] * batch.shape[0]))

    @torch.inference_mode()
    def run_hf(batch: glue.Batch):
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  token_type_ids=batch.token_type_ids).logits.float().cpu()

    texts = glue.tokenize(tokenizer, glue.sample_texts(args.glue_dir, 2000, seed=args.seed))
    length = 32 if args.quick else 128
    fixed = [glue.pad(glue.packed_texts(tokenizer, args.glue_dir, 32, length), pad_id, args.device)]
    cases = {f"fixed_32x{length}": fixed}
    for b in [1, 8] if args.quick else [int(x) for x in args.batch_sizes.split(",")]:
        cases[f"glue_b{b}"] = glue.batches_of(texts, b, 4, pad_id, args.device, seed=args.seed + b)

    # Same task, same inputs: the two must agree, or the comparison is between different work.
    diff = float((run_engine(fixed[0]) - run_hf(fixed[0])).abs().max())
    print(f"max |engine - HF| logits on {fixed[0].shape}: {diff:.2e}")

    probe, probe_flops = timing.gemm_probe(engine.base.config, 32 * length, args.device, dtype)
    results = {}
    for case, batches in cases.items():
        variants = {"engine": timing.cycling(run_engine, batches), "hf": timing.cycling(run_hf, batches)}
        if case.startswith("fixed"):
            variants["gemm_probe"] = probe  # the matmul rate, under the same load as the forwards
        cpu: dict[str, list[float]] = {}
        times = timing.interleave(variants, reps=reps, device=args.device, cpu_out=cpu)
        probe_times = times.pop("gemm_probe", None)
        cpu.pop("gemm_probe", None)
        seqs = batches[0].shape[0]
        results[case] = summarize(times, cpu, seqs, [b.shape for b in batches])
        if probe_times:
            results[case]["gemm_probe"] = {"median_s": timing.stats(probe_times)["median"], "raw_s": probe_times,
                                           "flops": probe_flops}
        print(f"{case:14s} engine {results[case]['engine']['seq_per_s']:8.1f} seq/s  "
              f"hf {results[case]['hf']['seq_per_s']:8.1f} seq/s  ratio {results[case]['ratio_engine_over_hf']:.3f}")

    one = glue.batches_of(texts, 1, calls, pad_id, args.device, seed=args.seed + 7)
    cpu = {}
    times = timing.interleave({"engine": timing.cycling(run_engine, one), "hf": timing.cycling(run_hf, one)},
                              reps=calls, warmup=3, device=args.device, cpu_out=cpu)
    latency = {v: {k: x * 1e3 for k, x in timing.stats(t).items() if k != "n"} for v, t in times.items()}
    latency["ratio_p50_engine_over_hf"] = latency["engine"]["p50"] / latency["hf"]["p50"]
    latency["ratio_p99_engine_over_hf"] = latency["engine"]["p99"] / latency["hf"]["p99"]
    latency["raw_s"] = times
    latency["cpu_median_ms"] = {v: timing.stats(c)["median"] * 1e3 for v, c in cpu.items()}
    latency["cpu_raw_s"] = cpu
    print(f"latency b1 p50 engine {latency['engine']['p50']:.2f} ms  hf {latency['hf']['p50']:.2f} ms  "
          f"p99 engine {latency['engine']['p99']:.2f} ms  hf {latency['hf']['p99']:.2f} ms")

    # Two denominators: the GEMM probe timed interleaved with the forwards (the forward's own mix of
    # matmul shapes, same contention: the headline figure) and the fastest of a few single matmul
    # shapes timed on their own afterwards (a different mix: not the same probe alone).
    peak = timing.matmul_rate(args.device, dtype, reps=3 if args.quick else 20, rows=256 if args.quick else 4096)
    flops = timing.forward_flops(engine.base.config, 32, length)
    fixed_case = results[f"fixed_32x{length}"]
    peak["interleaved_probe_flops_per_s"] = probe_flops / fixed_case["gemm_probe"]["median_s"]
    mfu = {v: flops / fixed_case[v]["median_s"] / peak["interleaved_probe_flops_per_s"] for v in ("engine", "hf")}
    mfu_standalone = {v: flops / fixed_case[v]["median_s"] / peak["flops_per_s"] for v in ("engine", "hf")}
    print(f"matmul rate {peak['interleaved_probe_flops_per_s'] / 1e9:.1f} GFLOP/s interleaved "
          f"(fastest single shape alone {peak['flops_per_s'] / 1e9:.1f}); forward {flops / 1e9:.1f} GFLOP; "
          f"fraction of it: engine {mfu['engine']:.3f}  hf {mfu['hf']:.3f}")

    cli.write_result(args, NAME, {
        "model": str(path), "max_abs_logit_diff": diff, "cases": results, "latency_b1_ms": latency,
        "matmul_rate": peak, "forward_flops_32xT": flops, "fraction_of_matmul_rate": mfu,
        "fraction_of_standalone_matmul_rate": mfu_standalone,
    }, load_before)
    plot(args, results, latency)


def summarize(times: dict[str, list[float]], cpu: dict[str, list[float]], seqs: int, shapes: list) -> dict:
    out = {"batch_shapes": shapes, **timing.summarize_variants(times, cpu, seqs)}
    out["ratio_engine_over_hf"] = out["engine"]["seq_per_s"] / out["hf"]["seq_per_s"]
    out["paired_ratio_engine_over_hf"] = timing.paired_ratio(times["hf"], times["engine"])
    out["cpu_ratio_engine_over_hf"] = out["hf"]["cpu_median_s"] / out["engine"]["cpu_median_s"]
    return out


def plot(args, results: dict, latency: dict) -> None:
    fig, (a, b) = plotting.subplots(2)
    cases = list(results)
    x = range(len(cases))
    a.bar([i - 0.2 for i in x], [results[c]["hf"]["seq_per_s"] for c in cases], 0.4, label="HF per task")
    a.bar([i + 0.2 for i in x], [results[c]["engine"]["seq_per_s"] for c in cases], 0.4, label="engine")
    for i, c in enumerate(cases):
        a.annotate(f"{results[c]['ratio_engine_over_hf']:.2f}x", (i, results[c]["engine"]["seq_per_s"]),
                   ha="center", va="bottom", fontsize=8)
    a.set_xticks(list(x), cases, rotation=20, fontsize=8)
    a.set_ylabel("sequences / s (median)")
    a.set_title("throughput, one task")
    a.legend()
    b.bar(["HF p50", "engine p50", "HF p99", "engine p99"],
          [latency["hf"]["p50"], latency["engine"]["p50"], latency["hf"]["p99"], latency["engine"]["p99"]],
          color=["C0", "C1", "C0", "C1"])
    b.set_ylabel("ms")
    b.set_title("batch-1 latency (GLUE inputs)")
    plotting.save_figure(fig, args, NAME, "engine vs plain HF")


if __name__ == "__main__":
    main()
