"""Benchmark of usage-aware embedding compression (row weighting, hybrid tables, refinement).

For MiniLM (STS-B dev Spearman x100, cosine of mean-pooled embeddings, all 1,500
pairs) and SmolLM2-135M (WikiText-2 raw *test* perplexity, ``--windows`` windows of
512 tokens, stride 512, BOS), at embedding compression ratios 5, 10 and 20:

- each method (``svd``, ``autoencoder``, ``tt`` (per-token MPS), ``tt_matrix``,
  ``fourier``) with ``row_weighting: none`` and ``frequency``;
- hybrid tables (``keep_top_k``) on the weighted ``svd`` and ``autoencoder``;
- output-aware refinement (``refine:``) of the best hybrid configuration.

Calibration (token counts, refinement windows) is WikiText-2 *valid*
(``wiki.valid.tokens``), a different file from both evaluation sets. Each row
records the options, the whole-layer compression ratio (exact rows and the hybrid
index included), pass seconds, whole-model parameters, the row cosine (mean over
rows and over calibration tokens), the share of calibration tokens with exact
rows, the metric, and (``--onnx``) the int8 ONNX size (ORT dynamic int8 for MiniLM,
weight-only int8 for SmolLM2).

Usage
-----
    .venv/bin/python benchmarks/bench_usage_aware.py                       # the default grid, both models
    .venv/bin/python benchmarks/bench_usage_aware.py --models minilm --ratios 10 --methods svd --keep-top-k 500 1000
    .venv/bin/python benchmarks/bench_usage_aware.py --models minilm --only "svd:10:frequency:1000:200"

``--only METHOD:RATIO:WEIGHTING:KEEP_TOP_K:REFINE_STEPS`` (repeatable) runs exactly
those configurations. Results: ``benchmarks/results/usage_aware.json`` (rewritten after
every configuration; ``--merge`` keeps the rows of configurations not run now).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embeddings import forward_ms  # noqa: E402

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import LowRankError
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.recipe import load_recipe

DATA = ROOT.parent / "shared" / "data"
CALIBRATION = DATA / "wikitext-2" / "wiki.valid.tokens"
STSB = DATA / "stsb" / "sts-dev.tsv"
WIKITEXT_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = ROOT / "benchmarks" / "results" / "usage_aware.json"

METHODS = {
    "svd": ("svd", {}),
    "autoencoder": ("autoencoder_embedding", {"progress": False}),
    "tt": ("tt_embedding", {"mode": "tt", "progress": False}),
    "tt_matrix": ("tt_embedding", {"mode": "tt_matrix", "epochs": 15, "anneal_epochs": 10, "lr_step": 2, "progress": False}),
    "fourier": ("fourier_embedding", {"epochs": 3, "anneal_epochs": 2, "lr_step": 1, "progress": False}),
}
MODELS = {
    "minilm": {"target": "embeddings.word_embeddings", "kind": "encoder", "seq_len": 128},
    "smollm2": {"target": "model.embed_tokens", "kind": "decoder", "seq_len": 256},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=list(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[5, 10, 20])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--smollm2-methods", nargs="+", default=["svd", "autoencoder"], choices=list(METHODS),
                        help="tt and Fourier destroy SmolLM2 at every ratio (docs/embeddings.md) and rebuild the table per call")
    parser.add_argument("--weightings", nargs="+", default=["none", "frequency"], choices=["none", "frequency"])
    parser.add_argument("--exponent", type=float, default=1.0, help="weight_exponent of the weighted rows")
    parser.add_argument("--keep-top-k", nargs="*", type=int, default=[500, 1000, 2000], help="hybrid table sizes")
    parser.add_argument("--hybrid-methods", nargs="*", default=["svd", "autoencoder"], choices=list(METHODS))
    parser.add_argument("--refine-steps", type=int, default=300, help="refinement steps of the best hybrid per ratio (0: none)")
    parser.add_argument("--refine-lr", type=float, default=1e-3)
    parser.add_argument("--refine-batch", type=int, default=4)
    parser.add_argument("--refine-seq-len", type=int, default=None, help="cut the calibration windows to this length for refinement")
    parser.add_argument("--cal-samples", type=int, default=256, help="calibration windows (refinement; counts use the whole file)")
    parser.add_argument("--calibration", default=str(CALIBRATION), help="calibration text source (optimum_lowrank.data.load_text syntax)")
    parser.add_argument("--only", action="append", default=[], help="METHOD:RATIO:WEIGHTING:KEEP_TOP_K:REFINE_STEPS")
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 perplexity windows of 512 tokens")
    parser.add_argument("--stsb-pairs", type=int, default=None)
    parser.add_argument("--onnx", action="store_true", help="also export and quantize every row (int8 MB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=60.0, help="minutes; later configurations are skipped")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true")
    return parser.parse_args(argv)


def grid(args: argparse.Namespace, model: str) -> list[tuple[str, float, str, int, int]]:
    """(method, ratio, weighting, keep_top_k, refine_steps) in run order; refinement rows are added later."""
    if args.only:
        out = []
        for spec in args.only:
            method, ratio, weighting, keep, steps = spec.split(":")
            out.append((method, float(ratio), weighting, int(keep), int(steps)))
        return out
    methods = args.methods if model == "minilm" else [m for m in args.methods if m in args.smollm2_methods]
    configs = []
    for ratio in args.ratios:
        configs += [(method, ratio, weighting, 0, 0) for method in methods for weighting in args.weightings]
        configs += [(method, ratio, "frequency", k, 0) for method in args.hybrid_methods if method in methods for k in args.keep_top_k]
    return configs


def build_context(loaded, kind: str, seq_len: int, num_samples: int, calibration: str = str(CALIBRATION)) -> PassContext:
    from optimum_lowrank.data import load_text, token_windows
    from optimum_lowrank.vocab import token_counts

    text, source = load_text(calibration)
    windows = token_windows(loaded.tokenizer, text, seq_len, num_samples, add_bos=kind == "decoder")
    return PassContext(
        kind=kind, tokenizer=loaded.tokenizer, seed=0,
        calibration_loader=lambda: windows,
        calibration_description=f"{source}, {windows.shape[0]} windows of {seq_len} tokens",
        token_counts_loader=lambda: token_counts(loaded.tokenizer, text, source),
    )


def int8_mb(model: torch.nn.Module, kind: str) -> float:
    import tempfile

    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
    from optimum_lowrank.exporters.quantize import quantize_onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "onnx", onnx_task(model), validate=False)
        mode = "dynamic_int8" if kind == "encoder" else "weight_int8"
        return onnx_size_mb(quantize_onnx(fp32, Path(tmp) / "onnx" / "model_quantized.onnx", mode))


def run_config(model, spec, context, evaluator, metric, config, args) -> dict:
    method, ratio, weighting, keep, steps = config
    pass_id, extra = METHODS[method]
    options = {"targets": [spec["target"]], "compression_ratio": ratio, "row_weighting": weighting, **extra}
    if weighting == "frequency":
        options["weight_exponent"] = args.exponent
    if keep:
        options["keep_top_k"] = keep
    if steps:
        options["refine"] = {"steps": steps, "lr": args.refine_lr, "batch_size": args.refine_batch, "progress": False}
        if args.refine_seq_len:
            options["refine"]["seq_len"] = args.refine_seq_len
    row: dict = {"method": method, "ratio": ratio, "weighting": weighting, "keep_top_k": keep, "refine_steps": steps, "options": options}
    start = time.perf_counter()
    try:
        recipe = load_recipe({"version": 1, "passes": [{"pass": pass_id, **options}]})
        compressed, reports = apply_passes(model, recipe, context)
    except LowRankError as err:
        row["error"] = str(err)
        return row
    row["pass_seconds"] = time.perf_counter() - start
    layer = reports[0].layers[0]
    row.update(
        rank=layer.rank, note=layer.note, embedding_params=layer.params_after,
        achieved_ratio=layer.params_before / layer.params_after, params=count_parameters(compressed),
        layer_metrics=layer.metrics,
    )
    row[metric] = evaluator.evaluate_torch(compressed)
    if spec["kind"] == "decoder":
        row["forward_ms"] = forward_ms(compressed, layer.params_before // compressed.config.hidden_size)
    if args.onnx:
        row["int8_onnx_mb"] = int8_mb(compressed, spec["kind"])
    return row


def label(config) -> str:
    method, ratio, weighting, keep, steps = config
    return f"{method}@{ratio:g} {weighting}" + (f" top{keep}" if keep else "") + (f" refine{steps}" if steps else "")


def describe(row: dict, metric: str) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    m = row["layer_metrics"]
    return (
        f"{metric} {row[metric]:.3f}  ratio {row['achieved_ratio']:.2f}  row cos {m['mean_cosine']:.3f} "
        f"token cos {m.get('token_weighted_cosine', float('nan')):.3f}  exact share {m.get('exact_token_share', 0):.3f}  "
        f"{row['pass_seconds']:.1f} s" + (f"  int8 {row['int8_onnx_mb']:.1f} MB" if "int8_onnx_mb" in row else "")
    )


def best_hybrid(rows: list[dict], ratio: float, metric: str) -> tuple | None:
    """The unrefined row at ``ratio`` with the best metric (ties: the larger ``keep_top_k``), as a config tuple."""
    candidates = [r for r in rows if r["ratio"] == ratio and not r["refine_steps"] and metric in r]
    if not candidates:
        return None
    better = max if metric == "stsb_spearman" else min
    row = better(sorted(candidates, key=lambda r: -r["keep_top_k"]), key=lambda r: r[metric])
    return row["method"], row["ratio"], row["weighting"], row["keep_top_k"]


def run_model(name: str, args: argparse.Namespace, results: dict, save, deadline: float) -> None:
    from optimum_lowrank.data import load_sts_pairs, load_text
    from optimum_lowrank.evaluation import PerplexityEvaluator, STSBEvaluator
    from optimum_lowrank.models import load_model

    spec = MODELS[name]
    loaded = load_model(name)
    model = loaded.model
    context = build_context(loaded, spec["kind"], spec["seq_len"], args.cal_samples, args.calibration)
    if spec["kind"] == "encoder":
        evaluator = STSBEvaluator(loaded.tokenizer, load_sts_pairs(STSB), max_pairs=args.stsb_pairs, threads=args.threads)
        metric = "stsb_spearman"
    else:
        text, _ = load_text(WIKITEXT_TEST)
        evaluator = PerplexityEvaluator(loaded.tokenizer, text, seq_len=512, stride=512, max_windows=args.windows, threads=args.threads)
        metric = "perplexity"
    section = results.setdefault(name, {"rows": []})
    section.update(metric=metric, evaluation=evaluator.description, calibration=context.calibration_description)
    counts = context.token_counts(model.get_submodule(spec["target"]).weight.shape[0])
    section["calibration_tokens"] = counts.total
    if "baseline" not in section:
        section["baseline"] = {"params": count_parameters(model), metric: evaluator.evaluate_torch(model)}
        if args.onnx:
            section["baseline"]["int8_onnx_mb"] = int8_mb(model, spec["kind"])
    save()
    print(f"\n[{name}] original {metric} {section['baseline'][metric]:.3f}; calibration {counts.total:,} tokens", flush=True)

    def run(config) -> None:
        key = label(config)
        if time.perf_counter() > deadline:
            section.setdefault("skipped", []).append(key)
            print(f"[{name}] {key}: skipped (time budget)", flush=True)
            return
        t0 = time.perf_counter()
        row = run_config(model, spec, context, evaluator, metric, config, args)
        row["wall_seconds"] = time.perf_counter() - t0
        section["rows"] = [r for r in section["rows"] if label((r["method"], r["ratio"], r["weighting"], r["keep_top_k"], r["refine_steps"])) != key]
        section["rows"].append(row)
        save()
        print(f"[{name}] {key}: {describe(row, metric)}", flush=True)

    configs = grid(args, name)
    for config in configs:
        run(config)
    if args.refine_steps and not args.only:
        for ratio in args.ratios:
            best = best_hybrid(section["rows"], ratio, metric)
            if best is not None:
                run((*best, args.refine_steps))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    results: dict = {}
    if args.merge and args.out.is_file():
        results = json.loads(args.out.read_text(encoding="utf-8"))
    results["meta"] = {
        "command": "benchmarks/bench_usage_aware.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads, "torch": torch.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(), "calibration": args.calibration,
        "weight_exponent": args.exponent, "refine_lr": args.refine_lr, "refine_batch": args.refine_batch,
        "refine_seq_len": args.refine_seq_len,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")

    deadline = time.perf_counter() + args.time_budget * 60
    for name in args.models:
        run_model(name, args, results, save, deadline)
    print_table(results)
    return 0


def _order(row: dict) -> tuple:
    return row["ratio"], list(METHODS).index(row["method"]), row["weighting"] != "none", row["keep_top_k"], row["refine_steps"]


def print_table(results: dict) -> None:
    for name in MODELS:
        section = results.get(name)
        if not section:
            continue
        metric = section["metric"]
        print(f"\n{name}: {metric} (original {section['baseline'][metric]:.3f}), calibration {section['calibration']}")
        print(f"{'ratio':>5}  {'method':<12} {'weighting':<9} {'top_k':>5} {'refine':>6}  {'achieved':>8}  {metric:>13}  {'row cos':>7}  {'token cos':>9}  {'exact share':>11}  {'s':>6}")
        for r in sorted(section["rows"], key=_order):
            if "error" in r:
                print(f"{r['ratio']:>5g}  {r['method']:<12} {r['weighting']:<9} {r['keep_top_k']:>5} {r['refine_steps']:>6}  error: {r['error'][:80]}")
                continue
            m = r["layer_metrics"]
            print(
                f"{r['ratio']:>5g}  {r['method']:<12} {r['weighting']:<9} {r['keep_top_k']:>5} {r['refine_steps']:>6}  "
                f"{r['achieved_ratio']:>8.2f}  {r[metric]:>13.3f}  {m['mean_cosine']:>7.3f}  {m.get('token_weighted_cosine', float('nan')):>9.3f}  "
                f"{m.get('exact_token_share', 0):>11.3f}  {r['pass_seconds']:>6.1f}"
            )


def markdown(results: dict) -> str:
    """The results as markdown tables (for docs/usage_aware.md): ``python bench_usage_aware.py --markdown``."""
    lines = []
    for name in MODELS:
        section = results.get(name)
        if not section:
            continue
        metric = section["metric"]
        base = section["baseline"]
        lines += [
            f"**{name}** ({section['evaluation']}; original {base[metric]:.2f}"
            + (f", int8 ONNX {base['int8_onnx_mb']:.1f} MB" if "int8_onnx_mb" in base else "") + ")",
            "",
            f"| ratio | method | weighting | keep_top_k | refine steps | achieved ratio | {metric} | row cosine | row cosine per token | exact token share | pass s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(section["rows"], key=_order):
            head = f"| {r['ratio']:g} | {r['method']} | {r['weighting']} | {r['keep_top_k'] or '-'} | {r['refine_steps'] or '-'} |"
            if "error" in r:
                lines.append(f"{head} error: {r['error'][:120]} | | | | | |")
                continue
            m = r["layer_metrics"]
            value = f"{r[metric]:.2f}" if metric == "stsb_spearman" else f"{r[metric]:.4g}"
            steps = f" ({int(m['refine_steps'])} run)" if "refine_steps" in m else ""
            lines.append(
                f"{head[:-2]}{steps} | {r['achieved_ratio']:.2f} | {value} | {m['mean_cosine']:.3f} | "
                f"{m.get('token_weighted_cosine', float('nan')):.3f} | {m.get('exact_token_share', 0):.3f} | {r['pass_seconds']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--markdown" in sys.argv:  # --markdown [JSON ...]: tables of earlier runs (default: both models' results)
        files = [Path(f) for f in sys.argv[sys.argv.index("--markdown") + 1 :]] or [RESULTS, RESULTS.with_name("usage_aware_smollm2.json")]
        for file in files:
            print(markdown(json.loads(file.read_text(encoding="utf-8"))))
        raise SystemExit(0)
    raise SystemExit(main())
