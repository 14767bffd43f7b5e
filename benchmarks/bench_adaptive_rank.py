"""Adaptive-rank benchmark: uniform SVD vs ASVD vs SVD-LLM vs SoftLMs, with and without a short fine-tune.

Targets: every attention and MLP projection of every transformer block. At each
"fewer parameters" fraction p (of those layers' parameters):

- ``svd``      plain truncated SVD, one per-layer compression ratio 1/(1-p) for all layers (uniform);
- ``asvd``     ASVD channel scaling (alpha 0.5), ranks from the global budget (Fisher allocation);
- ``svd_llm``  SVD-LLM whitening, ranks from the global budget (Fisher allocation);
- ``softlm``   SoftLMs soft-thresholding in the SVD-LLM basis, started at the svd_llm allocation and
               trained (thresholds + singular values) with the LM / distillation loss and the budget penalty;
- ablations (``--methods``): ``svd_llm_uniform`` (SVD-LLM, uniform per-layer ratio), ``svd_budget``
  (plain SVD with ``target_params_ratio``, relative-energy allocation);

each then optionally fine-tuned (``optimum_lowrank.finetune``: low-rank factors only, AdamW, cosine).

SmolLM2-135M: WikiText-2 raw test perplexity, fixed windows of 512 tokens, stride 512 (``--ppl-windows``;
the reference 35.065 is 20 windows); calibration and fine-tune text: WikiText-2 valid (tokenized release).
MiniLM (all-MiniLM-L6-v2): STS-B dev Spearman x100; fine-tune = distillation to the original's last
hidden states. Latency: ONNX Runtime CPU, the exported original vs compressed graphs, fp32 and int8
(SmolLM2: weight-only int8 MatMulNBits, since dynamic int8 breaks it, see STACK.md; MiniLM: dynamic int8),
batch 1 and 8, sequence length 128 (``--latency-seq``), the graphs timed round-robin. Also a per-layer micro-benchmark (one Linear vs its two factors in ORT) to show where a
factorized layer is slower than the dense one.

Calibration statistics (Gram matrices, mean |x|, Fisher sensitivities) are collected once per model and
shared by the methods and ratios; "calibration s" is that shared cost, "compress s" the per-row cost.
Memory ("+MB"): the process's peak resident set size during the step (VmHWM, reset before it; Linux)
minus the resident size at its start, i.e. what the step itself needed, in MB.

    python benchmarks/bench_adaptive_rank.py                              # everything (about 25 min, 2 shared cores)
    python benchmarks/bench_adaptive_rank.py --models smollm2 --ratios 0.3 --finetune-ratios 0.3 --no-latency

Writes ``benchmarks/results/adaptive_rank.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("svd", "asvd", "svd_llm", "softlm")
EXTRA_METHODS = ("svd_llm_uniform", "svd_budget")  # ablations: SVD-LLM with uniform ranks, plain SVD with the budget
TARGETS = {
    "smollm2": ["re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj"],
    "minilm": ["re:encoder\\.layer\\.\\d+\\..*(query|key|value|dense)"],
}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory and timing


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextmanager
def measured(record: dict, prefix: str):
    """Wall time and memory of the block: ``record[prefix + '_s']``, ``_peak_mb`` (process peak RSS during the
    block) and ``_extra_mb`` (that peak minus the RSS at the start: what the step itself needed)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        resettable = True
    except OSError:
        resettable = False
    start = _status_mb("VmRSS")
    t0, cpu0 = time.perf_counter(), _cpu_s()
    yield
    record[prefix + "_s"] = round(time.perf_counter() - t0, 2)
    record[prefix + "_cpu_s"] = round(_cpu_s() - cpu0, 2)
    peak = _status_mb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record[prefix + "_peak_mb"] = round(peak, 1) if peak is not None else None
    record[prefix + "_extra_mb"] = round(peak - start, 1) if peak is not None and start is not None and resettable else None


# --------------------------------------------------------------------------- compression


