"""Infor-Coef on the SST-2-fine-tuned MiniLM (``minilm-sst2``): structured pruning, then
token downsampling, measured in ONNX Runtime next to the analytic FLOPs.

Rows (fp32 and dynamic int8 each): the unpruned fine-tuned model; ``structured_prune``;
``structured_prune`` + ``token_downsampling``; optionally (``lowrank``) the project's
``activation_svd`` (or ``svd``) pass on the same 36 linear layers at the pruned models'
encoder-layer parameter counts, healed with the pruning row's objective and step budget
(:func:`lowrank_rows`). For each: SST-2 dev accuracy in ONNX Runtime
(all 872 sentences, padded batches of 32), ORT CPU latency at batch 1 on real dev
sentences (2 threads, each sentence unpadded, median and mean over sentences), the
analytic encoder FLOPs per sentence (kept heads and dimensions, and the measured
kept-token count per layer on the same sentences), parameters, file size and training time.

Usage::

    python benchmarks/bench_infor_coef.py [--prune-steps 300] [--token-steps 200] [--sparsity 0.6]

Prints a table and writes ``benchmarks/results/infor_coef.json`` after every row.
Trained models are kept under ``--work`` so a rerun skips the training.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.data import shared_data_dir
from optimum_lowrank.evaluation.classification import ClassificationAccuracyEvaluator
from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb
from optimum_lowrank.exporters.quantize import quantize_onnx
from optimum_lowrank.exporters.runtime import make_session
from optimum_lowrank.layers.token_dropping import TokenDroppingEncoder
from optimum_lowrank.models import load_model
from optimum_lowrank.plugins import get_registry
from optimum_lowrank.tasks import load_labelled_tsv

RESULTS = ROOT / "benchmarks" / "results" / "infor_coef.json"


def encoder_flops(model, tokens_per_layer: list[float], length: float | None = None) -> float:
    """Multiply-adds x 2 of the encoder layers (and token predictors) for one sentence.

    ``tokens_per_layer[i]``: tokens layer ``i`` runs on; ``length``: the sentence's tokens
    (default ``tokens_per_layer[0]``). Per layer with ``n`` tokens and
    ``a = heads x head_dim``: ``2 n`` x the multiply-adds per token of its linear layers
    (dense: Q/K/V/O ``4 D a``, FFN ``2 D f``; a low-rank layer of rank ``r``: ``r (in + out)``),
    scores and context ``4 n^2 a``; a predictor adds ``2 x`` its linear
    layers' multiply-adds per token on the tokens it scores (those the previous layer ran
    on). Embedding look-ups, LayerNorms and the classifier are left out.
    """
    encoder = model.bert.encoder
    total = 0.0
    for i, layer in enumerate(encoder.layer):
        n = tokens_per_layer[i]
        attn = getattr(layer.attention, "self", None)
        a = 0 if attn is None else attn.num_attention_heads * attn.attention_head_size
        linear = sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
        total += 2 * n * linear + 4 * n * n * a
        if isinstance(encoder, TokenDroppingEncoder) and hasattr(encoder.predictors[i], "macs_per_token"):
            scored = tokens_per_layer[i - 1] if i else (length if length is not None else tokens_per_layer[0])
            total += 2 * scored * encoder.predictors[i].macs_per_token()
    return total


def token_counts(model, tokenizer, sentences: list[str]) -> list[list[float]]:
    """Per sentence, its token count followed by the tokens each layer runs on (batch 1, PyTorch eval)."""
    out = []
    encoder = model.bert.encoder
    with torch.inference_mode():
        for text in sentences:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
            model(**enc)
            n = enc["input_ids"].shape[1]
            if isinstance(encoder, TokenDroppingEncoder):
                kept = iter(encoder.stats["kept_tokens"])
                per, current = [float(n)], float(n)
                for p in encoder.predictors:
                    if hasattr(p, "net"):
                        current = next(kept)
                    per.append(current)
                out.append(per)
            else:
                out.append([float(n)] * (len(encoder.layer) + 1))
    return out


def latency(path: Path, tokenizer, sentences: list[str], threads: int = 2, rounds: int = 3) -> dict:
    """Batch-1 ORT latency over real sentences: per sentence the minimum of ``rounds`` runs (ms)."""
    return interleaved_latency({"graph": path}, tokenizer, sentences, threads, rounds)["graph"]


def interleaved_latency(paths: dict, tokenizer, sentences: list[str], threads: int = 2, rounds: int = 3) -> dict:
    """Batch-1 ORT latency of several graphs, interleaved: for each round, for each sentence, every
    graph runs once in turn, so load changes on the shared machine hit all graphs alike. Per graph
    and sentence the minimum over ``rounds``; median and mean over sentences (ms)."""
    sessions, feeds = {}, {}
    for key, path in paths.items():
        session = make_session(path, threads=threads)
        names = {i.name for i in session.get_inputs()}
        sessions[key] = session
        feeds[key] = []
        for text in sentences:
            enc = tokenizer(text, return_tensors="np", truncation=True, max_length=128)
            feeds[key].append({k: v.astype(np.int64) for k, v in enc.items() if k in names})
        for feed in feeds[key][:10]:
            session.run(None, feed)
    best = {key: [float("inf")] * len(sentences) for key in paths}
    for _ in range(rounds):
        for i in range(len(sentences)):
            for key, session in sessions.items():
                t0 = time.perf_counter()
                session.run(None, feeds[key][i])
                best[key][i] = min(best[key][i], (time.perf_counter() - t0) * 1e3)
    return {key: {"median_ms": statistics.median(t), "mean_ms": statistics.fmean(t)} for key, t in best.items()}


def train(base, recipe_passes, tokenizer, cache: Path):
    """Apply ``recipe_passes`` to a copy of ``base`` (or load the cached result)."""
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        return saved["model"], saved["seconds"], saved["notes"]
    registry = get_registry()
    model = copy.deepcopy(base)
    context = PassContext(kind="encoder", tokenizer=tokenizer, seed=0)
    seconds = {}
    for entry in recipe_passes:
        options = {k: v for k, v in entry.items() if k != "pass"}
        t0 = time.perf_counter()
        registry.get(entry["pass"])(options).run(model, context)
        seconds[entry["pass"]] = time.perf_counter() - t0
        print(f"  {entry['pass']}: {seconds[entry['pass']]:.0f} s", flush=True)
    model.eval()
    torch.save({"model": model, "seconds": seconds, "notes": context.notes}, cache)
    return model, seconds, context.notes


def measure(name, model, tokenizer, evaluator, sentences, seconds, notes, work: Path, rows: list, quantize=True) -> None:
    """Accuracy, FLOPs, size of ``model``'s fp32 (and int8) graphs; latency comes later (:func:`time_rows`)."""
    folder = work / name.replace(" ", "_").replace("=", "").replace("+", "plus").replace("(", "").replace(")", "")
    fp32 = export_onnx(model, folder, "text-classification")
    graphs = {"fp32": fp32}
    if quantize:
        graphs["int8"] = quantize_onnx(fp32, folder / "model_quantized.onnx", "dynamic_int8", per_channel=True, reduce_range=True)
        predictor_nodes = _predictor_nodes(fp32)
        if predictor_nodes:  # the keep/drop decisions are discrete: int8 noise in the predictor flips borderline tokens
            graphs["int8, predictors fp32"] = quantize_onnx(fp32, folder / "model_quantized_pred_fp32.onnx", "dynamic_int8",
                                                            per_channel=True, reduce_range=True, exclude_nodes=predictor_nodes)
    counts = token_counts(model, tokenizer, sentences)
    flops = statistics.fmean(encoder_flops(model, c[1:], c[0]) for c in counts)
    mean_tokens = [statistics.fmean(c[i] for c in counts) for i in range(1, len(counts[0]))]
    for precision, path in graphs.items():
        row = {
            "row": name, "precision": precision, "graph": str(path),
            "accuracy": evaluator.evaluate_onnx(path),
            "gflops": flops / 1e9, "tokens_per_layer": mean_tokens, "sentence_tokens": statistics.fmean(c[0] for c in counts),
            "params": count_parameters(model), "size_mb": onnx_size_mb(path),
            "train_seconds": seconds, "notes": notes,
        }
        rows.append(row)
        write(rows)
        print(f"{name:<34} {precision:<5} acc {row['accuracy']:6.2f}  {row['gflops']:.3f} GFLOPs  "
              f"{row['params'] / 1e6:5.2f} M  {row['size_mb']:6.1f} MB", flush=True)


