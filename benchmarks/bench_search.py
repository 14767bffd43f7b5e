"""Search benchmark: the smallest quantized ONNX graph within a budget, on the real models.

Runs :func:`optimum_lowrank.search.search` (cold: a fresh sensitivity / reference cache per run, so
the seconds are a first run's) and records the chosen graph's size, its metric on the search split
and on the gate split, the fp32 original and ONNX Runtime's stock dynamic int8 (same run), every
verified candidate and the time of each step. ``--recipes`` also runs the shipped hand-written
recipes through ``optimize()`` for the size-accuracy comparison.

Runs
----
- ``minilm-max-drop-1``: MiniLM, ``max_drop: 1.0`` (STS-B Spearman points; search on STS-B train,
  gate on STS-B dev); target <= 8 MB, <= 10 minutes on 2 cores.
- ``minilm-size-6`` / ``minilm-size-10`` / ``minilm-size-7.4``: MiniLM, best STS-B within 6 / 10 / 7.4 MB (7.4: the size of the hand-written ``minilm-edge.yaml``); ``minilm-size-6-wide``: 6 MB
  with 2-bit layers and embedding ratio 20 allowed as well.
- ``smollm2-max-increase-5``: SmolLM2-135M, ``max_increase: 0.05`` (WikiText-2 perplexity; search on
  valid, gate on raw test, 20 windows of 512); target <= 100 MB, <= 30 minutes. ``smollm2-max-increase-5-hqq``:
  the same with ``algorithms: [rtn, hqq]``.

Usage
-----
    .venv/bin/python benchmarks/bench_search.py --runs minilm-max-drop-1 minilm-size-6 minilm-size-10
    .venv/bin/python benchmarks/bench_search.py --runs smollm2-max-increase-5 --merge
    .venv/bin/python benchmarks/bench_search.py --runs --recipes minilm --out benchmarks/results/search_recipes.json
    .venv/bin/python benchmarks/bench_search.py --markdown

Results: ``benchmarks/results/search.json`` (rewritten after every run; ``--merge`` keeps the rows
not run now); outputs (onnx/, recipe.yaml, search.json, plots) in ``out/search/<run>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "search.json"
WORK = ROOT / "out" / "search"

RUNS = {
    "minilm-max-drop-1": ("minilm", {"max_drop": 1.0}),
    "minilm-size-6": ("minilm", {"size_mb": 6.0}),
    "minilm-size-10": ("minilm", {"size_mb": 10.0}),
    # the size of the hand-written recipes/minilm-edge.yaml (7.39 MB): the search's accuracy at equal size
    "minilm-size-7.4": ("minilm", {"size_mb": 7.4}),
    # the default space cannot reach 6 MB (smallest point about 6.8 MB): add 2-bit layers and ratio 20
    "minilm-size-6-wide": ("minilm", {"size_mb": 6.0, "bits": [8, 4, 2], "embedding_ratios": [1, 2.5, 5, 10, 20]}),
    "smollm2-max-increase-5": ("smollm2", {"max_increase": 0.05}),
    # HQQ (float zero points) as a second algorithm: smaller on this Q4_1-derived model, but slow to decode
    "smollm2-max-increase-5-hqq": ("smollm2", {"max_increase": 0.05, "algorithms": ["rtn", "hqq"]}),
    # the same after the cross-check round was added (run.py: _cross_check)
    "smollm2-max-increase-5-hqq-xc": ("smollm2", {"max_increase": 0.05, "algorithms": ["rtn", "hqq"]}),
}
SHIPPED = {
    "minilm": ["minilm-edge.yaml", "minilm-svd.yaml", "minilm-embeddings-10x.yaml", "minilm-tt-embedding.yaml",
               "minilm-autoencoder-embedding.yaml", "minilm-softlm.yaml"],
    "smollm2": ["smollm2-edge.yaml", "smollm2-edge-int8.yaml", "smollm2-int8.yaml", "smollm2-svd-llm.yaml"],
}


def write(rows: list[dict], path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, path)


def run_search(name: str, args, suffix: str = "") -> dict:
    from optimum_lowrank.errors import ObjectiveNotMetError
    from optimum_lowrank.search import search

    model, config = RUNS[name]
    with tempfile.TemporaryDirectory(prefix="search-cache-") as cache:
        if not args.warm:
            os.environ["OPTIMUM_LOWRANK_CACHE"] = cache
        t0 = time.perf_counter()
        try:
            report = search(model, {**config, "seed": args.seed}, WORK / f"{name}{suffix}", overwrite=True)
        except ObjectiveNotMetError as err:
            return {"run": name, "model": model, "objective": config, "error": str(err), "best": err.best,
                    "candidates": err.candidates, "seconds": time.perf_counter() - t0}
        seconds = time.perf_counter() - t0
    data = report.to_json()
    c, refs = data["chosen"], data["references"]
    return {
        "run": name, "model": model, "objective": config, "seconds": seconds, "step_seconds": data["seconds"],
        "size_mb": c["size_mb"], "predicted_mb": c["predicted_mb"], "search_metric": c["search_metric"], "search_damage": c["search_damage"],
        "gate_metric": c["gate_metric"], "gate_damage": c["gate_damage"], "gate_passed": c["gate_passed"],
        "embedding_ratio": c["embedding_ratio"], "embedding_bits": c["embedding_bits"], "layers_per_bits": c["layers_per_bits"],
        "original_fp32": refs["original_fp32"], "dynamic_int8": refs["dynamic_int8"], "metric": data["metric"],
        "search_data": data["search_data"], "gate_data": data["gate_data"], "candidates": data["candidates"],
        "sensitivity": data["sensitivity"], "damage_model": data["damage_model"], "block_size": data["block_size"],
        "block_predictions": data["block_predictions"], "algorithm": data["algorithm"], "bits": c["bits"], "output": str(WORK / f"{name}{suffix}"),
    }


def same_result(a: dict, b: dict) -> bool:
    """Whether two runs of one search verified the same candidates with the same scores and chose the same graph."""
    def key(row):
        return [(c["path_index"], c["size_mb"], c["search_metric"]) for c in row.get("candidates", [])], row.get("bits"), row.get("gate_metric")

    return key(a) == key(b)


def run_recipe(model: str, recipe: str) -> dict:
    from optimum_lowrank import optimize
    from optimum_lowrank.errors import AccuracyError

    t0 = time.perf_counter()
    try:
        report = optimize(model, ROOT / "recipes" / recipe, WORK / f"recipe-{Path(recipe).stem}", overwrite=True)
    except AccuracyError as err:
        report = err.report
    acc, export = report.accuracy, report.export
    sizes = export.sizes_mb if export else {}
    return {"run": f"recipe:{recipe}", "model": model, "seconds": time.perf_counter() - t0,
            "size_mb": sizes.get("onnx/model_quantized.onnx", sizes.get("onnx/model.onnx")),
            "gate_metric": acc.onnx_quantized if acc and acc.onnx_quantized is not None else (acc.onnx_fp32 if acc else None),
            "original": acc.original if acc else None, "quantize": export.quantization if export else None}


def markdown(path: Path) -> None:
    data = json.loads(path.read_text())
    print(f"machine: {data['meta'].get('machine')}\n")
    print("| run | objective | size MB | search split | gate split (original fp32) | dynamic int8 MB / gate | embedding | bits | candidates | search s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in data["rows"]:
        if r["run"].startswith("recipe:"):
            continue
        if "identical_to_first_run" in r:
            print(f"| {r['run']} | determinism check: identical candidates, allocation and gate figure: {r['identical_to_first_run']} "
                  f"| | | | | | | {len(r.get('candidates', []))} | {r['seconds']:.0f} |")
            continue
        objective = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in r["objective"].items())
        if "error" in r:
            print(f"| {r['run']} | {objective} | - | error: {r['error'][:120]} | | | | | {len(r['candidates'])} | {r['seconds']:.0f} |")
            continue
        orig, int8 = r["original_fp32"], r["dynamic_int8"]
        bits = ", ".join(f"{n} x {b}-bit" for b, n in sorted(r["layers_per_bits"].items(), key=lambda kv: -int(kv[0])))
        print(f"| {r['run']} | {objective} | {r['size_mb']:.2f} | {r['search_metric']:.4g} ({r['search_damage']:+.3g}) "
              f"| {r['gate_metric']:.4g} ({orig['gate']:.4g}; {r['gate_damage']:+.3g}) | {int8['size_mb']:.1f} / {int8['gate']:.4g} "
              f"| ratio {r['embedding_ratio']:g}, {r['embedding_bits']}-bit | {bits} | {len(r['candidates'])} | {r['seconds']:.0f} |")
    recipes = [r for r in data["rows"] if r["run"].startswith("recipe:")]
    if recipes:
        print("\n| shipped recipe | size MB | gate metric (quantized graph) | original | quantize |\n| --- | --- | --- | --- | --- |")
        for r in recipes:
            print(f"| {r['run'][7:]} | {r['size_mb'] or float('nan'):.2f} | {r['gate_metric'] or float('nan'):.4g} | {r['original'] or float('nan'):.4g} | {r['quantize']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--recipes", nargs="*", choices=list(SHIPPED), default=None,
                        help="also run the shipped recipes of these models (no model: the runs' models) through optimize()")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", nargs="*", default=[], choices=list(RUNS), help="run these again (cold) and check the result is identical")
    parser.add_argument("--warm", action="store_true", help="keep the user's search cache (default: a fresh one per run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.markdown:
        markdown(args.out)
        return
    rows: list[dict] = []
    recipe_models = list(dict.fromkeys(args.recipes or [RUNS[n][0] for n in args.runs])) if args.recipes is not None else []
    names = set(args.runs) | {f"{n} (repeat)" for n in args.repeat} | {f"recipe:{r}" for m in recipe_models for r in SHIPPED[m]}
    if args.merge and args.out.is_file():
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["run"] not in names]
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in args.runs:
        row = run_search(name, args)
        rows.append(row)
        write(rows, args.out, meta)
        print(f"{name}: " + (row.get("error", "")[:200] or f"{row['size_mb']:.2f} MB, search {row['search_metric']:.4g}, gate {row['gate_metric']:.4g}, {row['seconds']:.0f} s"), flush=True)
    for name in args.repeat:
        row = run_search(name, args, suffix="-repeat")
        first = next(r for r in rows if r["run"] == name)
        row["run"], row["identical_to_first_run"] = f"{name} (repeat)", same_result(first, row)
        rows.append(row)
        write(rows, args.out, meta)
        print(f"{name} repeated: identical = {row['identical_to_first_run']}", flush=True)
    for model in recipe_models:
        for recipe in SHIPPED[model]:
            row = run_recipe(model, recipe)
            rows.append(row)
            write(rows, args.out, meta)
            print(f"recipe {recipe}: {row['size_mb']} MB, gate {row['gate_metric']}", flush=True)
    markdown(args.out)


if __name__ == "__main__":
    main()
