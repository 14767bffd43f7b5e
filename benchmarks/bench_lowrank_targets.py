"""Low-rank targets of issue 13: sequential calibration + truncation-aware refit + distillation healing.

Every attention and MLP projection of every block is a target; the global budget
(``target_params_ratio``, Fisher allocation over all of them, layers may stay dense) sets
the ranks on the original model's statistics. A row is one "fewer parameters" fraction
and one configuration:

- ``full``           ``activation_svd`` with ``sequential: true`` (refit on) + distillation healing
                     (``loss: logits`` for decoders, ``hidden`` for encoders) within ``--heal-minutes`` CPU;
- ``no_sequential``  plain SVD-LLM (statistics of the original model; no refit possible) + the same healing;
- ``no_refit``       sequential, ``refit: false`` + the same healing;
- ``no_distill``     sequential + refit, healed with the plain LM loss (decoders) in the same CPU budget;
- ``dense_lm``       control (FEWER must be 0): the uncompressed model, every parameter trained with the
                     plain LM loss in the same CPU budget. The healing windows are WikiText-2 text, so LM healing also adapts the
                     model to the evaluation's domain; this row measures how much of a gain is that.

Each row records the metric after compression and after healing, the CPU seconds of
calibration (statistics, sensitivities, decompositions: shared by the rows of one process
and counted in full in each row), compression and healing, the layer allocation (kept
fraction per projection type, dense layers), and writes the JSON after every row.

SmolLM2-135M: WikiText-2 raw test perplexity, 8 windows of 512 tokens, stride 512 (the windows
of ``bench_adaptive_rank.py``: original 30.37); calibration: the first ``--cal-samples`` windows of
``--cal-seq`` tokens of WikiText-2 valid; healing: the next windows of the same text (fresh).
MiniLM: STS-B dev Spearman x100 (1,500 pairs).

    python benchmarks/bench_lowrank_targets.py --model smollm2 --rows 0.2:full 0.3:full --out benchmarks/results/lowrank_targets_a.json
    python benchmarks/bench_lowrank_targets.py --latency-from /tmp/lowrank_models --out benchmarks/results/lowrank_latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OPTIMUM_LOWRANK_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {
    "smollm2": ["re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj"],
    "minilm": ["re:encoder\\.layer\\.\\d+\\..*(query|key|value|dense)"],
}
CONFIGS = ("full", "no_sequential", "no_refit", "no_distill", "dense_lm")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def allocation(reports) -> dict:
    """Kept parameter fraction per projection type and the layers left dense."""
    by_type: dict[str, list[int]] = {}
    for r in reports:
        kind = re.sub(r"^.*?\.\d+\.", "", r.name)  # the name inside the block: self_attn.q_proj, attention.output.dense
        before_after = by_type.setdefault(kind, [0, 0])
        before_after[0] += r.params_before
        before_after[1] += r.params_after
    before = sum(r.params_before for r in reports)
    after = sum(r.params_after for r in reports)
    if not reports:  # the dense_lm control: nothing compressed
        return {"params_ratio": 1.0, "dense_layers": "all"}
    return {
        "params_before": before,
        "params_after": after,
        "params_ratio": round(after / before, 4),
        "kept_by_type": {k: round(v[1] / v[0], 3) for k, v in sorted(by_type.items())},
        "dense_layers": [r.name for r in reports if r.action != "factorized"],
        "ranks": {r.name: r.rank for r in reports},
        "refit_kept": sum(1 for r in reports if r.metrics.get("refit") == 1.0),
        "mean_output_error": round(sum(r.metrics.get("relative_output_error", 0) for r in reports) / max(1, len(reports)), 4),
        "mean_truncation_error": round(sum(r.metrics.get("truncation_output_error", r.metrics.get("relative_output_error", 0)) for r in reports)
                                       / max(1, len(reports)), 4),
    }


def run(args) -> dict:
    import torch

    from optimum_lowrank.api import PassContext, resolve_targets
    from optimum_lowrank.data import load_sts_pairs, load_text, token_windows
    from optimum_lowrank.evaluation import PerplexityEvaluator, STSBEvaluator
    from optimum_lowrank.finetune import finetune
    from optimum_lowrank.models import load_model
    from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
    from optimum_lowrank.passes.linear.calibration import collect_input_statistics, collect_output_sensitivity

    loaded = load_model(args.model)
    model, tok, kind = loaded.model, loaded.tokenizer, loaded.kind
    if kind == "decoder":
        torch.set_flush_denormal(True)
    patterns = TARGETS[args.model]
    cal_text, cal_desc = load_text(DATA / "wikitext-2" / "wiki.valid.tokens")
    seq = args.cal_seq if kind == "decoder" else args.cal_seq_encoder
    all_ids = token_windows(tok, cal_text, seq, args.cal_samples + args.heal_windows)
    cal_ids, heal_ids = all_ids[: args.cal_samples], all_ids[args.cal_samples :]
    context = PassContext(kind=kind, tokenizer=tok, calibration_loader=lambda: cal_ids, seed=0)
    if kind == "decoder":
        test_text, test_desc = load_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
        evaluator = PerplexityEvaluator(tok, test_text, seq_len=512, stride=512, max_windows=args.ppl_windows, text_description=test_desc)
    else:
        evaluator = STSBEvaluator(tok, load_sts_pairs(DATA / "stsb" / "sts-dev.tsv"), pairs_description="sts-dev.tsv")
    result = {
        "model": args.model, "metric": evaluator.metric, "evaluation": evaluator.description,
        "calibration": f"{cal_desc}: {cal_ids.shape[0]} windows of {seq} tokens",
        "healing_data": f"the next {heal_ids.shape[0]} windows of {seq} tokens of the same text",
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
        "load_average_start": os.getloadavg(), "rows": [],
    }
    result["original"] = evaluator.evaluate_torch(model)
    log(f"original {evaluator.metric} {result['original']:.4f}")
    targets = resolve_targets(model, tuple(patterns), (torch.nn.Linear,))

    cpu0, wall0 = cpu_s(), time.perf_counter()
    if all(spec.endswith(":dense_lm") for spec in args.rows):  # controls only: no calibration needed
        decomps = sensitivity = None
    else:
        stats = collect_input_statistics(model, targets, cal_ids, kind=kind, gram=True)
        sensitivity = collect_output_sensitivity(model, targets, cal_ids[: args.sens_samples], kind=kind)
        decomps = ActivationSVDPass(ActivationSVDConfig(targets=["x"], target_params_ratio=0.5)).decompose(targets, stats)
        del stats
    result["calibration_cpu_s"] = round(cpu_s() - cpu0, 1)
    result["calibration_wall_s"] = round(time.perf_counter() - wall0, 1)
    log(f"shared calibration: {result['calibration_cpu_s']:.0f} CPU s, {result['calibration_wall_s']:.0f} s wall")

    cache: dict = {}
    for spec in args.rows:
        fewer_s, config = spec.split(":")
        fewer = float(fewer_s)
        keep = round(1 - fewer, 6)
        if config not in CONFIGS:
            raise SystemExit(f"unknown row config {config!r}; allowed: {', '.join(CONFIGS)}")
        row: dict = {"fewer": fewer, "config": config, "calibration_cpu_s": 0.0 if config == "dense_lm" else result["calibration_cpu_s"]}
        sequential = config != "no_sequential"
        svd = None if config == "dense_lm" else ActivationSVDPass(ActivationSVDConfig(
            targets=patterns, target_params_ratio=keep, sequential=sequential, refit=(config != "no_refit") if sequential else None,
            refit_damping=args.refit_damping,
        ))
        key = (fewer, sequential, config != "no_refit")  # no_distill compresses as full does: reuse its compressed model
        if config == "dense_lm":
            if fewer != 0:
                raise SystemExit(f"row {spec!r}: dense_lm is the uncompressed control; write it as 0:dense_lm")
            m, reports = copy.deepcopy(model), []
            row["compress_cpu_s"] = row["compress_wall_s"] = 0.0
            row["metric_compressed"] = result["original"]
        elif key in cache:
            m, reports, row["compress_cpu_s"], row["compress_wall_s"], row["metric_compressed"] = cache.pop(key)
            m = copy.deepcopy(m)
            row["compression_reused"] = True
        else:
            cpu0, wall0 = cpu_s(), time.perf_counter()
            m = copy.deepcopy(model)
            m_targets = svd.select(m)
            ranks = svd._ranks(m_targets, decomps, sensitivity)
            if sequential:
                reports = svd.apply_sequential(m, m_targets, context, ranks)
            else:
                reports = svd.apply_decomposed(m, m_targets, decomps, sensitivity)
            row["compress_cpu_s"] = round(cpu_s() - cpu0, 1)
            row["compress_wall_s"] = round(time.perf_counter() - wall0, 1)
            row["metric_compressed"] = evaluator.evaluate_torch(m)
            if any(r.split(":")[0] == fewer_s and r.split(":")[1] in ("full", "no_distill") and r != spec for r in args.rows) and config in ("full", "no_distill"):
                cache[key] = (copy.deepcopy(m), reports, row["compress_cpu_s"], row["compress_wall_s"], row["metric_compressed"])
        row.update(allocation(reports))
        log(f"-{fewer:.0%} {config}: {evaluator.metric} {row['metric_compressed']:.4f} after compression "
            f"(params ratio {row['params_ratio']}, {row['compress_cpu_s']:.0f} CPU s)")
        used_min = (row["calibration_cpu_s"] + row["compress_cpu_s"]) / 60
        minutes = max(0.5, min(args.heal_minutes, args.row_budget_minutes - used_min - 0.5))
        loss = ("logits" if kind == "decoder" else "hidden") if config not in ("no_distill", "dense_lm") else "lm"
        if args.heal_minutes > 0:
            cpu0, wall0 = cpu_s(), time.perf_counter()
            ft = finetune(m, heal_ids, kind=kind, max_minutes=minutes, lr=args.heal_lr if kind == "decoder" else args.heal_lr_encoder,
                          batch_size=args.heal_batch, reference_model=model, loss=loss, seed=0, progress=False, eval_samples=2,
                          train="all" if config == "dense_lm" else "lowrank")
            row["heal_cpu_s"] = round(cpu_s() - cpu0, 1)
            row["heal_wall_s"] = round(time.perf_counter() - wall0, 1)
            row["heal"] = {k: v for k, v in ft.items() if k not in ("seconds",)}
            row["metric"] = evaluator.evaluate_torch(m)
        else:
            row["heal_cpu_s"], row["metric"] = 0.0, row["metric_compressed"]
        row["cpu_s"] = round(row["calibration_cpu_s"] + row["compress_cpu_s"] + row["heal_cpu_s"], 1)
        higher = kind != "decoder"
        row["change"] = round(row["metric"] - result["original"], 3) if higher else round(row["metric"] / result["original"] - 1, 4)
        row["load_average"] = os.getloadavg()
        log(f"-{fewer:.0%} {config}: {evaluator.metric} {row['metric']:.4f} after {row.get('heal', {}).get('steps', 0)} healing steps "
            f"({loss}), change {row['change']:+.4g}, {row['cpu_s']:.0f} CPU s in all")
        if args.save_models:
            Path(args.save_models).mkdir(parents=True, exist_ok=True)
            torch.save(m, Path(args.save_models) / f"{args.model}-{fewer_s}-{config}.pt")
        result["rows"].append(row)
        result["load_average_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        del m
    return result


def budget_models(loaded, args) -> dict:
    """SVD-LLM models with the Fisher budget's ranks at ``--latency-ratios`` (the ranks every row of that ratio has)."""
    import torch

    from optimum_lowrank.api import resolve_targets
    from optimum_lowrank.data import load_text, token_windows
    from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
    from optimum_lowrank.passes.linear.calibration import collect_input_statistics, collect_output_sensitivity

    model = loaded.model
    ids = token_windows(loaded.tokenizer, load_text(DATA / "wikitext-2" / "wiki.valid.tokens")[0], args.cal_seq, args.cal_samples)
    targets = resolve_targets(model, tuple(TARGETS["smollm2"]), (torch.nn.Linear,))
    stats = collect_input_statistics(model, targets, ids, kind="decoder", gram=True)
    sensitivity = collect_output_sensitivity(model, targets, ids[: args.sens_samples], kind="decoder")
    decomps = ActivationSVDPass(ActivationSVDConfig(targets=["x"], target_params_ratio=0.5)).decompose(targets, stats)
    out = {}
    for fewer in args.latency_ratios:
        svd = ActivationSVDPass(ActivationSVDConfig(targets=TARGETS["smollm2"], target_params_ratio=round(1 - fewer, 6)))
        m = copy.deepcopy(model)
        svd.apply_decomposed(m, svd.select(m), decomps, sensitivity)
        out[f"smollm2-{fewer:g}-budget"] = m.eval()
        log(f"built the -{fewer:.0%} budget model")
    return out


