"""Benchmark of the embedding-compression passes on MiniLM and SmolLM2.

For each method (``svd`` baseline, ``autoencoder``, ``tt``, ``tt_matrix``, ``fourier``)
and each requested compression ratio of the token-embedding table (params before /
after, the method's own rank rule; the achieved ratio is reported), it measures:

- MiniLM (all-MiniLM-L6-v2): STS-B dev Spearman x100 (cosine of mean-pooled
  embeddings, all 1,500 pairs, PyTorch), mean cosine between original and
  reconstructed embedding rows, whole-model parameters, int8 ONNX size (Optimum
  export + ORT dynamic int8, per channel, reduce_range), seconds of the pass;
- SmolLM2-135M-Instruct (tied head): WikiText-2 raw test perplexity on the first
  ``--windows`` (default 8) windows of 512 tokens, stride 512 (no overlap), PyTorch;
  the same row cosine, parameters, int8 ONNX size and seconds, plus the PyTorch
  forward latency (batch 1, 128 tokens) against the original, which shows the cost
  of the heads that rebuild the table in every call.

It also times the batched TT-SVD against a Python loop of TensorLy ``tensor_train``
over the rows, and checks that both give the same rows.

Everything runs on the CPU. Training epochs (documented in ``docs/embeddings.md``):
the passes' defaults for autoencoder (30 epochs of 256 rows) and tt (30 epochs of
1024 rows); tt_matrix 15 full-table steps (default 30; alpha over 10, StepLR(2, 0.5);
on MiniLM 30 steps gained less than 0.01 row cosine over 15 and cost 35-80 s more
per ratio) and fourier 3 epochs (default 10; its loss plateaus after 2-3). With these
the default run (MiniLM at 5 ratios, SmolLM2 at ratio 20) fits in about 25 min on the
shared 2-core machine. ``--quick`` uses 3 epochs everywhere, 300 STS-B pairs, 2
perplexity windows and ratios 5 and 20.

``--time-budget`` (minutes, default 25) skips the remaining configurations once the
next one would not fit (estimated from the last configuration of the same model);
skipped ones are listed in the JSON. SmolLM2 runs after MiniLM, ratio by ratio.

Usage
-----
    .venv/bin/python benchmarks/bench_embeddings.py                      # the full run
    .venv/bin/python benchmarks/bench_embeddings.py --models minilm --methods svd,autoencoder --ratios 2.5,5,10
    .venv/bin/python benchmarks/bench_embeddings.py --quick
    .venv/bin/python benchmarks/bench_embeddings.py --models smollm2 --merge     # add SmolLM2 to an earlier run

Writes ``benchmarks/results/embeddings.json`` (updated after every configuration).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads cost 10x on a shared 2-core machine

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import LowRankError
from optimum_lowrank.passes.embedding.install import reconstruction_metrics
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.recipe import load_recipe
from optimum_lowrank.report import format_table

DATA = ROOT.parent / "shared" / "data"
STSB = DATA / "stsb" / "sts-dev.tsv"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"

METHODS = {
    "svd": ("svd", {}),
    "autoencoder": ("autoencoder_embedding", {}),
    "tt": ("tt_embedding", {"mode": "tt"}),
    "tt_matrix": ("tt_embedding", {"mode": "tt_matrix", "epochs": 15, "anneal_epochs": 10, "lr_step": 2}),
    "fourier": ("fourier_embedding", {"epochs": 3, "anneal_epochs": 2, "lr_step": 1}),
    # tied models only: the input embedding compressed, the output head kept dense (saves only the input side)
    "svd_untie": ("svd", {"tied_head": "untie"}),
    "autoencoder_untie": ("autoencoder_embedding", {"tied_head": "untie"}),
}
TIED_ONLY = ("svd_untie", "autoencoder_untie")
# optional: the TT-SVD initialisation alone (no training), to measure what training adds
METHODS["tt_untrained"] = ("tt_embedding", {"mode": "tt", "epochs": 0})
METHODS["tt_matrix_untrained"] = ("tt_embedding", {"mode": "tt_matrix", "epochs": 0})
OPTIONAL = (*TIED_ONLY, "tt_untrained", "tt_matrix_untrained")
QUICK_EPOCHS = {"epochs": 3, "anneal_epochs": 2, "lr_step": 1}
MODELS = {
    "minilm": {"target": "embeddings.word_embeddings", "kind": "encoder"},
    "smollm2": {"target": "model.embed_tokens", "kind": "decoder"},
}
# Rebuilding SmolLM2's 49152-row table through a Fourier MLP of width h costs ~6 V d h FLOPs per forward
# (h = 3272 at ratio 5: ~0.56 TFLOP per call); below ratio 10 one perplexity run takes minutes.
DECODER_FOURIER_MIN_RATIO = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--ratios", default="2.5,5,10,20,40", help="embedding compression ratios (MiniLM)")
    parser.add_argument("--smollm2-ratios", default="20", help="ratios for SmolLM2 (run in this order)")
    parser.add_argument(
        "--methods", default=",".join(m for m in METHODS if m not in OPTIONAL),
        help=f"comma-separated subset of {', '.join(METHODS)} ({', '.join(TIED_ONLY)}: tied models only)",
    )
    parser.add_argument("--quick", action="store_true", help="3 epochs, 300 STS-B pairs, 2 windows, ratios 5 and 20")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and int8 size")
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 perplexity windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--time-budget", type=float, default=25.0, help="minutes; later configurations are skipped")
    parser.add_argument("--tensorly-rows", type=int, default=None, help="rows for the TensorLy loop timing (default: all)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "embeddings.json")
    parser.add_argument("--merge", action="store_true", help="keep what an existing --output holds for the models and configurations not run now")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.smollm2_ratios = [float(r) for r in args.smollm2_ratios.split(",") if r]
    if args.quick:
        args.ratios = [r for r in args.ratios if r in (5.0, 20.0)] or [5.0]
        args.smollm2_ratios = [r for r in args.smollm2_ratios if r in (5.0, 20.0)] or [20.0]
        args.windows = min(args.windows, 2)
        args.tensorly_rows = args.tensorly_rows or 2000
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return args


class Results:
    """The JSON document, rewritten after every configuration."""

    def __init__(self, path: Path, meta: dict, merge: bool = False):
        self.path = path
        self.data: dict = {"meta": meta}
        if merge and path.is_file():  # keep the other models' sections of an earlier run
            earlier = json.loads(path.read_text(encoding="utf-8"))
            self.data = {**{k: v for k, v in earlier.items() if k != "meta"}, "meta": meta}
            self.data["meta"]["merged_into"] = earlier.get("meta", {})
        path.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=float) + "\n", encoding="utf-8")


def onnx_int8_mb(model: torch.nn.Module) -> float:
    """Export with Optimum, quantize with ORT dynamic int8 (per channel, reduce_range); size in MB."""
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
    from optimum_lowrank.exporters.quantize import quantize_onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "onnx", onnx_task(model), validate=False)
        quantized = quantize_onnx(fp32, Path(tmp) / "onnx" / "model_quantized.onnx", "dynamic_int8")
        return onnx_size_mb(quantized)


def forward_ms(model: torch.nn.Module, vocab: int, repeats: int = 3) -> float:
    """Median PyTorch forward time (batch 1, 128 tokens, no cache), milliseconds."""
    ids = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(ids, use_cache=False)
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, use_cache=False)
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def embedding_module(model: torch.nn.Module, target: str) -> torch.nn.Module:
    return model.get_submodule(target)


def tensorly_check(weight: torch.Tensor, rows: int | None) -> dict:
    """Batched TT-SVD vs a loop of TensorLy ``tensor_train`` over the rows (8 x 8 x 6, rank 2)."""
    import tensorly as tl
    from tensorly.decomposition import tensor_train

    from optimum_lowrank.layers.tt import TTEmbedding

    shape, rank = (8, 8, 6), 2
    start = time.perf_counter()
    layer = TTEmbedding.from_weight(weight, shape, max_rank=rank)
    batched_s = time.perf_counter() - start
    n = weight.shape[0] if rows is None else min(rows, weight.shape[0])
    start = time.perf_counter()
    with tl.backend_context("pytorch"):
        first = []
        for p in range(n):
            factors = tensor_train(weight[p].reshape(shape), rank=[1, rank, rank, 1])
            if p < 5:
                first.append(tl.tt_to_tensor(factors).reshape(-1))
    loop_s = time.perf_counter() - start
    with torch.no_grad():
        diff = max(float((layer.weight[p] - first[p]).abs().max()) for p in range(len(first)))
    return {
        "reshape": list(shape), "max_rank": rank, "rows": weight.shape[0], "batched_seconds": batched_s,
        "tensorly_rows": n, "tensorly_loop_seconds": loop_s,
        "tensorly_loop_seconds_all_rows": loop_s * weight.shape[0] / n,
        "max_abs_diff_first_5_rows": diff,
    }


def run_model(name: str, args: argparse.Namespace, results: Results, deadline: float) -> None:
    from optimum_lowrank.data import load_sts_pairs, load_text
    from optimum_lowrank.evaluation import PerplexityEvaluator, STSBEvaluator
    from optimum_lowrank.models import load_model

    spec = MODELS[name]
    loaded = load_model(name)
    model = loaded.model
    target = spec["target"]
    weight = embedding_module(model, target).weight.detach().float().clone()
    vocab, dim = weight.shape
    ratios = args.ratios if name == "minilm" else args.smollm2_ratios
    section: dict = {"target": target, "table_shape": [vocab, dim], "rows": [], "skipped": []}
    earlier = results.data.get(name)  # present only with --merge
    if earlier:
        # keep the earlier rows (and skip notes) of the configurations not run now
        planned = {(method, float(ratio)) for method in args.methods for ratio in ratios}
        section["rows"] = [r for r in earlier.get("rows", []) if (r["method"], float(r["target_ratio"])) not in planned]
        section["skipped"] = [s for s in earlier.get("skipped", []) if _config_key(s["config"]) not in planned]
        if "tt_svd_timing" in earlier:
            section["tt_svd_timing"] = earlier["tt_svd_timing"]
    results.data[name] = section

    if spec["kind"] == "encoder":
        evaluator = STSBEvaluator(loaded.tokenizer, load_sts_pairs(STSB), max_pairs=300 if args.quick else None, threads=args.threads)
        metric = "stsb_spearman"
    else:
        text, _ = load_text(WIKITEXT)
        evaluator = PerplexityEvaluator(loaded.tokenizer, text, seq_len=512, stride=512, max_windows=args.windows, threads=args.threads)
        metric = "perplexity"
    section["metric"] = metric
    section["evaluation"] = evaluator.description

    start = time.perf_counter()
    baseline = {"params": count_parameters(model), "embedding_params": vocab * dim, metric: evaluator.evaluate_torch(model)}
    if spec["kind"] == "encoder":
        # the floor any table replacement should beat: every token embedded as the mean row
        floor = copy.deepcopy(model)
        with torch.no_grad():
            embedding_module(floor, target).weight.copy_(weight.mean(0).expand_as(weight))
        baseline[f"{metric}_every_token_mean_row"] = evaluator.evaluate_torch(floor)
        del floor
    if not args.no_onnx:
        baseline["int8_onnx_mb"] = onnx_int8_mb(model)
    if spec["kind"] == "decoder":
        baseline["forward_ms"] = forward_ms(model, vocab)
    baseline["seconds"] = time.perf_counter() - start
    section["baseline"] = baseline
    results.save()
    print(f"\n[{name}] baseline: {metric} {baseline[metric]:.3f}, params {baseline['params']:,}, "
          f"int8 {baseline.get('int8_onnx_mb', float('nan')):.1f} MB", flush=True)

    if name == "minilm" and "tt" in args.methods:
        section["tt_svd_timing"] = tensorly_check(weight, args.tensorly_rows)
        results.save()
        print(f"[{name}] TT-SVD timing: {section['tt_svd_timing']}", flush=True)

    last_seconds = 0.0
    for ratio in ratios:
        for method in args.methods:
            label = f"{method}@{ratio:g}"
            if method in TIED_ONLY and spec["kind"] != "decoder":
                continue
            if spec["kind"] == "decoder" and method == "fourier" and ratio < DECODER_FOURIER_MIN_RATIO:
                section["skipped"].append({"config": label, "reason": f"Fourier head below ratio {DECODER_FOURIER_MIN_RATIO:g} (table rebuilt per call)"})
                continue
            if time.perf_counter() + last_seconds > deadline:
                section["skipped"].append({"config": label, "reason": "time budget"})
                results.save()
                print(f"[{name}] {label}: skipped (time budget)", flush=True)
                continue
            t0 = time.perf_counter()
            row = run_config(model, spec, method, ratio, weight, evaluator, metric, args)
            last_seconds = time.perf_counter() - t0
            row["wall_seconds"] = last_seconds
            section["rows"].append(row)
            section["rows"].sort(key=_row_order)
            results.save()
            print(f"[{name}] {describe(row, metric)}", flush=True)


def _config_key(config: str) -> tuple[str, float]:
    """``"tt@20"`` -> ``("tt", 20.0)``."""
    method, _, ratio = config.rpartition("@")
    return method, float(ratio)


def _row_order(row: dict) -> tuple[float, int]:
    """Rows by ratio, then in the order of METHODS."""
    methods = list(METHODS)
    return float(row["target_ratio"]), methods.index(row["method"]) if row["method"] in methods else len(methods)


def run_config(model, spec, method, ratio, weight, evaluator, metric, args) -> dict:
    pass_id, extra = METHODS[method]
    options = {"targets": [spec["target"]], "compression_ratio": ratio, **extra}
    if pass_id != "svd":
        options["progress"] = False
        if args.quick and options.get("epochs", 1) != 0:
            options.update(QUICK_EPOCHS)
    row: dict = {"method": method, "target_ratio": ratio, "pass": pass_id, "options": options}
    recipe = load_recipe({"version": 1, "passes": [{"pass": pass_id, **options}]})
    start = time.perf_counter()
    try:
        compressed, reports = apply_passes(model, recipe, PassContext(kind=spec["kind"], seed=0))
    except LowRankError as err:
        row["error"] = str(err)
        return row
    row["pass_seconds"] = time.perf_counter() - start
    layer = reports[0].layers[0]
    vocab, dim = weight.shape
    row.update(
        rank=layer.rank, note=layer.note, embedding_params=layer.params_after,
        achieved_ratio=vocab * dim / layer.params_after, params=count_parameters(compressed),
        layer_metrics=layer.metrics,
    )
    module = compressed.get_submodule(spec["target"])
    row["rows"] = reconstruction_metrics(lambda index: module(index), weight)
    row[metric] = evaluator.evaluate_torch(compressed)
    if spec["kind"] == "decoder":
        row["forward_ms"] = forward_ms(compressed, vocab)
    if not args.no_onnx:
        start = time.perf_counter()
        row["int8_onnx_mb"] = onnx_int8_mb(compressed)
        row["onnx_seconds"] = time.perf_counter() - start
    return row


def describe(row: dict, metric: str) -> str:
    if "error" in row:
        return f"{row['method']}@{row['target_ratio']:g}: not reached ({row['error']})"
    return (
        f"{row['method']}@{row['target_ratio']:g}: ratio {row['achieved_ratio']:.2f}, rank {row['rank']}, "
        f"row cosine {row['rows']['mean_cosine']:.4f}, {metric} {row[metric]:.3f}, params {row['params']:,}, "
        f"int8 {row.get('int8_onnx_mb', float('nan')):.1f} MB, pass {row['pass_seconds']:.1f} s"
    )


def print_tables(data: dict) -> None:
    for name in MODELS:
        section = data.get(name)
        if not section or "baseline" not in section:
            continue
        metric = section["metric"]
        base = section["baseline"]
        header = ["method", "target CR", "table CR", "rank/width", "row cos (init -> final)", metric, "model params", "int8 MB", "pass s"]
        if "forward_ms" in base:
            header.append("fwd ms")
        rows = [["original", "1", "1", "-", "1", f"{base[metric]:.2f}", f"{base['params']:,}", _mb(base.get("int8_onnx_mb")), "-"]
                + ([f"{base['forward_ms']:.0f}"] if "forward_ms" in base else [])]
        for row in section["rows"]:
            if "error" in row:
                rows.append([row["method"], f"{row['target_ratio']:g}", "not reached", "-", "-", "-", "-", "-", "-"] + (["-"] if "forward_ms" in base else []))
                continue
            init = row["layer_metrics"].get("init_mean_cosine")
            cos = f"{row['rows']['mean_cosine']:.3f}" if init is None else f"{init:.3f} -> {row['rows']['mean_cosine']:.3f}"
            cells = [
                row["method"], f"{row['target_ratio']:g}", f"{row['achieved_ratio']:.2f}", str(row["rank"]), cos,
                f"{row[metric]:.2f}", f"{row['params']:,}", _mb(row.get("int8_onnx_mb")), f"{row['pass_seconds']:.1f}",
            ]
            if "forward_ms" in base:
                cells.append(f"{row['forward_ms']:.0f}")
            rows.append(cells)
        print(f"\n{name}: {section['evaluation']}")
        if f"{metric}_every_token_mean_row" in base:
            print(f"  every token embedded as the mean row: {metric} {base[f'{metric}_every_token_mean_row']:.2f}")
        print(format_table(header, rows))
        for skipped in section.get("skipped", []):
            print(f"  skipped {skipped['config']}: {skipped['reason']}")
        if "tt_svd_timing" in section:
            t = section["tt_svd_timing"]
            print(
                f"  TT-SVD of {t['rows']} rows ({'x'.join(map(str, t['reshape']))}, rank {t['max_rank']}): batched {t['batched_seconds']:.2f} s; "
                f"TensorLy loop {t['tensorly_loop_seconds']:.2f} s for {t['tensorly_rows']} rows "
                f"(~{t['tensorly_loop_seconds_all_rows']:.1f} s for all); max |diff| {t['max_abs_diff_first_5_rows']:.1e}"
            )


def _mb(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    deadline = start + args.time_budget * 60
    meta = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "quick": args.quick, "methods": args.methods, "ratios": {"minilm": args.ratios, "smollm2": args.smollm2_ratios},
        "perplexity": f"{args.windows} windows of 512 tokens, stride 512, from the start of WikiText-2 raw test",
        "epochs": {m: {**METHODS[m][1], **(QUICK_EPOCHS if args.quick else {})} or "pass defaults" for m in args.methods},
    }
    results = Results(args.output, meta, merge=args.merge)
    for name in args.models:
        run_model(name, args, results, deadline)
    results.data["meta"]["seconds"] = time.perf_counter() - start
    results.save()
    print_tables(results.data)
    print(f"\ntotal {results.data['meta']['seconds'] / 60:.1f} min; JSON: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