def _predictor_nodes(path: Path) -> list[str]:
    """Names of the token-keep predictors' MatMul / Gemm nodes in an exported graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if "predictors" in n.name and n.op_type in ("MatMul", "Gemm")]


def time_rows(rows: list, tokenizer, sentences: list[str], rounds: int) -> None:
    """Latency of every row's graph, all graphs interleaved in one pass (see :func:`interleaved_latency`)."""
    import os

    todo = [r for r in rows if "graph" in r and "mean_ms" not in r]
    load = os.getloadavg()[0]
    times = interleaved_latency({i: Path(r["graph"]) for i, r in enumerate(todo)}, tokenizer, sentences, rounds=rounds)
    for i, row in enumerate(todo):
        row.update(times[i], latency_load_1min=[load, os.getloadavg()[0]])
        metric = f"acc {row['accuracy']:6.2f}" if "accuracy" in row else f"STS-B {row['stsb_spearman']:6.2f}"
        print(f"{row['row']:<34} {row['precision']:<5} {metric}  median {row['median_ms']:6.2f} ms  "
              f"mean {row['mean_ms']:6.2f} ms  {row['gflops']:.3f} GFLOPs", flush=True)
    write(rows)


def write(rows: list) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")


def machine() -> dict:
    import os

    return {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0], "torch_threads": torch.get_num_threads()}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options of both passes (shared with ``pilot_infor_coef.py``)."""
    parser.add_argument("--prune-steps", type=int, default=300)
    parser.add_argument("--token-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps after the units are removed")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--target-keep", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prune-lr", type=float, default=3e-5)
    parser.add_argument("--mask-lr", type=float, default=0.1)
    parser.add_argument("--sparsity-warmup", type=float, default=0.5)
    parser.add_argument("--distill-alpha", type=float, default=0.7)
    parser.add_argument("--token-lr", type=float, default=2e-5)
    parser.add_argument("--predictor-lr", type=float, default=1e-3)
    parser.add_argument("--token-layers", default="all", help="comma-separated layer indices that get a predictor, or 'all'")
    parser.add_argument("--predictor-hidden", type=int, default=None, help="predictor hidden width (default: D; 0: linear)")
    parser.add_argument("--predictor-init-bias", type=float, default=5.0)
    parser.add_argument("--calibrate-keep", action="store_true", help="token_downsampling's calibrate_keep")
    parser.add_argument("--token-finetune-steps", type=int, default=0, help="token_downsampling's finetune_steps (on the inference decisions)")
    parser.add_argument("--prune-anti-windup", action=argparse.BooleanOptionalAction, default=True,
                        help="structured_prune's anti_windup (off: the runs before 2026-12-03)")
    parser.add_argument("--token-anti-windup", action=argparse.BooleanOptionalAction, default=True, help="token_downsampling's anti_windup")
    parser.add_argument("--torch-threads", type=int, default=1, help="training threads (1: no OpenMP spinning on a shared CPU)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_infor_coef")


def pass_entries(args, train_tsv: str) -> tuple[dict, dict, str, str]:
    """The two recipe entries from the command line, and their cache tags (pruned, pruned + tokens)."""
    prune = {"pass": "structured_prune", "targets": ["re:bert\\.encoder\\.layer\\.\\d+"], "target_sparsity": args.sparsity,
             "data": train_tsv, "steps": args.prune_steps, "finetune_steps": args.finetune_steps, "batch_size": args.batch_size,
             "lr": args.prune_lr, "mask_lr": args.mask_lr, "sparsity_warmup": args.sparsity_warmup, "distill_alpha": args.distill_alpha,
             "anti_windup": args.prune_anti_windup}
    tokens = {"pass": "token_downsampling", "targets": ["bert.encoder"], "data": train_tsv, "steps": args.token_steps,
              "batch_size": args.batch_size, "target_keep": args.target_keep, "lr": args.token_lr, "predictor_lr": args.predictor_lr,
              "predictor_hidden": args.predictor_hidden, "predictor_init_bias": args.predictor_init_bias,
              "distill_alpha": args.distill_alpha, "calibrate_keep": args.calibrate_keep,
              "finetune_steps": args.token_finetune_steps, "anti_windup": args.token_anti_windup}
    if args.token_layers != "all":
        tokens["layers"] = [int(i) for i in args.token_layers.split(",")]
    tag = (f"s{args.sparsity}-p{args.prune_steps}-f{args.finetune_steps}-b{args.batch_size}-lr{args.prune_lr}"
           f"-m{args.mask_lr}-w{args.sparsity_warmup}-a{args.distill_alpha}" + ("-aw" if args.prune_anti_windup else ""))
    token_tag = (f"{tag}-tokens-k{args.target_keep}-t{args.token_steps}-lr{args.token_lr}-plr{args.predictor_lr}"
                 f"-L{args.token_layers.replace(',', '')}-h{args.predictor_hidden}-ib{args.predictor_init_bias}" + ("-cal" if args.calibrate_keep else "")
                 + (f"-tf{args.token_finetune_steps}" if args.token_finetune_steps else "") + ("-taw" if args.token_anti_windup else ""))
    return prune, tokens, f"pruned-{tag}.pt", f"pruned-{token_tag}.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser)
    parser.add_argument("--latency-sentences", type=int, default=200)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--dev-examples", type=int, default=None, help="only the first N dev sentences for accuracy (smoke tests)")
    parser.add_argument("--wait-saved", type=float, default=0.0,
                        help="wait up to this many seconds for each --saved folder's report.json (a run still going)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON written after every row (default: benchmarks/results/infor_coef.json)")
    parser.add_argument("--rows", default="original,pruned,pruned+tokens,tokens")
    parser.add_argument("--saved", type=Path, action="append", default=[],
                        help="also measure a model an `optimize --save-pytorch` run wrote (its OUTPUT folder; repeatable)")
    parser.add_argument("--lowrank-method", default="svd_llm",
                        help="lowrank rows, comma-separated: activation_svd's method (svd_llm, asvd) or the plain svd pass (svd)")
    parser.add_argument("--lowrank-layer-params", default="3406747,5584330",
                        help="lowrank rows: encoder-layer parameter counts to match, comma-separated "
                             "(default: the structured_prune models at 0.675 and 0.495 sparsity)")
    parser.add_argument("--lowrank-allocation", choices=("fisher", "relative", "absolute"), default="fisher",
                        help="activation_svd's allocation (ignored by svd)")
    parser.add_argument("--lowrank-min-layer-saving", type=float, default=0.1)
    parser.add_argument("--calibration-windows", type=int, default=64, help="lowrank rows: windows of 128 SST-2 train tokens")
    parser.add_argument("--heal-steps", type=int, default=None,
                        help="lowrank rows: healing steps (default: --prune-steps + --finetune-steps, the pruned row's budget)")
    parser.add_argument("--retime", type=Path, default=None,
                        help="only re-measure the latency of the graphs in this results JSON (interleaved), write --out")
    args = parser.parse_args()
    global RESULTS
    RESULTS = args.out or RESULTS
    torch.set_num_threads(args.torch_threads)
    args.work.mkdir(parents=True, exist_ok=True)
    data = shared_data_dir()
    train_tsv, dev_tsv = str(data / "sst2" / "train.tsv"), str(data / "sst2" / "dev.tsv")
    loaded = load_model("minilm-sst2")
    base, tokenizer = loaded.model, loaded.tokenizer
    if args.retime is not None:
        rows = json.loads(args.retime.read_text())["rows"]
        for row in rows:
            row.pop("mean_ms", None)
            row.pop("median_ms", None)
        time_rows(rows, tokenizer, load_labelled_tsv(dev_tsv).texts[: args.latency_sentences], args.latency_rounds)
        return
    dev = load_labelled_tsv(dev_tsv, max_rows=args.dev_examples)
    evaluator = ClassificationAccuracyEvaluator(tokenizer, dev, max_length=128)
    sentences = dev.texts[: args.latency_sentences]
    wanted = args.rows.split(",")
    unknown = set(args.lowrank_method.split(",")) - {"svd_llm", "asvd", "svd"}
    if unknown:
        parser.error(f"--lowrank-method: unknown {sorted(unknown)}; choose from svd_llm, asvd, svd")
    rows: list = []
    prune, tokens, pruned_cache, tokens_cache = pass_entries(args, train_tsv)
    print(f"{loaded.source}; torch accuracy {evaluator.evaluate_torch(base):.2f}", flush=True)
    if "original" in wanted:
        measure("original (minilm-sst2)", base, tokenizer, evaluator, sentences, {}, [], args.work, rows)
    if "pruned" in wanted or "pruned+tokens" in wanted:
        pruned, seconds, notes = train(base, [prune], tokenizer, args.work / pruned_cache)
        if "pruned" in wanted:
            measure(f"structured_prune s={args.sparsity}", pruned, tokenizer, evaluator, sentences, seconds, notes, args.work, rows)
        if "pruned+tokens" in wanted:
            both, seconds2, notes2 = train(pruned, [tokens], tokenizer, args.work / tokens_cache)
            measure(f"+ token_downsampling keep={args.target_keep}", both, tokenizer, evaluator, sentences,
                    {**seconds, **seconds2}, notes + notes2, args.work, rows)
    if "tokens" in wanted:
        only, seconds, notes = train(base, [tokens], tokenizer, args.work / tokens_cache.replace("pruned-", "tokens-only-"))
        measure(f"token_downsampling only keep={args.target_keep}", only, tokenizer, evaluator, sentences, seconds, notes, args.work, rows)
    if "lowrank" in wanted:
        for method in args.lowrank_method.split(","):
            lowrank_rows(args, method, base, tokenizer, evaluator, sentences, train_tsv, rows)
    for folder in args.saved:
        deadline = time.time() + args.wait_saved
        while not (folder / "report.json").is_file() and time.time() < deadline:
            time.sleep(15)
        if (folder / "pytorch").is_dir():
            measure_saved(folder, tokenizer, evaluator, sentences, args.work, rows)
        else:
            print(f"{folder}: no saved PyTorch model (the run failed or is still going); skipped", flush=True)
    time_rows(rows, tokenizer, sentences, args.latency_rounds)
    if "minilm-stsb" in wanted:
        stsb_rows(args, rows)
    print(f"wrote {RESULTS}")


LOWRANK_TARGETS = [("re:bert\\.encoder\\.layer\\.\\d+\\.(attention\\.self\\.(query|key|value)|attention\\.output\\.dense|"
                    "intermediate\\.dense|output\\.dense)")]


def lowrank_rows(args, method: str, base, tokenizer, evaluator, sentences, train_tsv: str, rows: list) -> None:
    """The low-rank rows of ``method``: for each ``--lowrank-layer-params`` count, the 36 linear layers of the encoder
    blocks factorised under one global budget (``target_params_ratio`` chosen so the encoder layers hold
    that many parameters, the LayerNorms and biases counted as kept), then healed with the pruning row's
    objective (task CE + logit distillation from the unpruned model, :class:`TaskObjective`) and its step
    budget (``--prune-steps`` + ``--finetune-steps`` steps of ``--batch-size`` at ``--prune-lr``, one
    warm-up + linear-decay schedule, :func:`finetune_weights`). Calibration: ``--calibration-windows`` windows
    of 128 tokens cut from the SST-2 train sentences."""
    from torch import nn

    from optimum_lowrank.api import resolve_targets
    from optimum_lowrank.data import token_windows
    from optimum_lowrank.passes.pruning.objective import TaskObjective, TrainingOptions, finetune_weights

    heal = args.heal_steps if args.heal_steps is not None else args.prune_steps + args.finetune_steps
    layers_before = count_parameters(base.bert.encoder.layer)
    linears = resolve_targets(base, tuple(LOWRANK_TARGETS), (nn.Linear,))
    linear_params = sum(count_parameters(m) for m in linears.values())
    text = " ".join(load_labelled_tsv(train_tsv).texts[:20000])
    windows = token_windows(tokenizer, text, 128, args.calibration_windows, strict=True)
    for goal in (int(x) for x in args.lowrank_layer_params.split(",")):
        ratio = (goal - (layers_before - linear_params)) / linear_params
        allocation = "" if method == "svd" else f"-{args.lowrank_allocation}"
        tag = (f"lowrank-{method}{allocation}-L{goal}-ms{args.lowrank_min_layer_saving}"
               f"-c{args.calibration_windows}-h{heal}-b{args.batch_size}-lr{args.prune_lr}-a{args.distill_alpha}")
        cache = args.work / f"{tag}.pt"
        if cache.is_file():
            saved = torch.load(cache, weights_only=False)
        else:
            entry = {"targets": LOWRANK_TARGETS, "target_params_ratio": ratio, "min_layer_saving": args.lowrank_min_layer_saving}
            if method == "svd":
                pass_name = "svd"  # its budget allocates by the weights' own spectra (no allocation option)
            else:
                pass_name = "activation_svd"
                entry.update(method=method, allocation=args.lowrank_allocation, progress=False)
            model = copy.deepcopy(base)
            context = PassContext(kind="encoder", tokenizer=tokenizer, calibration_loader=lambda: windows, seed=0)
            t0 = time.perf_counter()
            reports = get_registry().get(pass_name)(entry).run(model, context)
            compress_s = time.perf_counter() - t0
            before_heal = evaluator.evaluate_torch(model)
            print(f"  {pass_name} to {goal} layer params (ratio {ratio:.4f}): {compress_s:.0f} s, "
                  f"layer params {count_parameters(model.bert.encoder.layer)}, torch acc before healing {before_heal:.2f}", flush=True)
            options = TrainingOptions(data=train_tsv, steps=heal, batch_size=args.batch_size, lr=args.prune_lr,
                                      distill_alpha=args.distill_alpha)
            objective = TaskObjective(base, options, context)  # the teacher: the unpruned model
            t0 = time.perf_counter()
            losses = finetune_weights(model, objective, heal, args.prune_lr, "low-rank healing", progress=True)
            heal_s = time.perf_counter() - t0
            factorized = [r for r in reports if r.action == "factorized"]
            saved = {"model": model, "seconds": {pass_name: compress_s, "heal": heal_s},
                     "notes": [*context.notes, (f"{pass_name} {method if pass_name != 'svd' else ''} target_params_ratio "
                                                f"{ratio:.4f}: {len(factorized)}/{len(reports)} layers factorised, ranks "
                                                f"{[r.rank for r in reports]}; healed {heal} steps of {args.batch_size} at lr "
                                                f"{args.prune_lr}, {objective.description}, last loss {losses[-1]:.4f}")],
                     "accuracy_before_healing_torch": before_heal, "target_params_ratio": ratio,
                     "ranks": {r.name: (r.rank if r.action == "factorized" else None) for r in reports}}
            torch.save(saved, cache)
        model = saved["model"]
        start = len(rows)
        layer_params = count_parameters(model.bert.encoder.layer)
        measure(f"{method} {layer_params / 1e6:.2f} M layer params + heal", model, tokenizer, evaluator, sentences,
                saved["seconds"], saved["notes"], args.work, rows)
        for row in rows[start:]:
            row.update(layer_params=layer_params, layer_params_goal=goal, target_params_ratio=saved["target_params_ratio"],
                       accuracy_before_healing_torch=saved["accuracy_before_healing_torch"], ranks=saved["ranks"])
        write(rows)


def measure_saved(folder: Path, tokenizer, evaluator, sentences, work: Path, rows: list) -> None:
    """Measure the PyTorch model an ``optimize --save-pytorch`` run saved (training seconds from its report.json)."""
    from optimum_lowrank.saving import from_pretrained

    model = from_pretrained(folder)
    report = json.loads((folder / "report.json").read_text())
    seconds = {p["pass_id"]: p["seconds"] for p in report.get("passes", [])}
    name = "recipe " + "+".join(seconds) + f" ({folder.name})"
    measure(name, model, tokenizer, evaluator, sentences, seconds, report.get("notes", []), work, rows)


def stsb_rows(args, rows: list) -> None:
    """The sentence-embedding MiniLM: structured_prune on the distillation objective
    (mean-pooled outputs of the original on STS-B train sentences), gated on STS-B dev."""
    from optimum_lowrank.data import load_sts_pairs, token_windows
    from optimum_lowrank.evaluation.sentence import STSBEvaluator

    data = shared_data_dir()
    loaded = load_model("minilm")
    pairs = load_sts_pairs(data / "stsb" / "sts-dev.tsv")
    evaluator = STSBEvaluator(loaded.tokenizer, pairs, pairs_description="sts-dev.tsv")
    train_text = " ".join(s for a, b, _ in load_sts_pairs(data / "stsb" / "sts-train.tsv") for s in (a, b))
    windows = token_windows(loaded.tokenizer, train_text, 32, 4096)
    sentences = [a for a, _, _ in pairs[: args.latency_sentences]]
    entry = {"pass": "structured_prune", "targets": ["re:encoder\\.layer\\.\\d+"], "target_sparsity": args.sparsity,
             "steps": args.prune_steps, "finetune_steps": args.finetune_steps, "batch_size": 32, "lr": args.prune_lr,
             "mask_lr": args.mask_lr, "sparsity_warmup": args.sparsity_warmup, "distill_hidden": 1.0}
    cache = args.work / f"minilm-stsb-s{args.sparsity}-p{args.prune_steps}-f{args.finetune_steps}-lr{args.prune_lr}.pt"
    for name, model, seconds in (("minilm (sentence embedding)", loaded.model, {}),):
        _stsb_measure(name, model, loaded.tokenizer, evaluator, sentences, seconds, args.work, rows)
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        pruned, seconds = saved["model"], saved["seconds"]
    else:
        pruned = copy.deepcopy(loaded.model)
        context = PassContext(kind="encoder", tokenizer=loaded.tokenizer, calibration_loader=lambda: windows, seed=0)
        t0 = time.perf_counter()
        get_registry().get("structured_prune")({k: v for k, v in entry.items() if k != "pass"}).run(pruned, context)
        seconds = {"structured_prune": time.perf_counter() - t0}
        torch.save({"model": pruned, "seconds": seconds}, cache)
    _stsb_measure(f"minilm structured_prune s={args.sparsity} (distill)", pruned, loaded.tokenizer, evaluator, sentences, seconds, args.work, rows)
    time_rows(rows, loaded.tokenizer, sentences, args.latency_rounds)


def _stsb_measure(name, model, tokenizer, evaluator, sentences, seconds, work: Path, rows: list) -> None:
    folder = work / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
    fp32 = export_onnx(model, folder, "feature-extraction")
    graphs = {"fp32": fp32, "int8": quantize_onnx(fp32, folder / "model_quantized.onnx", "dynamic_int8")}
    width = model.config.hidden_size
    flops = 0.0
    for text in sentences:
        n = tokenizer(text, return_tensors="pt")["input_ids"].shape[1]
        for layer in model.encoder.layer:
            attn = getattr(layer.attention, "self", None)
            a = 0 if attn is None else attn.num_attention_heads * attn.attention_head_size
            f = getattr(getattr(layer.intermediate, "dense", None), "out_features", 0)
            flops += 8 * n * width * a + 4 * n * n * a + 4 * n * width * f
    for precision, path in graphs.items():
        row = {"row": name, "precision": precision, "graph": str(path), "stsb_spearman": evaluator.evaluate_onnx(path),
               "gflops": flops / len(sentences) / 1e9,
               "params": count_parameters(model), "size_mb": onnx_size_mb(path), "train_seconds": seconds}
        rows.append(row)
        RESULTS.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
        print(f"{name:<34} {precision:<5} STS-B {row['stsb_spearman']:6.2f}  {row['gflops']:.3f} GFLOPs  {row['size_mb']:6.1f} MB",
              flush=True)


if __name__ == "__main__":
    main()
