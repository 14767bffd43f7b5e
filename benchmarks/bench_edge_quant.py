"""Edge quantization benchmark: size, accuracy and speed of the shipped graph, stock ONNX Runtime vs weight-only.

One run per model, every row measured in it (ratios against the fp32 row of the same run):

- SmolLM2-135M: WikiText-2 raw *test* perplexity (``--windows`` windows of 512 tokens,
  stride 512, BOS), ORT greedy decoding with past key/values (batch 1, a 128-token
  prompt from WikiText-2 *valid*, 64 new tokens, 2 threads), prefill latency.
- MiniLM: STS-B dev Spearman x100 (all 1,500 pairs), ORT latency batch 1 x 128 tokens.

Rows: fp32; stock ORT ``dynamic_int8``; stock ORT weight-only (``MatMulNBitsQuantizer``,
MatMul weights only, as anyone gets it: embedding and tied head stay fp32); and this
project's ``weight_only`` variants (embedding tables quantized and shared with the tied
head, per-target bits, rtn / k_quant / hqq). MiniLM also gets the usage-aware embedding
compression (``svd`` ratio 5, 1,000 exact rows, STS-B *train* calibration, no refinement)
stacked with each quantizer.

Usage
-----
    .venv/bin/python benchmarks/bench_edge_quant.py --models smollm2
    .venv/bin/python benchmarks/bench_edge_quant.py --models minilm --only w4_e8 ort_dynamic_int8

Results: ``benchmarks/results/edge_quant.json`` (rewritten after every row; ``--merge`` keeps
rows not run now); ``--markdown`` prints the tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimum_lowrank.exporters.latency import measure_decode, measure_latency  # noqa: E402
from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task  # noqa: E402
from optimum_lowrank.exporters.quantize import quantize_onnx  # noqa: E402
from optimum_lowrank.exporters.weight_only import WeightOnlySpec, initializer_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "edge_quant.json"
WORK = ROOT / "out" / "bench_edge"

DOWN8 = ((("*down_proj",), 8),)  # SmolLM2's FFN down projections; MiniLM's are renamed in minilm()
#: name -> (quantize method, WeightOnlySpec or None, what it is)
VARIANTS = {
    "fp32": ("none", None, "fp32 graph"),
    "ort_dynamic_int8": ("dynamic_int8", None, "stock ORT quantize_dynamic, int8 per channel"),
    "ort_weight_int8": ("stock", 8, "stock ORT MatMulNBitsQuantizer 8-bit, MatMul only (tables fp32)"),
    "ort_weight_int4": ("stock", 4, "stock ORT MatMulNBitsQuantizer 4-bit, MatMul only (tables fp32)"),
    "w8_e8": ("weight_only", WeightOnlySpec(bits=8, embedding_bits=8), "8-bit body, 8-bit shared table"),
    "w8_e8_b64": ("weight_only", WeightOnlySpec(bits=8, embedding_bits=8, block_size=64), "8-bit body and shared table, blocks of 64"),
    "w8_e8_b128": ("weight_only", WeightOnlySpec(bits=8, embedding_bits=8, block_size=128), "8-bit body and shared table, blocks of up to 128"),
    "w4mlp_e8": ("weight_only", WeightOnlySpec(bits=8, embedding_bits=8, overrides=((("*gate_proj", "*up_proj"), 4),)),
                 "8-bit body but 4-bit FFN gate/up, 8-bit table"),
    "w4_e8": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8), "4-bit body, 8-bit shared table"),
    "w4_e8_down8": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8, overrides=DOWN8), "4-bit body, FFN down/output 8-bit, 8-bit table"),
    "w4_e4": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=4), "4-bit body, 4-bit shared table"),
    "w4_e8_b128": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8, block_size=128), "4-bit body, 8-bit table, blocks of up to 128"),
    "w4_e4_b128": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=4, block_size=128), "4-bit everything, blocks of up to 128"),
    "w4_e4_b64": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=4, block_size=64), "4-bit everything, blocks of 64"),
    "hqq4_e8": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8, algorithm="hqq", symmetric=False), "HQQ 4-bit body, 8-bit table"),
    "w4a_e8": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8, symmetric=False), "asymmetric RTN 4-bit body, 8-bit table"),
    "hqq4_e8_acc4": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8, algorithm="hqq", symmetric=False, accuracy_level=4),
                     "HQQ 4-bit body (accuracy_level 4), 8-bit table"),
    "hqq4_e4": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=4, algorithm="hqq", symmetric=False), "HQQ 4-bit body, 4-bit table"),
    "hqq4_b64_e8": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8, algorithm="hqq", symmetric=False, block_size=64),
                    "HQQ 4-bit body in blocks of 64, 8-bit table (blocks of 64)"),
    "kquant4_e8": ("weight_only", WeightOnlySpec(bits=4, embedding_bits=8, algorithm="k_quant"), "k-quant 4-bit body, 8-bit table"),
}
MINILM_EMBEDDING = {
    "pass": "svd",
    "targets": ["embeddings.word_embeddings"],
    "compression_ratio": 5,
    "keep_top_k": 1000,
}


def stock_weight_only(fp32: Path, out: Path, bits: int) -> None:
    """What ONNX Runtime gives anyone: MatMulNBitsQuantizer over MatMul weights, block 32, symmetric."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, accuracy_level=None if bits == 4 else 4)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=config)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(out))


