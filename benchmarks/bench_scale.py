"""Scale benchmark: sequential onloading, calibration over two processes, peak memory.

Rows (each in a fresh subprocess, so its peak resident memory, ``getrusage(RUSAGE_SELF).ru_maxrss``,
is its own):

- ``llama3b_build``: a randomly initialised Llama-shaped model of ~3.0 B parameters (hidden 3072,
  intermediate 8192, 28 blocks, 24 heads, 8 key/value heads, vocabulary 32,000, untied head)
  written as sharded bf16 safetensors (4 blocks per shard) under ``--workdir``; nothing committed.
- ``llama3b_sequential``: activation-aware SVD (``svd_llm``, rank_ratio 0.25, all seven
  projections of every block) in sequential mode, ``--blocks`` blocks of that model (a config with
  ``num_hidden_layers = --blocks`` beside symbolic links to the same shards: the embeddings, head
  and the first blocks are read exactly as in the full model). Peak memory, resident memory after
  each block (flat: each block is freed) and seconds per block; the full-model time is
  extrapolated as seconds/block x 28 and labelled so. ``--partial FILE`` rewrites FILE after every
  block (seconds, resident memory before and after ``malloc_trim(0)``, peak so far, load average),
  so a run cut short still leaves its blocks; ``--timings`` adds the seconds of each step of the
  block (read, calibration forward, Gram, Cholesky, W @ L, SVD, triangular solve, write).
- ``smollm2_whole`` / ``smollm2_sequential``: ``optimize("smollm2", ...)`` with the same
  activation_svd recipe (no export; ``--windows`` WikiText-2 valid windows of ``--seq-len``
  tokens), execution mode whole vs sequential: peak memory, wall time, and every layer's rank and
  relative error (compare them across the two rows).
- ``smollm2_2proc``: the sequential recipe under ``torchrun --nproc-per-node 2`` (gloo); the
  factors are compared with ``smollm2_sequential``'s (relative Frobenius error of each A @ B).

Usage
-----
    python benchmarks/bench_scale.py --rows llama3b_build llama3b_sequential --blocks 3
    python benchmarks/bench_scale.py --child llama3b_sequential --blocks 28 --partial out.json --timings --progress
    python benchmarks/bench_scale.py --rows smollm2_whole smollm2_sequential smollm2_2proc
    python benchmarks/bench_scale.py --markdown

Results: ``benchmarks/results/scale.json``, rewritten after every row (rows not run now are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
DATA = Path(os.environ.get("OPTIMUM_LOWRANK_DATA", ROOT.parent / "shared" / "data"))

LLAMA3B = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
           "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
TARGETS = ["re:model\\.layers\\.\\d+\\..*_proj"]


def _rss() -> tuple[float, float]:
    import resource

    import psutil

    return psutil.Process().memory_info().rss / 1e6, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _libc():
    """glibc (for ``malloc_trim``), or None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _install_timers() -> dict[str, float]:
    """Wrap the per-block steps with wall-clock accumulators (seconds since the last reset, by step).

    ``calibration_forward`` contains ``gram`` (the statistics hooks run inside the block's forward);
    the other steps do not nest. The wrappers add a ``perf_counter`` pair per call, nothing else.
    """
    import torch

    import optimum_lowrank.execution.sequential as engine
    from optimum_lowrank.execution.checkpoint import SourceCheckpoint
    from optimum_lowrank.linalg.whitening import InputStatistics, InputTransform

    totals: dict[str, float] = {}

    def timed(owner, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, wrapper)

    timed(SourceCheckpoint, "read", "read_bf16_to_fp32")
    timed(engine, "run_block", "calibration_forward")
    timed(InputStatistics, "update", "gram")
    timed(torch.linalg, "cholesky_ex", "cholesky")
    timed(InputTransform, "right", "weight_times_L")
    timed(torch.linalg, "svd", "svd")
    timed(torch.linalg, "solve_triangular", "triangular_solve")
    timed(engine, "_write", "write")
    return totals


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- rows (run in a child process)


def row_llama3b_build(args) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = Path(args.workdir) / "llama3b"
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**LLAMA3B, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    g = torch.Generator().manual_seed(0)
    started, params, weight_map = time.perf_counter(), 0, {}
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def write(name, tensors):
        nonlocal params
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        params += sum(t.numel() for t in tensors.values())

    write("model-embed.safetensors", {"model.embed_tokens.weight": rand(config.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                      "lm_head.weight": rand(config.vocab_size, h)})
    for first in range(0, config.num_hidden_layers, 4):
        shard = {}
        for i in range(first, min(first + 4, config.num_hidden_layers)):
            p = f"model.layers.{i}."
            shard |= {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h), p + "self_attn.v_proj.weight": rand(kv, h),
                      p + "self_attn.o_proj.weight": rand(h, h), p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                      p + "mlp.down_proj.weight": rand(h, f), p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        write(f"model-blocks-{first:02d}.safetensors", shard)
        del shard
    config.save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"folder": str(folder), "params": params, "bf16_gb": size / 1e9, "seconds": time.perf_counter() - started}


