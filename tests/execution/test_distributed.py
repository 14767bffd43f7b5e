"""Calibration over two gloo processes on a tiny Llama: equal to one process; disagreeing or dead ranks fail clearly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optimum_lowrank import optimize
from optimum_lowrank.execution import load_compressed
from optimum_lowrank.layers.lowrank import LowRankLinear
from tests.helpers import WordTokenizer

ROOT = Path(__file__).resolve().parents[2]
#: A product A @ B from two processes vs one: the Gram sums differ only in float64 summation
#: order, so the factors agree to float32 rounding of the SVD (measured max relative error ~1e-6).
TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: Path, src: Path, recipes: list[dict], out: Path | None, die: int | None = None, timeout: float = 900):
    """Start one process per recipe as ranks 0..n-1 (as torchrun would) and return their results.

    ``timeout`` only guards against a hang: each run takes 15-40 s here (mostly importing torch
    and transformers in two processes on 2 shared cores), several minutes on a machine under a load of 13.
    """
    port, procs, reports = _free_port(), [], []
    for rank, recipe in enumerate(recipes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(recipes)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        report = tmp_path / f"rank{rank}.json"
        args = [sys.executable, "-m", "tests.execution.dist_worker", str(src), json.dumps(recipe), str(out) if out else "-", str(report)]
        procs.append(subprocess.Popen(args + (["die"] if rank == die else []), env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True))
        reports.append(report)
    started = time.perf_counter()
    try:
        errors = [proc.communicate(timeout=timeout)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    seconds = time.perf_counter() - started
    results = [json.loads(r.read_text()) if r.exists() else {"stderr": e[-2000:]} for r, e in zip(reports, errors)]
    return results, seconds


def _recipe(tmp_path: Path, **execution) -> dict:
    g = torch.Generator().manual_seed(0)
    (tmp_path / "cal.txt").write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 128, (3000,), generator=g)))
    return {"version": 1, "calibration": {"data": str(tmp_path / "cal.txt"), "num_samples": 6, "seq_len": 16},
            "passes": [{"pass": "activation_svd", "targets": ["re:.*_proj"], "rank_ratio": 0.25}],
            "execution": {"mode": "sequential", "timeout_s": 30, **execution}}


@pytest.fixture
def source(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _products(model) -> dict[str, torch.Tensor]:
    return {n: m.up.weight @ m.down.weight for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def test_two_ranks_equal_one_process(tmp_path, source):
    """Windows split over the ranks, statistics all-reduced, decompositions spread and gathered."""
    recipe = _recipe(tmp_path)
    one = optimize(str(source), recipe, tmp_path / "one", tokenizer=WordTokenizer(), progress=False)
    results, _ = _launch(tmp_path, source, [recipe, recipe], tmp_path / "two")
    assert all("error" not in r and "stderr" not in r for r in results), results
    assert results[0]["output"] == str(tmp_path / "two") and results[1]["output"] is None
    assert "rank 1 of 2: calibrated its share; rank 0 exports and writes" in results[1]["notes"]
    assert results[0]["params_after"] == results[1]["params_after"] == one.params_after
    with torch.no_grad():
        reference, got = _products(load_compressed(tmp_path / "one" / "checkpoint")), _products(load_compressed(tmp_path / "two" / "checkpoint"))
    assert list(reference) == list(got) and len(got) == 14
    for name, product in reference.items():
        error = float((got[name] - product).norm() / product.norm())
        assert error < TOLERANCE, (name, error)


def test_ranks_that_disagree_on_the_recipe_all_fail(tmp_path, source):
    other = _recipe(tmp_path)
    other["passes"][0]["rank_ratio"] = 0.5
    results, _ = _launch(tmp_path, source, [_recipe(tmp_path), other], tmp_path / "out")
    for rank, result in enumerate(results):
        assert result.get("error") == "DistributedError", result
        assert f"rank {rank} of 2: the ranks disagree on the recipe and model: rank(s) 1 hash" in result["message"]
    assert not (tmp_path / "out").exists()


def test_a_dead_rank_fails_the_others_within_the_timeout(tmp_path, source):
    results, seconds = _launch(tmp_path, source, [_recipe(tmp_path, timeout_s=20), _recipe(tmp_path)], tmp_path / "out", die=1)
    assert results[0].get("error") == "DistributedError", results[0]
    assert "rank 0 of 2:" in results[0]["message"] and "another rank stopped or did not answer" in results[0]["message"]
    assert "nothing was written" in results[0]["message"]
    assert seconds < 60
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