def write(rows: list[dict], path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, path)


def quantize_row(name: str, fp32: Path, folder: Path, ffn_down: str = "*down_proj") -> tuple[Path, float, dict]:
    method, spec, _ = VARIANTS[name]
    if isinstance(spec, WeightOnlySpec) and spec.overrides == DOWN8:
        spec = replace(spec, overrides=tuple(((ffn_down,), bits) for _, bits in spec.overrides))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model_quantized.onnx"
    details: dict = {}
    t0 = time.perf_counter()
    if method == "none":
        out = fp32
    elif method == "stock":
        stock_weight_only(fp32, out, spec)
    else:
        quantize_onnx(fp32, out, method, weight_only=spec, details=details)
    return out, time.perf_counter() - t0, details


def float_bytes(path: Path) -> int:
    return sum(r["bytes"] for r in initializer_table(path) if r["dtype"].startswith("float"))


def smollm2(args, rows: list[dict], meta: dict) -> None:
    from optimum_lowrank.data import load_text
    from optimum_lowrank.evaluation import PerplexityEvaluator
    from optimum_lowrank.models import load_model

    torch.set_flush_denormal(True)
    loaded = load_model("smollm2")
    folder = WORK / "smollm2"
    fp32 = folder / "fp32" / "onnx" / "model.onnx"
    if not fp32.is_file():
        export_onnx(loaded.model, fp32.parent, onnx_task(loaded.model))
    text, _ = load_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
    evaluator = PerplexityEvaluator(loaded.tokenizer, text, seq_len=512, stride=512, max_windows=args.windows)
    valid, _ = load_text(DATA / "wikitext-2" / "wiki.valid.tokens")
    prompt = np.array([loaded.tokenizer(valid[:4000])["input_ids"][:128]], dtype=np.int64)
    meta["smollm2"] = {"perplexity": evaluator.description, "decode": "greedy, batch 1, 128-token prompt, 64 new tokens, 2 threads"}
    base = None
    for name in args.only or VARIANTS:
        path, quant_s, details = quantize_row(name, fp32, folder / name)
        t0 = time.perf_counter()
        ppl = evaluator.evaluate_onnx(path)
        eval_s = time.perf_counter() - t0
        decode = measure_decode(path, prompt, 64)
        row = {
            "model": "smollm2", "variant": name, "what": VARIANTS[name][2], "size_mb": onnx_size_mb(path),
            "perplexity": ppl, "decode_tokens_per_s": decode.tokens_per_second, "prefill_ms": decode.prefill_ms,
            "quantize_s": quant_s, "eval_s": eval_s, "float_mb_over_100kb": float_bytes(path) / 1e6,
            "first_tokens": decode.generated[:8], "max_error": max(details.get("relative_error", {0: 0}).values()),
        }
        if name == "fp32":
            base = row
        if base is not None:
            row["perplexity_increase"] = ppl / base["perplexity"] - 1
            row["decode_speed_ratio"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        rows.append(row)
        write(rows, args.out, meta)
        print(f"{name:18s} {row['size_mb']:8.1f} MB  ppl {ppl:8.3f}  {decode.tokens_per_second:6.1f} tok/s  q {quant_s:5.1f} s", flush=True)


def minilm(args, rows: list[dict], meta: dict) -> None:
    from optimum_lowrank.api import PassContext
    from optimum_lowrank.data import load_sts_pairs, load_text, token_windows
    from optimum_lowrank.evaluation import STSBEvaluator
    from optimum_lowrank.models import load_model
    from optimum_lowrank.pipeline import apply_passes
    from optimum_lowrank.recipe import load_recipe
    from optimum_lowrank.vocab import token_counts

    loaded = load_model("minilm")
    pairs = load_sts_pairs(DATA / "stsb" / "sts-dev.tsv")
    evaluator = STSBEvaluator(loaded.tokenizer, pairs, pairs_description="sts-dev.tsv")
    meta["minilm"] = {"metric": evaluator.description, "latency": "batch 1, seq 128, 2 threads, median of 20"}
    source = f"tsv:{DATA / 'stsb' / 'sts-train.tsv'}:5,6"
    text, description = load_text(source)
    context = PassContext(
        kind="encoder", tokenizer=loaded.tokenizer,
        calibration_loader=lambda: token_windows(loaded.tokenizer, text, 128, 256, strict=True),
        token_counts_loader=lambda: token_counts(loaded.tokenizer, text, description),
    )
    compressed, _ = apply_passes(loaded.model, load_recipe({"version": 1, "passes": [MINILM_EMBEDDING]}), context)
    models = {"original": loaded.model, "svd5_top1000": compressed}
    base = None
    for label, model in models.items():
        folder = WORK / "minilm" / label
        fp32 = folder / "fp32" / "onnx" / "model.onnx"
        if not fp32.is_file():
            export_onnx(model, fp32.parent, onnx_task(model))
        for name in args.only or VARIANTS:
            path, quant_s, details = quantize_row(name, fp32, folder / name, ffn_down="re:.*layer\\.\\d+\\.output\\.dense")
            t0 = time.perf_counter()
            score = evaluator.evaluate_onnx(path)
            eval_s = time.perf_counter() - t0
            latency = measure_latency(path, batch_size=1, seq_len=128, repeats=20, threads=2)
            row = {
                "model": "minilm", "embedding": label, "variant": name, "what": VARIANTS[name][2],
                "size_mb": onnx_size_mb(path), "stsb": score, "latency_ms": latency.median_ms, "quantize_s": quant_s,
                "eval_s": eval_s, "float_mb_over_100kb": float_bytes(path) / 1e6,
                "max_error": max(details.get("relative_error", {0: 0}).values()),
            }
            if label == "original" and name == "fp32":
                base = row
            if base is not None:
                row["stsb_drop"] = base["stsb"] - score
            rows.append(row)
            write(rows, args.out, meta)
            print(f"{label:12s} {name:18s} {row['size_mb']:7.2f} MB  STS-B {score:6.2f}  {latency.median_ms:6.1f} ms", flush=True)


def markdown(path: Path) -> None:
    data = json.loads(path.read_text())
    print(f"machine: {data['meta'].get('machine')}\n")
    for model in ("smollm2", "minilm"):
        rows = [r for r in data["rows"] if r["model"] == model]
        if not rows:
            continue
        if model == "smollm2":
            base = next(r for r in rows if r["variant"] == "fp32")
            speed_key = "decode_tokens_per_s_median" if "decode_tokens_per_s_median" in base else "decode_tokens_per_s"
            print("| graph | size MB | perplexity | vs fp32 | decode tok/s | vs fp32 | quantize s |\n| --- | --- | --- | --- | --- | --- | --- |")
            for r in rows:
                speed = f"{r[speed_key]:.1f} | {r[speed_key] / base[speed_key]:.2f}x" if speed_key in r else "- | -"
                print(f"| {r['variant']}: {r['what']} | {r['size_mb']:.1f} | {r['perplexity']:.3f} | {r['perplexity'] / base['perplexity'] - 1:+.1%} "
                      f"| {speed} | {r['quantize_s']:.1f} |")
        else:
            base = next(r for r in rows if r["variant"] == "fp32" and r["embedding"] == "original")
            print("| embedding | graph | size MB | STS-B | drop | latency ms |\n| --- | --- | --- | --- | --- | --- |")
            for r in rows:
                latency = f"{r['latency_ms_median']:.1f}" if "latency_ms_median" in r else "-"
                print(f"| {r['embedding']} | {r['variant']}: {r['what']} | {r['size_mb']:.2f} | {r['stsb']:.2f} | {base['stsb'] - r['stsb']:+.2f} | {latency} |")
        print()


def speed(args) -> None:
    """Decode speed again for every SmolLM2 graph of the JSON, in ``--rounds`` interleaved rounds (median)."""
    from optimum_lowrank.models import load_model

    data = json.loads(args.out.read_text())
    tokenizer = load_model("smollm2").tokenizer
    valid = (DATA / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    prompt = np.array([tokenizer(valid[:4000])["input_ids"][:128]], dtype=np.int64)
    rows = [r for r in data["rows"] if r["model"] == "smollm2" and (not args.only or r["variant"] in args.only)]
    paths = {r["variant"]: WORK / "smollm2" / ("fp32/onnx/model.onnx" if r["variant"] == "fp32" else f"{r['variant']}/model_quantized.onnx") for r in rows}
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, path in paths.items():
            speeds[name].append(measure_decode(path, prompt, 64).tokens_per_second)
            print(f"{name:18s} {speeds[name][-1]:6.1f} tok/s", flush=True)
    for r in rows:
        r["decode_tokens_per_s_median"] = float(np.median(speeds[r["variant"]]))
        r["decode_rounds"] = args.rounds
    data["meta"]["speed"] = f"greedy decode, 64 new tokens, median of {args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d %H:%M')}"
    minilm_speed(args, data)
    write(data["rows"], args.out, data["meta"])


def minilm_speed(args, data: dict) -> None:
    """MiniLM latency (batch 1 x 128) of the saved graphs again, interleaved rounds (median)."""
    rows = [r for r in data["rows"] if r["model"] == "minilm" and (not args.only or r["variant"] in args.only)]
    folder = WORK / "minilm"
    paths = {id(r): folder / r["embedding"] / ("fp32/onnx/model.onnx" if r["variant"] == "fp32" else f"{r['variant']}/model_quantized.onnx")
             for r in rows}
    times: dict[int, list[float]] = {key: [] for key in paths}
    for _ in range(args.rounds):
        for key, path in paths.items():
            times[key].append(measure_latency(path, batch_size=1, seq_len=128, repeats=20, threads=2).median_ms)
    for r in rows:
        r["latency_ms_median"] = float(np.median(times[id(r)]))
        print(f"{r['embedding']:12s} {r['variant']:18s} {r['latency_ms_median']:6.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--speed", action="store_true", help="re-measure SmolLM2 decode speed of the saved graphs, interleaved")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.markdown:
        markdown(args.out)
        return
    if args.speed:
        speed(args)
        return
    rows: list[dict] = []
    if args.merge and args.out.is_file():
        keep = {(m, v) for m in args.models for v in (args.only or VARIANTS)}
        rows = [r for r in json.loads(args.out.read_text())["rows"] if (r["model"], r["variant"]) not in keep]
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)", "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for model in args.models:
        {"smollm2": smollm2, "minilm": minilm}[model](args, rows, meta)


if __name__ == "__main__":
    main()
