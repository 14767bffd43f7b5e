"""Short pilot runs for ``bench_infor_coef.py``: train one pass with the benchmark's options
and print PyTorch SST-2 dev accuracy, kept tokens per layer and analytic FLOPs.

The trained model goes to the benchmark's cache (``--work``, same file names), so a
benchmark run with the same options measures it without training again (the stored
training seconds are reported).

Usage::

    python benchmarks/pilot_infor_coef.py --stage prune --prune-steps 200 --prune-lr 1e-4 ...
    python benchmarks/pilot_infor_coef.py --stage tokens ...   # on the pruned model of the same options

Appends one JSON line per run to ``benchmarks/results/infor_coef_pilots.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_infor_coef import ROOT, add_training_arguments, encoder_flops, pass_entries, token_counts, train  # noqa: E402

from optimum_lowrank.data import shared_data_dir  # noqa: E402
from optimum_lowrank.evaluation.classification import ClassificationAccuracyEvaluator  # noqa: E402
from optimum_lowrank.models import load_model  # noqa: E402
from optimum_lowrank.tasks import load_labelled_tsv  # noqa: E402

LOG = ROOT / "benchmarks" / "results" / "infor_coef_pilots.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser)
    parser.add_argument("--stage", choices=["prune", "tokens", "tokens-only"], required=True)
    parser.add_argument("--sentences", type=int, default=100, help="dev sentences for the token counts and FLOPs")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    args.work.mkdir(parents=True, exist_ok=True)
    data = shared_data_dir()
    train_tsv = str(data / "sst2" / "train.tsv")
    loaded = load_model("minilm-sst2")
    base, tokenizer = loaded.model, loaded.tokenizer
    dev = load_labelled_tsv(str(data / "sst2" / "dev.tsv"))
    evaluator = ClassificationAccuracyEvaluator(tokenizer, dev, max_length=128)
    prune, tokens, pruned_cache, tokens_cache = pass_entries(args, train_tsv)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    if args.stage == "prune":
        model, seconds, notes = train(base, [prune], tokenizer, args.work / pruned_cache)
    elif args.stage == "tokens":
        pruned, _, _ = train(base, [prune], tokenizer, args.work / pruned_cache)
        model, seconds, notes = train(pruned, [tokens], tokenizer, args.work / tokens_cache)
    else:
        model, seconds, notes = train(base, [tokens], tokenizer, args.work / tokens_cache.replace("pruned-", "tokens-only-"))
    counts = token_counts(model, tokenizer, dev.texts[: args.sentences])
    record = {
        "stage": args.stage, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch_accuracy": evaluator.evaluate_torch(model), "train_seconds": seconds, "wall_seconds": time.perf_counter() - t0,
        "gflops": statistics.fmean(encoder_flops(model, c[1:], c[0]) for c in counts) / 1e9,
        "tokens_per_layer": [round(statistics.fmean(c[i] for c in counts), 2) for i in range(len(counts[0]))],
        "load_1min_start": load, "load_1min_end": os.getloadavg()[0], "notes": notes,
    }
    print(json.dumps(record), flush=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