class Shared:
    """Calibration computed once per model: statistics, sensitivities, whitened decompositions."""

    def __init__(self, model, targets, ids, kind, sens_samples, methods, record):
        from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
        from optimum_lowrank.passes.linear.calibration import collect_input_statistics, collect_output_sensitivity

        need = {m for m in methods if m not in ("svd", "svd_budget")}
        self.decomps = {}
        self.sensitivity = None
        if not need:
            return
        with measured(record, "statistics"):
            stats = collect_input_statistics(model, targets, ids, kind=kind, gram=True, abs_mean="asvd" in need)
        with measured(record, "sensitivity"):
            self.sensitivity = collect_output_sensitivity(model, targets, ids[:sens_samples], kind=kind)
        for method in ("asvd", "svd_llm"):
            if method in need or (method == "svd_llm" and need & {"softlm", "svd_llm_uniform"}):
                config = ActivationSVDConfig(targets=["x"], method=method, target_params_ratio=0.5)
                with measured(record, f"decompose_{method}"):
                    self.decomps[method] = ActivationSVDPass(config).decompose(targets, stats)
        del stats


def shared_cost(record: dict, method: str, suffix: str = "_s") -> float:
    """Seconds (wall, or CPU with suffix ``_cpu_s``) of the shared calibration steps ``method`` needs."""
    if method in ("svd", "svd_budget"):
        return 0.0
    steps = ["statistics", "sensitivity", "decompose_asvd" if method == "asvd" else "decompose_svd_llm"]
    return round(sum(record.get(step + suffix, 0.0) for step in steps), 1)


def compress(method: str, model, keep: float, patterns, shared: Shared, context, softlm_steps: int, softlm_lr: float, min_saving: float = 0.1):
    """Compress a deep copy of ``model``; returns (model, layer reports, notes).

    ``min_saving``: the passes' ``min_layer_saving`` (layers saving less stay dense)."""
    from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
    from optimum_lowrank.passes.linear.softlm import SoftLMConfig, SoftLMPass
    from optimum_lowrank.passes.svd import SVDConfig, SVDPass

    m = copy.deepcopy(model)
    notes: list[str] = []
    if method == "svd":
        reports = SVDPass(SVDConfig(targets=patterns, compression_ratio=1 / keep, min_layer_saving=min_saving)).run(m)
    elif method == "svd_budget":
        reports = SVDPass(SVDConfig(targets=patterns, target_params_ratio=keep, min_layer_saving=min_saving)).run(m)
    elif method == "svd_llm_uniform":
        compression = ActivationSVDPass(ActivationSVDConfig(targets=patterns, method="svd_llm", compression_ratio=1 / keep, min_layer_saving=min_saving))
        reports = compression.apply_decomposed(m, compression.select(m), shared.decomps["svd_llm"])
    elif method in ("asvd", "svd_llm"):
        compression = ActivationSVDPass(ActivationSVDConfig(targets=patterns, method=method, target_params_ratio=keep, min_layer_saving=min_saving))
        reports = compression.apply_decomposed(m, compression.select(m), shared.decomps[method], shared.sensitivity)
    elif method == "softlm":
        config = SoftLMConfig(targets=patterns, target_params_ratio=keep, steps=softlm_steps, lr=softlm_lr, min_layer_saving=min_saving)
        softlm = SoftLMPass(config)
        state = softlm.train_soft(m, softlm.select(m), context, decomposition=shared.decomps["svd_llm"], sensitivity=shared.sensitivity)
        reports = softlm.truncate(m, state)
        notes.append(state.summary())
    else:
        raise ValueError(f"unknown method {method!r}")
    return m.eval(), reports, notes


def layer_summary(reports) -> dict:
    before = sum(r.params_before for r in reports)
    after = sum(r.params_after for r in reports)
    dense = [r.name for r in reports if r.action != "factorized"]
    return {
        "params_ratio": round(after / before, 4),
        "target_params_before": before,
        "target_params_after": after,
        "dense_layers": len(dense),
        "ranks": {r.name: r.rank for r in reports},
    }


# --------------------------------------------------------------------------- per model


