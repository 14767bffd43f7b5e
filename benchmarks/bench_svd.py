"""Baseline benchmark: what optimize() with plain truncated SVD gives on the real models, against what
a user gets without this project (Optimum export + ONNX Runtime int8), all in one run.

For each model: the original exported to ONNX fp32 and quantized (``passes: []``), then SVD of
every linear layer in the transformer blocks at a few per-layer compression ratios, each exported
fp32 and quantized. Per row: whole-model parameters, ONNX file size, accuracy (torch / ONNX fp32 /
ONNX quantized), ORT CPU latency (median), compression time. Latency ratios are against the
original fp32 graph of the same run.

    python benchmarks/bench_svd.py                       # both models
    python benchmarks/bench_svd.py --models minilm --ratios 1.5 2

Writes ``benchmarks/results/svd.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

MODELS = {
    "minilm": {
        "targets": ["re:encoder\\.layer\\.\\d+\\..*(query|key|value|dense)"],
        "accuracy": {"metric": "stsb_spearman", "data": str(DATA / "stsb" / "sts-dev.tsv"), "max_drop": 100},
        "quantize": ["dynamic_int8"],
    },
    "smollm2": {
        "targets": ["re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj"],
        "accuracy": {"metric": "perplexity", "data": str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "max_increase": 100},
        # dynamic int8 is what a user would try first; weight-only int8 is what keeps a small Llama's accuracy
        "quantize": ["dynamic_int8", "weight_int8"],
    },
}


def run(model: str, ratios: list[float], windows: int, repeats: int, out_root: Path, partial: Path | None = None) -> list[dict]:
    from optimum_lowrank import optimize
    from optimum_lowrank.models import load_model

    spec = MODELS[model]
    loaded = load_model(model)
    accuracy = {**spec["accuracy"], "enforce": False}
    if accuracy["metric"] == "perplexity":
        accuracy.update(max_windows=windows, seq_len=512)
    rows = []
    configs = [("original", [], q) for q in spec["quantize"]]
    configs += [(f"svd cr={ratio:g}", [{"pass": "svd", "targets": spec["targets"], "compression_ratio": ratio}], q) for ratio in ratios for q in spec["quantize"][-1:]]
    for index, (label, passes, quantize) in enumerate(configs):
        recipe = {
            "version": 1,
            "passes": passes,
            "accuracy": accuracy,
            "export": {"quantize": quantize, "latency": {"repeats": repeats}, "baseline_latency": False},
        }
        t0 = time.perf_counter()
        report = optimize(loaded.model, recipe, out_root / f"{model}-{index}", tokenizer=loaded.tokenizer, overwrite=True, progress=False)
        acc, exp = report.accuracy, report.export
        compress_s = sum(p.seconds for p in report.passes)
        for variant, key, lat in (("fp32", "onnx/model.onnx", "output fp32"), (quantize, "onnx/model_quantized.onnx", "output quantized")):
            if label != "original" or variant != "fp32" or quantize == spec["quantize"][0]:
                rows.append(
                    {
                        "model": model,
                        "config": label,
                        "graph": variant,
                        "params": report.params_after,
                        "size_mb": round(exp.sizes_mb[key], 2),
                        "metric": acc.metric,
                        "original": acc.original,
                        "torch": acc.compressed_torch,
                        "onnx": acc.onnx_fp32 if variant == "fp32" else acc.onnx_quantized,
                        "latency_ms": exp.latency[lat]["median_ms"],
                        "compress_s": round(compress_s, 2),
                        "pipeline_s": round(time.perf_counter() - t0, 1),
                        "skipped_layers": sum(layer.action == "skipped" for p in report.passes for layer in p.layers),
                    }
                )
        print(f"  {model} {label} {quantize}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if partial is not None:  # keep what is measured if a later configuration fails or runs out of time
            partial.write_text(json.dumps(rows, indent=2) + "\n")
    base = next(r for r in rows if r["config"] == "original" and r["graph"] == "fp32")
    for row in rows:
        row["size_ratio"] = round(base["size_mb"] / row["size_mb"], 2)
        row["speedup"] = round(base["latency_ms"] / row["latency_ms"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.25, 1.5, 2.0], help="per-layer compression ratios (> 1)")
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens, stride 512")
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "svd.json")
    args = parser.parse_args()

    import tempfile

    import torch

    from optimum_lowrank.report import format_table

    torch.set_num_threads(2)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            rows += run(model, args.ratios, args.windows, args.repeats, Path(tmp), args.out.with_suffix(".partial.json"))
    header = ["model", "config", "graph", "params", "MB", "x smaller", "metric", "original", "torch", "ONNX", "ms", "speed-up", "compress s"]
    table = [
        [r["model"], r["config"], r["graph"], f"{r['params']:,}", f"{r['size_mb']:.1f}", f"{r['size_ratio']:.2f}", r["metric"],
         f"{r['original']:.2f}", f"{r['torch']:.2f}", f"{r['onnx']:.2f}", f"{r['latency_ms']:.1f}", f"{r['speedup']:.2f}", f"{r['compress_s']:.1f}"]
        for r in rows
    ]
    print(format_table(header, table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"windows": args.windows, "seq_len": 512, "stride": 512, "latency": "ORT CPU, batch 1, seq 128, 2 threads, median", "repeats": args.repeats}
    args.out.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
