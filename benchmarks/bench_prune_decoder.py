"""A short real check of ``structured_prune`` on a Llama-like decoder (SmolLM2-135M), issue 12 item 2.

Prunes query-head slots and FFN dimensions of every block towards ``--sparsity`` with a few
distillation steps (next-token KL to the unpruned model) on windows of WikiText-2 valid,
then reports parameters, WikiText-2 raw test perplexity (8 windows of 512, stride 512: the
windows of ``bench_lowrank_targets.py``) before and after, in PyTorch and in ONNX Runtime on
the ``text-generation-with-past`` export, and the export's parity with PyTorch (the
pipeline's tolerance: atol 1e-3 + rtol 1e-4 of the largest logit).

    OPTIMUM_LOWRANK_DATA=../shared/data python benchmarks/bench_prune_decoder.py --steps 30 \\
        --out benchmarks/results/prune_decoder_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OPTIMUM_LOWRANK_DATA", ROOT.parent / "shared" / "data"))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--windows", type=int, default=64, help="calibration windows of WikiText-2 valid")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--mask-lr", type=float, default=0.2)
    parser.add_argument("--droprate-init", type=float, default=0.05,
                        help="initial closing probability (CoFi: 0.5; 0.5 closes ~17%% of the units at random before training)")
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from optimum_lowrank.api import PassContext, count_parameters
    from optimum_lowrank.data import load_text, token_windows
    from optimum_lowrank.evaluation import PerplexityEvaluator
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
    from optimum_lowrank.exporters.parity import check_parity
    from optimum_lowrank.models import load_model
    from optimum_lowrank.passes.pruning.structured import StructuredPrunePass

    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
                    "load_average_start": os.getloadavg()}
    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    cal_text, cal_desc = load_text(DATA / "wikitext-2" / "wiki.valid.tokens")
    ids = token_windows(tok, cal_text, args.seq, args.windows)
    context = PassContext(kind="decoder", tokenizer=tok, calibration_loader=lambda: ids, seed=0)
    test_text, test_desc = load_text(DATA / "wikitext-2-raw" / "wiki.test.raw")
    evaluator = PerplexityEvaluator(tok, test_text, seq_len=512, stride=512, max_windows=args.ppl_windows,
                                    text_description=test_desc, threads=args.threads)
    result.update(evaluation=evaluator.description, training_data=f"{cal_desc}: {len(ids)} windows of {args.seq} tokens",
                  params_before=count_parameters(model))
    started = time.perf_counter()
    result["ppl_before"] = evaluator.evaluate_torch(model)
    log(f"original perplexity {result['ppl_before']:.3f} ({time.perf_counter() - started:.0f} s)")

    options = {"targets": ["re:model\\.layers\\.\\d+"], "target_sparsity": args.sparsity, "steps": args.steps,
               "finetune_steps": args.finetune_steps, "batch_size": args.batch_size, "max_length": args.seq, "lr": args.lr,
               "mask_lr": args.mask_lr, "droprate_init": args.droprate_init}
    result["options"] = options
    cpu0, wall0 = cpu_s(), time.perf_counter()
    reports = StructuredPrunePass(options).run(model, context)
    result["prune_cpu_s"], result["prune_wall_s"] = cpu_s() - cpu0, time.perf_counter() - wall0
    result["notes"] = context.notes
    result["params_after"] = count_parameters(model)
    result["layers"] = [{"name": r.name, "params_before": r.params_before, "params_after": r.params_after, "note": r.note}
                        for r in reports]
    log(f"pruned in {result['prune_wall_s']:.0f} s wall / {result['prune_cpu_s']:.0f} s CPU: "
        f"{result['params_before']:,} -> {result['params_after']:,} parameters")
    result["ppl_after"] = evaluator.evaluate_torch(model)
    log(f"pruned perplexity {result['ppl_after']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "onnx", onnx_task(model))
        result["onnx_task"] = onnx_task(model)
        result["onnx_mb"] = onnx_size_mb(path)
        parity = check_parity(model, path, atol=1e-3, rtol=1e-4, seq_lengths=(8, 32), vocab_size=model.config.vocab_size)
        result["parity_passed"], result["parity_max_abs_diff"] = parity.passed, parity.max_abs_diff
        result["ppl_after_onnx"] = evaluator.evaluate_onnx(path)
    log(f"export: parity {parity.passed} (max diff {parity.max_abs_diff:.2e}), ORT perplexity {result['ppl_after_onnx']:.3f}")
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