def run_model(name: str, args) -> dict:
    import torch

    from optimum_lowrank.api import PassContext, count_parameters, resolve_targets
    from optimum_lowrank.data import load_sts_pairs, load_text, token_windows
    from optimum_lowrank.evaluation import PerplexityEvaluator, STSBEvaluator
    from optimum_lowrank.finetune import finetune
    from optimum_lowrank.models import load_model

    result: dict = {"model": name, "rows": [], "shared": {}}
    loaded = load_model(name)
    model, tok, kind = loaded.model, loaded.tokenizer, loaded.kind
    if kind == "decoder":
        torch.set_flush_denormal(True)
    patterns = TARGETS[name]
    cal_text, cal_desc = load_text(DATA / "wikitext-2" / "wiki.valid.tokens")
    seq = args.cal_seq if kind == "decoder" else args.cal_seq_encoder
    cal_ids = token_windows(tok, cal_text, seq, args.cal_samples)
    ft_windows = max(args.ft_steps, args.target_ft_steps if args.target_run else 0) * args.ft_batch
    ft_ids = token_windows(tok, cal_text, seq, args.cal_samples + ft_windows)[args.cal_samples :]
    if ft_ids.shape[0] == 0:
        ft_ids = cal_ids
    context = PassContext(kind=kind, tokenizer=tok, calibration_loader=lambda: cal_ids, seed=0)
    if kind == "decoder":
        test_text, test_desc = load_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
        evaluator = PerplexityEvaluator(tok, test_text, seq_len=512, stride=512, max_windows=args.ppl_windows, text_description=test_desc)
        metric = "perplexity"
    else:
        pairs = load_sts_pairs(DATA / "stsb" / "sts-dev.tsv")
        evaluator = STSBEvaluator(tok, pairs, max_pairs=args.stsb_pairs, pairs_description="sts-dev.tsv")
        metric = "stsb_spearman"
    result.update(
        metric=metric, evaluation=evaluator.description, params=count_parameters(model),
        calibration=f"{cal_desc}: {cal_ids.shape[0]} windows of {seq} tokens",
        finetune_data=f"{ft_ids.shape[0]} further windows of {seq} tokens of the same text",
    )
    with measured(result["shared"], "evaluate_original"):
        result["original"] = evaluator.evaluate_torch(model)
    log(f"{name}: original {metric} {result['original']:.4f}")

    targets = resolve_targets(model, tuple(patterns), (torch.nn.Linear,))
    shared = Shared(model, targets, cal_ids, kind, args.sens_samples, args.methods, result["shared"])
    calibration_s = sum(v for k, v in result["shared"].items() if k.endswith("_s") and not k.endswith("_cpu_s") and not k.startswith("evaluate"))
    log(f"{name}: shared calibration {calibration_s:.0f} s")
    keep_models = {}
    for fewer in args.ratios:
        keep = round(1 - fewer, 6)
        for method in args.methods:
            row: dict = {"model": name, "fewer": fewer, "method": method}
            with measured(row, "compress"):
                compressed, reports, notes = compress(method, model, keep, patterns, shared, context, args.softlm_steps, args.softlm_lr, args.min_layer_saving)
            row.update(layer_summary(reports))
            row["notes"] = notes
            row["shared_calibration_s"] = shared_cost(result["shared"], method)
            with measured(row, "evaluate"):
                row["metric"] = evaluator.evaluate_torch(compressed)
            log(f"{name} {method} -{fewer:.0%}: {metric} {row['metric']:.4f} (params ratio {row['params_ratio']}, {row['compress_s']:.0f} s)")
            if fewer in args.finetune_ratios and args.ft_steps > 0:
                reference = model if kind == "encoder" else None
                with measured(row, "finetune"):
                    ft = finetune(compressed, ft_ids, kind=kind, steps=args.ft_steps, lr=args.ft_lr if kind == "decoder" else args.ft_lr_encoder,
                                  batch_size=args.ft_batch, reference_model=reference, seed=0, progress=False)
                row["finetune"] = {k: v for k, v in ft.items() if k != "seconds"}
                row["metric_finetuned"] = evaluator.evaluate_torch(compressed)
                log(f"{name} {method} -{fewer:.0%} + finetune: {metric} {row['metric_finetuned']:.4f} ({row['finetune_s']:.0f} s)")
            if (method, fewer) in args.latency_configs:
                keep_models[f"{method} -{fewer:.0%}"] = compressed
            result["rows"].append(row)
            del compressed
    if args.target_run and kind == "decoder":
        result["target_run"] = target_run(model, patterns, context, evaluator, ft_ids, result["original"], shared, result["shared"], args)
    if args.latency:
        result["latency"] = latency(name, model, keep_models, kind, args)
    return result