def row_llama3b_sequential(args) -> dict:
    import torch

    from optimum_lowrank.execution.checkpoint import SourceCheckpoint
    from optimum_lowrank.execution.sequential import compress_sequentially
    from optimum_lowrank.passes.linear.activation_svd import ActivationSVDPass
    from optimum_lowrank.testing import tiny_context

    full = Path(args.workdir) / "llama3b"
    if not (full / "config.json").is_file():
        raise SystemExit(f"run the llama3b_build row first ({full} missing)")
    subset = Path(args.workdir) / f"llama3b-first{args.blocks}"
    subset.mkdir(exist_ok=True)
    config = json.loads((full / "config.json").read_text())
    (subset / "config.json").write_text(json.dumps({**config, "num_hidden_layers": args.blocks}))
    for shard in full.glob("*.safetensors"):
        link = subset / shard.name
        if not link.exists():
            link.symlink_to(shard)
    out = Path(args.workdir) / f"llama3b-compressed-{args.blocks}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir()
    context = tiny_context(vocab_size=config["vocab_size"], num_samples=args.windows, seq_len=args.seq_len, kind="decoder")
    partial = Path(args.partial) if args.partial else None
    blocks: list[dict] = []
    after_block, after_trim = [], []
    libc = _libc()
    timers = _install_timers() if args.timings else None
    source = SourceCheckpoint(subset)
    started = time.perf_counter()

    def on_block(i: int, block_seconds: float) -> None:  # after block i is written, sent back to meta and gc.collect()ed
        rss = round(_rss()[0], 1)
        trimmed = rss
        if libc is not None:  # glibc returns freed heap pages to the OS: what stays is live (or fragmented) memory
            libc.malloc_trim(0)
            trimmed = round(_rss()[0], 1)
        after_block.append(rss)
        after_trim.append(trimmed)
        blocks.append({"block": i, "seconds": round(block_seconds, 1), "rss_mb": rss, "rss_after_malloc_trim_mb": trimmed,
                       "peak_rss_mb_so_far": round(_rss()[1], 1), "load": _load(), "elapsed_s": round(time.perf_counter() - started, 1)})
        if timers is not None:
            blocks[-1]["step_seconds"] = {k: round(v, 1) for k, v in timers.items()}  # block 0 includes the non-block read and capture
            timers.clear()
        if partial is not None:
            partial.write_text(json.dumps({"row": "llama3b_sequential", "blocks_in_run": args.blocks, "threads": torch.get_num_threads(),
                                           "calibration": f"{args.windows} random-token windows x {args.seq_len} tokens",
                                           "command": " ".join(sys.argv), "blocks": blocks}, indent=1))
        print(json.dumps(blocks[-1]), file=sys.stderr, flush=True)

    result = compress_sequentially(source, [ActivationSVDPass({"targets": TARGETS, "rank_ratio": 0.25, "progress": args.progress})], context, out,
                                   kind="decoder", on_block=on_block)
    seconds = time.perf_counter() - started
    per_block = result.block_seconds
    full_params = SourceCheckpoint(full).numel()
    run_params = source.numel([n for n in source.where if any(n.startswith(f"model.layers.{i}.") for i in range(args.blocks))])
    return {
        "blocks_run": args.blocks, "blocks_in_model": config["num_hidden_layers"], "model_params": full_params,
        "calibration": f"{args.windows} random-token windows x {args.seq_len} tokens", "threads": torch.get_num_threads(),
        "peak_rss_mb": _rss()[1], "rss_after_each_block_mb": after_block, "rss_after_each_block_malloc_trim_mb": after_trim,
        "seconds_per_block": [round(s, 1) for s in per_block], "load_after_each_block": [b["load"] for b in blocks],
        "seconds_total_run": seconds, "layers_factorized": sum(r.action == "factorized" for r in result.layers[0]),
        "extrapolated_seconds_all_blocks": (sum(per_block) / len(per_block)) * config["num_hidden_layers"],
        "params_blocks_run_before_after": [run_params, run_params - sum(r.params_before - r.params_after for r in result.layers[0])],
    }


def _smollm2_recipe(mode: str, args) -> dict:
    return {"version": 1, "calibration": {"data": str(DATA / "wikitext-2" / "wiki.valid.tokens"), "num_samples": args.windows, "seq_len": args.seq_len},
            "passes": [{"pass": "activation_svd", "targets": TARGETS, "rank_ratio": 0.25}], "execution": {"mode": mode}}


