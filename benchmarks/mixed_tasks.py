"""Mixed-task overhead: the engine on batches mixing 1, 8, 64, 512 tasks vs the same engine on one task.

    python -m benchmarks.mixed_tasks                 # MiniLM, CPU fp32, 2 threads
    python -m benchmarks.mixed_tasks --model bert-base --batch-sizes 1,8,32 --reps 4 --suffix _bertbase
    python -m benchmarks.mixed_tasks --device cuda --dtype bf16 --suffix _gpu

One engine holds 512 random trained-like deltas (BitFit sites). For each batch size, the same
GLUE batches run with every sequence on one task (``1``: fused bias adds), on one task through
the per-row gather path (``1_gather``: isolates the gather from the mixing), and with rows drawn
round-robin from 8 / 64 / 512 tasks (so a batch holds min(k, batch) distinct tasks). All variants
interleaved; ratios are each variant's median throughput over ``1``'s, and the median of the
per-repetition ratios (``paired_ratio_vs_one_task``: every repetition runs all variants on the
same batch back to back, so it cancels the machine's slow spells).
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks import cli, glue, models, plotting, timing
from bitfit_serve.engine import Engine

NAME = "mixed_tasks"


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--tasks", default="8,64,512", help="distinct tasks the rows are drawn from")
    args = p.parse_args()
    cli.setup(args)
    load_before = cli.load_average()
    reps = args.reps or (2 if args.quick else 8)
    mixes = [2, 8] if args.quick else [int(x) for x in args.tasks.split(",")]
    batch_sizes = [1, 8] if args.quick else [int(x) for x in args.batch_sizes.split(",")]
    path = models.model_path(args.model)
    engine = Engine.from_pretrained(path, device=args.device, dtype=cli.torch_dtype(args.dtype))
    deltas = models.DeltaFactory(path)
    rows = [engine.add_task(deltas(f"task{i}", seed=i)).row for i in range(max(mixes))]
    texts = glue.tokenize(engine.base.tokenizer, glue.sample_texts(args.glue_dir, 2000, seed=args.seed))
    pad_id = engine.base.config.pad_token_id

    def runner(k: int | None, batches: list[glue.Batch]):
        """k tasks round-robin (None: one task through the per-row gather path)."""
        state = {"offset": 0}

        def call(batch: glue.Batch):
            b = batch.shape[0]
            if k is None:
                eb = replace(models.engine_batch(engine, batch, [rows[0]] * b), single_row=None)
            else:
                chosen = [rows[(state["offset"] + i) % k] for i in range(b)]
                state["offset"] = (state["offset"] + b) % k
                eb = models.engine_batch(engine, batch, chosen)
            return engine.forward(eb)

        return timing.cycling(call, batches)

    results = {}
    for b in batch_sizes:
        batches = glue.batches_of(texts, b, 4, pad_id, args.device, seed=args.seed + b)
        variants = {"1": runner(1, batches), "1_gather": runner(None, batches)}
        variants.update({str(k): runner(k, batches) for k in mixes})
        cpu: dict[str, list[float]] = {}
        times = timing.interleave(variants, reps=reps, device=args.device, cpu_out=cpu)
        case = {"batch_shapes": [x.shape for x in batches], **timing.summarize_variants(times, cpu, b)}
        for v in times:
            case[v]["distinct_tasks_per_batch"] = 1 if v in ("1", "1_gather") else min(int(v), b)
            case[v]["ratio_vs_one_task"] = case[v]["seq_per_s"] / case["1"]["seq_per_s"]
            case[v]["cpu_ratio_vs_one_task"] = case["1"]["cpu_median_s"] / case[v]["cpu_median_s"]
            case[v]["paired_ratio_vs_one_task"] = timing.paired_ratio(times["1"], times[v])
        results[f"b{b}"] = case
        print(f"batch {b:4d}: " + "  ".join(f"{v}: {case[v]['seq_per_s']:.1f} seq/s ({case[v]['ratio_vs_one_task']:.3f}x, "
                                           f"paired {case[v]['paired_ratio_vs_one_task']:.3f}x)"
                                           for v in times))

    cli.write_result(args, NAME, {"model": str(path), "resident_tasks": len(rows), "cases": results}, load_before)
    plot(args, results)


def plot(args, results: dict) -> None:
    variants = [v for v in next(iter(results.values())) if v != "batch_shapes"]
    fig, (a, b) = plotting.subplots(2)
    x = list(range(len(results)))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        offs = [i - 0.4 + width * (j + 0.5) for i in x]
        a.bar(offs, [results[c][v]["seq_per_s"] for c in results], width, label=f"{v} task(s)")
        b.bar(offs, [results[c][v]["ratio_vs_one_task"] for c in results], width, label=f"{v} task(s)")
    for ax in (a, b):
        ax.set_xticks(x, list(results))
        ax.set_xlabel("batch size")
    a.set_ylabel("sequences / s (median)")
    a.set_yscale("log")
    b.set_ylabel("throughput / one-task throughput")
    b.axhline(1.0, color="k", lw=0.8)
    b.axhline(0.98, color="r", lw=0.8, ls="--", label="target 0.98x")
    b.set_ylim(0.8, 1.1)
    b.legend(fontsize=7, ncol=2)
    plotting.save_figure(fig, args, NAME, "mixed-task overhead")


if __name__ == "__main__":
    main()