def target_run(model, patterns, context, evaluator, ft_ids, original: float, shared: Shared, shared_record: dict, args) -> dict:
    """The issue's target: calibration + compression + a longer fine-tune at one ratio, in CPU seconds.

    The calibration (statistics, sensitivities, SVD-LLM decomposition) is the shared one computed
    earlier; its measured CPU seconds are added, so the total is what a fresh run costs.
    """
    from optimum_lowrank.finetune import finetune

    keep = round(1 - args.target_fewer, 6)
    row: dict = {"method": args.target_method, "fewer": args.target_fewer, "ft_steps": args.target_ft_steps}
    row["calibration_cpu_s"] = shared_cost(shared_record, args.target_method, "_cpu_s")
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    m, reports, _ = compress(args.target_method, model, keep, patterns, shared, context, args.softlm_steps, args.softlm_lr, args.min_layer_saving)
    row["compress_cpu_s"], row["compress_wall_s"] = round(_cpu_s() - cpu0, 1), round(time.perf_counter() - wall0, 1)
    row["compress_cpu_s"] = round(row["compress_cpu_s"] + row["calibration_cpu_s"], 1)
    row.update(layer_summary(reports))
    row["metric"] = evaluator.evaluate_torch(m)
    log(f"target run: {args.target_method} -{args.target_fewer:.0%}: {row['metric']:.4f} ({row['compress_cpu_s']:.0f} CPU s)")
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    row["finetune"] = finetune(m, ft_ids, kind="decoder", steps=args.target_ft_steps, lr=args.ft_lr, seed=0, progress=False)
    row["finetune_cpu_s"], row["finetune_wall_s"] = round(_cpu_s() - cpu0, 1), round(time.perf_counter() - wall0, 1)
    row["metric_finetuned"] = evaluator.evaluate_torch(m)
    row["cpu_s"] = round(row["compress_cpu_s"] + row["finetune_cpu_s"], 1)
    row["increase"] = round(row["metric_finetuned"] / original - 1, 4)
    row["target_met"] = row["increase"] <= 0.10 and row["cpu_s"] <= 600
    log(f"target run + {args.target_ft_steps} fine-tune steps: {row['metric_finetuned']:.4f} ({row['increase']:+.1%}), {row['cpu_s']:.0f} CPU s in all")
    return row


# --------------------------------------------------------------------------- ONNX Runtime latency


