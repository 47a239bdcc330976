"""Engine vs swapping each task's values into one HF model per sub-batch (the naive multi-task server).

    python -m benchmarks.vs_swap                     # MiniLM, CPU fp32, 2 threads
    python -m benchmarks.vs_swap --model bert-base --suffix _bertbase --reps 4
    python -m benchmarks.vs_swap --device cuda --dtype bf16 --suffix _gpu

Baseline ``swap``: one ``AutoModelForSequenceClassification``; a batch holding k tasks is split
into its k task groups; for each group the task's BitFit values and head are copied into the
model's parameters, then the group runs. ``engine``: the batch as the server runs it
(``Engine.forward_many``: one bank row per sequence, tasks mixed). ``hf_one_task`` (one model, the
whole batch, no swapping) is the single-task reference. Every variant gets the same length
planning (``Engine.plan``: sequences of very different lengths cut into length groups where
padding costs more than another forward, each group trimmed to its own longest sequence): the
engine over the whole batch, ``swap`` within each task group, ``hf_one_task`` over the whole
batch; so the ratios measure mixing against swapping, not padding. All interleaved round-robin
on the same batches, on two input sets (``--cases`` / ``--glue-cases``): k = 1, 2, 4, 8, 16, 32 (batch
32) and 64 (batch 64) on ``packed``, and k = 1, 4, 32 (batch 32) and 64 (batch 64) on ``glue``:

* ``packed``: sequences of exactly 128 tokens of real text (SST-2 sentences joined), so no
  sequence is padded and the comparison is the cost of mixing alone (the headline figure);
* ``glue``: GLUE dev inputs at their real length mix. ``engine_one_forward`` (the whole padded
  batch in one forward, no length groups) shows what length planning is worth on these inputs.
"""

from __future__ import annotations

import torch

from benchmarks import cli, glue, models, plotting, timing
from bitfit_serve.engine import Engine
from bitfit_serve.inputs import EncodedInput