def _layers(report) -> list:
    return [(l.name, l.rank, l.metrics.get("relative_output_error")) for p in report.passes for l in p.layers]


def row_smollm2(args, mode: str) -> dict:
    from optimum_lowrank import optimize

    out = Path(args.workdir) / f"smollm2-{mode}"
    started = time.perf_counter()
    report = optimize("smollm2", _smollm2_recipe(mode, args), out if mode == "sequential" else None, overwrite=True, progress=False)
    return {"mode": mode, "calibration": f"{args.windows} WikiText-2 valid windows x {args.seq_len} tokens",
            "seconds": time.perf_counter() - started, "peak_rss_mb": _rss()[1], "params_before": report.params_before,
            "params_after": report.params_after, "pass_seconds": report.passes[0].seconds, "layers": _layers(report), "notes": report.notes}


def row_smollm2_2proc(args) -> dict:
    import torch
    import yaml

    from optimum_lowrank.execution import load_compressed
    from optimum_lowrank.layers.lowrank import LowRankLinear

    recipe = Path(args.workdir) / "smollm2-sequential.yaml"
    recipe.write_text(yaml.safe_dump(_smollm2_recipe("sequential", args)))
    out = Path(args.workdir) / "smollm2-2proc"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "optimum_lowrank.cli", "optimize",
           "--model", "smollm2", "--recipe", str(recipe), "--output", str(out), "--overwrite", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed ({proc.returncode}): {proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    one = Path(args.workdir) / "smollm2-sequential" / "checkpoint"
    errors = {}
    with torch.no_grad():
        a, b = load_compressed(one), load_compressed(out / "checkpoint")
        got = dict(b.named_modules())
        for name, module in a.named_modules():
            if isinstance(module, LowRankLinear):
                ref = module.up.weight @ module.down.weight
                errors[name] = float((got[name].up.weight @ got[name].down.weight - ref).norm() / ref.norm())
    return {"command": " ".join(cmd[1:]), "seconds_wall_torchrun": seconds, "notes": report["notes"], "params_after": report["params_after"],
            "max_relative_product_error_vs_1proc": max(errors.values()), "layers_compared": len(errors)}


ROWS = {
    "llama3b_build": row_llama3b_build,
    "llama3b_sequential": row_llama3b_sequential,
    "smollm2_whole": lambda a: row_smollm2(a, "whole"),
    "smollm2_sequential": lambda a: row_smollm2(a, "sequential"),
    "smollm2_2proc": row_smollm2_2proc,
}


# ----------------------------------------------------------------------------- driver


def _save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str))


def markdown(results: dict) -> str:
    lines = ["| row | peak RSS MB | seconds | detail |", "| --- | --- | --- | --- |"]
    for name, row in results.get("rows", {}).items():
        if "error" in row:
            lines.append(f"| {name} | - | - | failed: {row['error'][:120]} |")
            continue
        detail = {k: v for k, v in row.items() if k not in ("layers", "notes", "peak_rss_mb", "seconds", "load_before", "load_after")}
        seconds = row.get("seconds", row.get("seconds_total_run", row.get("seconds_wall_torchrun", "-")))
        rss = row.get("peak_rss_mb", "-")
        lines.append(f"| {name} | {rss if rss == '-' else f'{rss:,.0f}'} | {seconds if seconds == '-' else f'{seconds:.1f}'} | "
                     f"{json.dumps(detail, default=str)[:400]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=[], choices=list(ROWS))
    parser.add_argument("--workdir", default="/tmp/bench_scale")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--partial", help="llama3b_sequential: rewrite this JSON file after every block (per-block seconds, RSS, load)")
    parser.add_argument("--timings", action="store_true", help="llama3b_sequential: seconds per step of each block (read, forward, Gram, SVD ...)")
    parser.add_argument("--progress", action="store_true", help="llama3b_sequential: the pass's progress bars on stderr")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ROWS[args.child](args), default=str))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    if args.markdown:
        print(markdown(results))
        return
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for name in args.rows:
        cmd = [sys.executable, __file__, "--child", name, "--workdir", args.workdir, "--blocks", str(args.blocks),
               "--windows", str(args.windows), "--seq-len", str(args.seq_len)] + (["--partial", args.partial] if args.partial else []) \
            + (["--progress"] if args.progress else []) + (["--timings"] if args.timings else [])
        load_before, started = _load(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        if proc.returncode == 0:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row = {"error": proc.stderr[-2000:]}
        row |= {"load_before": load_before, "load_after": _load(), "child_wall_seconds": time.perf_counter() - started,
                "command": row.get("command", " ".join(cmd[1:]))}
        results["rows"][name] = row
        _save(results)
        print(f"{name}: {'failed' if 'error' in row else 'done'} in {row['child_wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