def latency(name: str, model, compressed: dict, kind: str, args) -> list[dict]:
    """Export every config, then time all graphs round-robin (one run of each in turn), so that a change of
    the machine's load hits every graph alike; median of ``--latency-repeats`` runs after one warm-up."""
    import numpy as np

    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
    from optimum_lowrank.exporters.quantize import quantize_onnx
    from optimum_lowrank.exporters.runtime import build_dummy_feeds, make_session

    method = "weight_int8" if kind == "decoder" else "dynamic_int8"
    vocab = getattr(model.config, "vocab_size", 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for label, m in {"original": model, **compressed}.items():
            folder = Path(tmp) / label.replace(" ", "_").replace("%", "")
            t0 = time.perf_counter()
            fp32 = export_onnx(m, folder, onnx_task(m))
            int8 = quantize_onnx(fp32, folder / "model_quantized.onnx", method)
            log(f"{name} {label}: exported and quantized in {time.perf_counter() - t0:.0f} s")
            graphs[(label, "fp32")], graphs[(label, method)] = fp32, int8
        for batch in args.latency_batches:
            sessions = {key: make_session(path, threads=args.threads) for key, path in graphs.items()}
            feeds = {key: build_dummy_feeds(sess, batch, args.latency_seq, vocab, seed=0) for key, sess in sessions.items()}
            times: dict = {key: [] for key in sessions}
            for repeat in range(args.latency_repeats + 1):
                for key, sess in sessions.items():
                    t0 = time.perf_counter()
                    sess.run(None, feeds[key])
                    if repeat:  # the first round is the warm-up
                        times[key].append((time.perf_counter() - t0) * 1e3)
            for (label, graph), values in times.items():
                rows.append({"model": name, "config": label, "graph": graph, "batch": batch, "seq_len": args.latency_seq,
                             "size_mb": round(onnx_size_mb(graphs[(label, graph)]), 1), "median_ms": round(float(np.median(values)), 2),
                             "p90_ms": round(float(np.percentile(values, 90)), 2)})
                log(f"{name} {label} {graph} batch {batch}: {rows[-1]['median_ms']:.1f} ms")
            del sessions
    base = {(r["graph"], r["batch"]): r["median_ms"] for r in rows if r["config"] == "original"}
    for r in rows:
        r["speedup"] = round(base[(r["graph"], r["batch"])] / r["median_ms"], 3)
    return sorted(rows, key=lambda r: (r["config"] != "original", r["config"], r["graph"] != "fp32", r["batch"]))


def layer_latency(args) -> list[dict]:
    """One dense Linear vs its two factors in ORT, fp32: ranks at 5/10/20/30/50% fewer parameters than the dense layer."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from optimum_lowrank.layers.lowrank import LowRankLinear

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for out_f, in_f in [(576, 576), (1536, 576), (576, 1536), (384, 384), (1536, 384)]:
            for fewer in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
                if fewer == 0:
                    layer, rank = torch.nn.Linear(in_f, out_f), None
                else:
                    rank = max(1, int((1 - fewer) * out_f * in_f / (out_f + in_f)))
                    layer = LowRankLinear(in_f, out_f, rank)
                path = Path(tmp) / f"l{out_f}_{in_f}_{fewer}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                    torch.onnx.export(layer.eval(), (torch.randn(1, 8, in_f),), str(path), input_names=["x"], output_names=["y"],
                                      dynamic_axes={"x": {0: "b", 1: "s"}}, dynamo=False)
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for tokens in (128, 1024):
                    x = np.random.default_rng(0).standard_normal((1, tokens, in_f), dtype=np.float32)
                    for _ in range(3):
                        session.run(None, {"x": x})
                    times = []
                    for _ in range(args.layer_repeats):
                        t0 = time.perf_counter()
                        session.run(None, {"x": x})
                        times.append((time.perf_counter() - t0) * 1e3)
                    rows.append({"shape": f"{out_f}x{in_f}", "fewer": fewer, "rank": rank, "tokens": tokens, "median_ms": round(float(np.median(times)), 4)})
    base = {(r["shape"], r["tokens"]): r["median_ms"] for r in rows if r["fewer"] == 0}
    for r in rows:
        r["speedup"] = round(base[(r["shape"], r["tokens"])] / r["median_ms"], 3)
    return rows


# --------------------------------------------------------------------------- output


def _relative(value: float | None, original: float, higher: bool) -> str:
    """Change vs the original: points for a higher-is-better metric, percent otherwise."""
    if value is None:
        return "-"
    return f"{value - original:+.2f}" if higher else f"{(value / original - 1) * 100:+.1f}%"


def print_tables(results: dict) -> None:
    from optimum_lowrank.report import format_table

    for model in results["models"]:
        higher = model["metric"] != "perplexity"
        print(f"\n{model['model']}: {model['evaluation']}")
        print(f"original {model['metric']}: {model['original']:.4f}; calibration: {model['calibration']}")
        shared = model["shared"]
        print("shared calibration (wall s / CPU s / extra peak MB): " + ", ".join(
            f"{k[:-2]} {v:.0f} / {shared.get(k[:-2] + '_cpu_s', 0):.0f} / {shared.get(k[:-2] + '_extra_mb') or 0:.0f}"
            for k, v in shared.items() if k.endswith("_s") and not k.endswith("_cpu_s")))
        header = ["fewer", "method", "params ratio", "dense", model["metric"], "+finetune", "vs orig", "vs orig (ft)", "calib s", "compress s", "+MB", "ft s"]
        rows = []
        for r in model["rows"]:
            ft = r.get("metric_finetuned")
            rel = functools.partial(_relative, original=model["original"], higher=higher)
            rows.append([f"{r['fewer']:.0%}", r["method"], f"{r['params_ratio']:.4f}", str(r["dense_layers"]), f"{r['metric']:.4g}",
                         "-" if ft is None else f"{ft:.4g}", rel(r["metric"]), rel(ft), f"{r['shared_calibration_s']:.0f}", f"{r['compress_s']:.1f}",
                         f"{r.get('compress_extra_mb') or 0:.0f}", f"{r.get('finetune_s', 0):.0f}" if ft is not None else "-"])
        print(format_table(header, rows))
        target = model.get("target_run")
        if target:
            print(f"target run ({target['method']} -{target['fewer']:.0%}, calibration + compression + {target['ft_steps']} fine-tune steps): "
                  f"{target['metric']:.4g} -> {target['metric_finetuned']:.4g} ({target['increase']:+.1%} vs original), "
                  f"{target['cpu_s']:.0f} CPU s ({target['compress_cpu_s']:.0f} + {target['finetune_cpu_s']:.0f}); target met: {target['target_met']}")
        if model.get("latency"):
            rows = [[r["config"], r["graph"], str(r["batch"]), str(r["seq_len"]), f"{r['size_mb']:.1f}", f"{r['median_ms']:.1f}", f"{r['speedup']:.2f}"] for r in model["latency"]]
            print(format_table(["ORT CPU", "graph", "batch", "seq", "MB", "median ms", "speed-up vs original"], rows))
    if results.get("layer_latency"):
        rows = [[r["shape"], f"{r['fewer']:.0%}", str(r["rank"] or "dense"), str(r["tokens"]), f"{r['median_ms']:.3f}", f"{r['speedup']:.2f}"] for r in results["layer_latency"]]
        print("\none layer in ONNX Runtime (fp32): dense Linear vs LowRankLinear")
        print(format_table(["out x in", "fewer", "rank", "tokens", "median ms", "speed-up"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=list(TARGETS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.5], help="fractions of the targets' parameters removed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA_METHODS)
    parser.add_argument("--finetune-ratios", nargs="*", type=float, default=[0.3], help="ratios whose rows are also fine-tuned (default 0.3)")
    parser.add_argument("--ft-steps", type=int, default=40)
    parser.add_argument("--ft-batch", type=int, default=1)
    parser.add_argument("--ft-lr", type=float, default=1e-4, help="decoder fine-tune learning rate")
    parser.add_argument("--ft-lr-encoder", type=float, default=1e-4, help="encoder (distillation) fine-tune learning rate")
    parser.add_argument("--softlm-steps", type=int, default=30)
    parser.add_argument("--softlm-lr", type=float, default=5e-3)
    parser.add_argument("--min-layer-saving", type=float, default=0.1,
                        help="the passes' min_layer_saving: layers whose factors save less stay dense (0: only break-even; the runs before it existed)")
    parser.add_argument("--cal-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--cal-seq", type=int, default=256, help="decoder calibration window length (tokens)")
    parser.add_argument("--cal-seq-encoder", type=int, default=128, help="encoder calibration window length (tokens)")
    parser.add_argument("--sens-samples", type=int, default=8, help="windows with a backward pass for the Fisher sensitivities")
    parser.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows of 512 tokens, stride 512 (reference: 20)")
    parser.add_argument("--stsb-pairs", type=int, default=None, help="STS-B dev pairs (default all 1,500)")
    parser.add_argument("--no-target-run", dest="target_run", action="store_false", help="skip the end-to-end SmolLM2 target run")
    parser.add_argument("--target-method", default="softlm", choices=["softlm", "svd_llm", "asvd"])
    parser.add_argument("--target-fewer", type=float, default=0.3)
    parser.add_argument("--target-ft-steps", type=int, default=100, help="fine-tune steps of the target run")
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--latency-configs", nargs="*", default=["svd:0.3", "svd_llm:0.3"], help="METHOD:FEWER rows exported and timed")
    parser.add_argument("--latency-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--latency-seq", type=int, default=128)
    parser.add_argument("--latency-repeats", type=int, default=6, help="timed round-robin rounds (after one warm-up round)")
    parser.add_argument("--layer-repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads (1: no OpenMP oversubscription on a shared CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive_rank.json")
    args = parser.parse_args()
    args.latency_configs = {(c.split(":")[0], float(c.split(":")[1])) for c in args.latency_configs}

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items() if k != "out"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch_threads": args.threads},
        "models": [],
    }
    results["settings"]["out"] = str(args.out)
    for name in args.models:
        results["models"].append(run_model(name, args))
    if args.latency:
        results["layer_latency"] = layer_latency(args)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["host"]["load_average_end"] = os.getloadavg()
    print_tables(results)
    print(f"\ntotal {results['seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