NAME = "vs_swap"


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--cases", default="32:1,32:2,32:4,32:8,32:16,32:32,64:64",
                   help="batch:tasks pairs (a batch of B sequences spread round-robin over k tasks), packed inputs")
    p.add_argument("--glue-cases", default="32:1,32:4,32:32,64:64", help="the same, GLUE length mix")
    args = p.parse_args()
    cli.setup(args)
    load_before = cli.load_average()
    reps = args.reps or (2 if args.quick else 8)
    parse = lambda spec: [tuple(int(v) for v in c.split(":")) for c in spec.split(",")]  # noqa: E731
    cases = [("packed", b, k) for b, k in parse("8:1,8:8" if args.quick else args.cases)]
    cases += [("glue", b, k) for b, k in parse("8:8" if args.quick else args.glue_cases)]
    length = 32 if args.quick else 128
    dtype = cli.torch_dtype(args.dtype)
    path = models.model_path(args.model)

    factory = models.DeltaFactory(path)
    n_tasks = max(k for _, _, k in cases)
    deltas = [factory(f"task{i}", seed=i) for i in range(n_tasks)]
    engine = Engine.from_pretrained(path, device=args.device, dtype=dtype)
    rows = [engine.add_task(d).row for d in deltas]
    hf = models.hf_classifier(path, factory.num_labels, dtype, args.device)
    # Each task's values as tensors on the model's device and dtype, ready to copy in (no
    # conversion inside the timed loop: the baseline gets its best case).
    params = dict(hf.named_parameters())
    prefix = hf.base_model_prefix + "."
    staged = [[(params[prefix + n], v.to(device=args.device, dtype=dtype)) for n, v in d.sites.items()]
              + [(hf.classifier.weight, d.head_weight.to(args.device, dtype)),
                 (hf.classifier.bias, d.head_bias.to(args.device, dtype))] for d in deltas]
    pad_id = engine.base.config.pad_token_id

    def run_planned(batch: glue.Batch, idx: list[int], out: torch.Tensor) -> None:
        """HF on the rows ``idx`` of the batch, cut into length groups the way the engine cuts its
        batches (``Engine.plan``), each trimmed to its own longest sequence."""
        for group in engine.plan([batch.lengths[i] for i in idx], max_batch_size=len(idx)):
            members = [idx[j] for j in group]
            width = max(batch.lengths[i] for i in members)
            sel = torch.tensor(members, device=batch.input_ids.device)
            logits = hf(input_ids=batch.input_ids[sel, :width], attention_mask=batch.attention_mask[sel, :width],
                        token_type_ids=batch.token_type_ids[sel, :width]).logits
            out[members] = logits.float().cpu()

    @torch.inference_mode()
    def run_swap(batch: glue.Batch, tasks: list[int]) -> torch.Tensor:
        out = torch.empty(batch.shape[0], factory.num_labels)
        for t in sorted(set(tasks)):
            for param, value in staged[t]:
                param.copy_(value)
            run_planned(batch, [i for i, x in enumerate(tasks) if x == t], out)
        return out

    @torch.inference_mode()
    def run_hf(batch: glue.Batch) -> torch.Tensor:
        out = torch.empty(batch.shape[0], factory.num_labels)
        run_planned(batch, list(range(batch.shape[0])), out)
        return out

    def run_engine_one_forward(batch: glue.Batch, tasks: list[int]) -> torch.Tensor:
        return engine.forward(models.engine_batch(engine, batch, [rows[t] for t in tasks]))

    def run_engine(sequences: list[EncodedInput], tasks: list[int]) -> torch.Tensor:
        return engine.forward_many(sequences, [rows[t] for t in tasks], max_batch_size=len(sequences))

    def unpadded(batch: glue.Batch) -> list[EncodedInput]:
        """The batch's sequences without their padding: what the server's batcher holds."""
        return [EncodedInput(batch.input_ids[i, :n].tolist(), batch.token_type_ids[i, :n].tolist())
                for i, n in enumerate(batch.lengths)]

    texts = glue.tokenize(engine.base.tokenizer, glue.sample_texts(args.glue_dir, 2000, seed=args.seed))
    packed = glue.packed_texts(engine.base.tokenizer, args.glue_dir, 4 * max(b for _, b, _ in cases), length)
    results = {}
    for inputs, b, k in cases:
        if inputs == "packed":
            batches = [glue.pad(packed[i * b:(i + 1) * b], pad_id, args.device) for i in range(4)]
        else:
            batches = glue.batches_of(texts, b, 4, pad_id, args.device, seed=args.seed + b)
        tasks = [i % k for i in range(b)]
        sequences = [unpadded(x) for x in batches]
        # Same rows, same values: both must give the same logits, or they do different work.
        diff = float((run_engine(sequences[0], tasks) - run_swap(batches[0], tasks)).abs().max())
        variants = {
            "engine": timing.cycling(lambda x: run_engine(x, tasks), sequences),
            "swap": timing.cycling(lambda x: run_swap(x, tasks), batches),
            "hf_one_task": timing.cycling(run_hf, batches),
        }
        if inputs == "glue":
            variants["engine_one_forward"] = timing.cycling(lambda x: run_engine_one_forward(x, tasks), batches)
        cpu: dict[str, list[float]] = {}
        times = timing.interleave(variants, reps=reps, device=args.device, cpu_out=cpu)
        case = {"inputs": inputs, "batch": b, "tasks_per_batch": k, "max_abs_logit_diff_engine_vs_swap": diff,
                "batch_shapes": [x.shape for x in batches]}
        case.update(timing.summarize_variants(times, cpu, b))
        case["paired_ratio_engine_over_swap"] = timing.paired_ratio(times["swap"], times["engine"])
        case["cpu_ratio_engine_over_swap"] = case["swap"]["cpu_median_s"] / case["engine"]["cpu_median_s"]
        case["ratio_engine_over_swap"] = case["engine"]["seq_per_s"] / case["swap"]["seq_per_s"]
        case["ratio_engine_over_hf_one_task"] = case["engine"]["seq_per_s"] / case["hf_one_task"]["seq_per_s"]
        case["ratio_swap_over_hf_one_task"] = case["swap"]["seq_per_s"] / case["hf_one_task"]["seq_per_s"]
        results[f"{inputs}_b{b}_k{k}"] = case
        print(f"{inputs:6s} batch {b:3d} tasks {k:3d}: engine {case['engine']['seq_per_s']:7.1f}  swap {case['swap']['seq_per_s']:7.1f}"
              f"  hf(1 task) {case['hf_one_task']['seq_per_s']:7.1f} seq/s  engine/swap {case['ratio_engine_over_swap']:.2f}x"
              f"  swap/hf {case['ratio_swap_over_hf_one_task']:.2f}x  (|diff| {diff:.1e})")

    cli.write_result(args, NAME, {"model": str(path), "sites_per_task": len(deltas[0].sites),
                                  "cases": results}, load_before)
    plot(args, results)


def plot(args, results: dict) -> None:
    every = results
    results = {n: c for n, c in results.items() if c["inputs"] == "packed"}
    labels = [f"{c['tasks_per_batch']}\n(b{c['batch']})" for c in results.values()]
    x = range(len(labels))
    fig, (a, b) = plotting.subplots(2)
    for v, off in (("hf_one_task", -0.27), ("engine", 0.0), ("swap", 0.27)):
        a.bar([i + off for i in x], [c[v]["seq_per_s"] for c in results.values()], 0.27,
              label={"hf_one_task": "HF, one task (ceiling)", "engine": "engine, mixed", "swap": "swap per sub-batch"}[v])
    a.set_xticks(list(x), labels)
    a.set_xlabel("distinct tasks per batch")
    a.set_ylabel("sequences / s (median)")
    a.legend(fontsize=8)
    for inputs, marker in (("packed", "o-"), ("glue", "s--")):
        cases = [c for c in every.values() if c["inputs"] == inputs]
        ks = [c["tasks_per_batch"] for c in cases]
        b.plot(ks, [c["ratio_engine_over_swap"] for c in cases], marker, label=f"engine / swap, {inputs} inputs")
        b.plot(ks, [c["ratio_engine_over_hf_one_task"] for c in cases], marker, alpha=0.5,
               label=f"engine / HF one task, {inputs} inputs")
    b.axhline(1.3, color="r", lw=0.8, ls="--", label="target 1.3x (32 tasks)")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xscale("log", base=2)
    b.set_xlabel("distinct tasks per batch")
    b.set_ylabel("throughput ratio")
    b.legend(fontsize=8)
    plotting.save_figure(fig, args, NAME, "engine vs swap-per-sub-batch, left: unpadded real text", fontsize=10)


if __name__ == "__main__":
    main()