def latency(args) -> dict:
    """ORT decode tokens/s and prefill latency of the dense model and every saved model, fp32 and weight-only int8."""
    import numpy as np
    import torch

    from optimum_lowrank.exporters.latency import measure_decode, measure_latency
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb
    from optimum_lowrank.exporters.quantize import quantize_onnx
    from optimum_lowrank.models import load_model

    loaded = load_model("smollm2")
    models = {"dense": loaded.model}
    for path in sorted(Path(args.latency_from).glob("smollm2-*.pt")):
        models[path.stem] = torch.load(path, weights_only=False)
    if args.latency_ratios:  # the architecture (ranks) of the budget at these ratios; speed does not depend on the factors' values
        models.update(budget_models(loaded, args))
    prompt = np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, (1, args.prompt_tokens))
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.ort_threads,
                    "load_average_start": os.getloadavg(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for label, m in models.items():
            folder = Path(tmp) / label
            fp32 = export_onnx(m.eval(), folder, "text-generation-with-past")
            graphs[(label, "fp32")] = fp32
            graphs[(label, "weight_int8")] = quantize_onnx(fp32, folder / "model_quantized.onnx", "weight_int8")
            log(f"exported {label}")
        timings: dict = {key: {"decode": [], "prefill": []} for key in graphs}
        for _ in range(args.latency_rounds):  # round-robin: a change of load hits every graph alike
            for key, path in graphs.items():
                decode = measure_decode(path, prompt, args.new_tokens, threads=args.ort_threads)
                prefill = measure_latency(path, batch_size=1, seq_len=args.prompt_tokens, repeats=5, threads=args.ort_threads)
                timings[key]["decode"].append(decode.tokens_per_second)
                timings[key]["prefill"].append(prefill.median_ms)
        for (label, graph), t in timings.items():
            result["rows"].append({"model": label, "graph": graph, "size_mb": round(onnx_size_mb(graphs[(label, graph)]), 1),
                                   "decode_tokens_per_s": round(float(np.median(t["decode"])), 2),
                                   "prefill_ms": round(float(np.median(t["prefill"])), 1)})
    base = {r["graph"]: r for r in result["rows"] if r["model"] == "dense"}
    for r in result["rows"]:
        r["decode_speedup"] = round(r["decode_tokens_per_s"] / base[r["graph"]]["decode_tokens_per_s"], 3)
        r["prefill_speedup"] = round(base[r["graph"]]["prefill_ms"] / r["prefill_ms"], 3)
        log(f"{r['model']} {r['graph']}: {r['decode_tokens_per_s']} tok/s ({r['decode_speedup']}x), prefill {r['prefill_ms']} ms ({r['prefill_speedup']}x)")
    result["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(paths: list[Path]) -> str:
    """A markdown table of the rows of the given result files."""
    lines = ["| model | fewer | config | params ratio | dense layers | after compression | healed | change | heal steps | CPU s (calib + compress + heal) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in paths:
        result = json.loads(Path(path).read_text())
        for r in result.get("rows", []):
            if "fewer" not in r:
                continue
            change = f"{r['change']:+.1%}" if result["metric"] == "perplexity" else f"{r['change']:+.2f}"
            lines.append(f"| {result['model']} | {r['fewer']:.0%} | {r['config']} | {r['params_ratio']:.4f} | {len(r['dense_layers'])} | "
                         f"{r['metric_compressed']:.2f} | {r['metric']:.2f} | {change} | {r.get('heal', {}).get('steps', 0)} | "
                         f"{r['cpu_s']:.0f} ({r['calibration_cpu_s']:.0f} + {r['compress_cpu_s']:.0f} + {r['heal_cpu_s']:.0f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(TARGETS))
    parser.add_argument("--rows", nargs="+", default=["0.2:full"], help="FEWER:CONFIG, CONFIG in " + ", ".join(CONFIGS))
    parser.add_argument("--cal-samples", type=int, default=32)
    parser.add_argument("--cal-seq", type=int, default=256)
    parser.add_argument("--cal-seq-encoder", type=int, default=128)
    parser.add_argument("--sens-samples", type=int, default=8)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--refit-damping", type=float, default=0.01)
    parser.add_argument("--heal-minutes", type=float, default=10.0, help="CPU minutes of healing (capped by the row budget)")
    parser.add_argument("--row-budget-minutes", type=float, default=20.0, help="CPU minutes of calibration + compression + healing")
    parser.add_argument("--heal-windows", type=int, default=600)
    parser.add_argument("--heal-lr", type=float, default=2e-4)
    parser.add_argument("--heal-lr-encoder", type=float, default=1e-4)
    parser.add_argument("--heal-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-models", default=None, help="folder to torch.save each healed model into (for --latency-from)")
    parser.add_argument("--latency-from", default=None, help="latency mode: the folder of saved models")
    parser.add_argument("--latency-ratios", nargs="*", type=float, default=[], help="latency mode: also time the budget's architecture at these ratios")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--ort-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "lowrank_targets.json")
    parser.add_argument("--table", nargs="+", type=Path, default=None, help="print a markdown table of these result files and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return

    import torch

    torch.set_num_threads(args.threads)
    if args.latency_from:
        latency(args)
    else:
        run(args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
