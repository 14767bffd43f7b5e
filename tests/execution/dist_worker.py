"""One rank of a multi-process run, started by tests/execution/test_distributed.py.

``python -m tests.execution.dist_worker SRC RECIPE_JSON OUT REPORT_JSON [die]`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment (what torchrun sets). Writes the report, or the error as
``{"error": type, "message": ...}``, to REPORT_JSON; ``die`` makes the rank join the group and exit at once.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta


def main(argv: list[str]) -> int:
    src, recipe_json, out, report_path = argv[:4]
    if argv[4:] == ["die"]:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=30))
        os._exit(3)
    import torch

    torch.set_num_threads(1)
    from optimum_lowrank import optimize
    from optimum_lowrank.errors import LowRankError
    from tests.helpers import WordTokenizer

    try:
        report = optimize(src, json.loads(recipe_json), None if out == "-" else out, tokenizer=WordTokenizer(), progress=False)
        result = {"params_after": report.params_after, "notes": report.notes, "output": report.output}
    except LowRankError as err:
        result = {"error": type(err).__name__, "message": str(err)}
    with open(report_path, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
