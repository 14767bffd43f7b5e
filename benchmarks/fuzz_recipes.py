"""Recipe fuzz benchmark (issue 15): load N mutated shipped recipes; count the outcomes.

Every outcome must be acceptance or a :class:`~optimum_lowrank.errors.LowRankError`; anything else
("untyped") is a bug. Each recipe is one to four random edits (token replaced, inserted or deleted,
line duplicated, key renamed, line appended) of a file in ``recipes/``, seeded; the slowest case and
its time are reported.

    python benchmarks/fuzz_recipes.py                 # 10,000 recipes, seed 15 (about a minute)
    python benchmarks/fuzz_recipes.py -n 300 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimum_lowrank.errors import LowRankError
from optimum_lowrank.recipe import load_recipe
from tests.test_recipe_hostile import RECIPES, mutate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    import random

    rng = random.Random(args.seed)
    seeds = [p.read_text() for p in RECIPES]
    counts: collections.Counter[str] = collections.Counter()
    untyped: list[str] = []
    slowest = (0.0, "")
    load_recipe("version: 1")  # warm-up: the plugin registries load once per process
    started = time.perf_counter()
    for _ in range(args.n):
        text = rng.choice(seeds)
        for _ in range(rng.randint(1, 4)):
            text = mutate(text, rng)
        t0 = time.perf_counter()
        try:
            load_recipe(text)
            counts["accepted"] += 1
        except LowRankError as err:
            counts[f"typed {type(err).__name__}"] += 1
        except Exception as err:  # noqa: BLE001 - what the benchmark counts
            counts["untyped"] += 1
            untyped.append(f"{type(err).__name__}: {str(err)[:120]}  <- {text[:120]!r}")
        seconds = time.perf_counter() - t0
        if seconds > slowest[0]:
            slowest = (seconds, text)
    print(f"{args.n} recipes, seed {args.seed}, {time.perf_counter() - started:.1f} s")
    for name, count in counts.most_common():
        print(f"  {name:28s} {count:6d}")
    print(f"  untyped total                {counts['untyped']:6d}")
    print(f"slowest case: {slowest[0] * 1000:.1f} ms: {slowest[1][:160]!r}")
    for line in untyped[:20]:
        print("  " + line)
    return 1 if counts["untyped"] else 0


if __name__ == "__main__":
    sys.exit(main())
