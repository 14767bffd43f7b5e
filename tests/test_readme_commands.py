"""README's commands work as typed, and `make run` writes one folder per model and recipe."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from optimum_lowrank.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _use_block() -> list[str]:
    """The lines of the first bash block of README's "Use" section, comments removed."""
    section = README.split("\n## Use\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _make_output(*assignments: str) -> str:
    result = subprocess.run(["make", "-n", "run", *assignments], cwd=ROOT, capture_output=True, text=True, check=True)
    command = next(line for line in result.stdout.splitlines() if "optimum-lowrank optimize" in line)
    return shlex.split(command)[shlex.split(command).index("--output") + 1]


def test_use_block_starts_by_putting_the_venv_on_path():
    lines = _use_block()
    assert lines[0].startswith("source .venv/bin/activate")
    assert all(line.startswith("optimum-lowrank ") for line in lines[1:])


def test_use_commands_parse_and_name_existing_recipes_and_distinct_outputs():
    outputs = []
    for line in _use_block()[1:]:
        argv = shlex.split(line)[1:]
        args = build_parser().parse_args(argv)  # SystemExit on any unknown option
        if getattr(args, "recipe", None):
            assert (ROOT / args.recipe).is_file(), line
        if args.lowrank_command == "optimize":
            outputs.append(args.output)
    assert len(outputs) == len(set(outputs)) >= 2
    if shutil.which("make"):
        assert _make_output() not in outputs  # `make run` first, then these, without clobbering


def test_cheap_use_commands_run_verbatim(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for line in _use_block()[1:]:
        argv = shlex.split(line)[1:]
        if argv[0] in ("passes", "plugins", "validate"):
            assert main(argv) == 0, line
    assert "pass: svd" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_writes_one_folder_per_model_and_recipe():
    assert _make_output() == "out/minilm-auto"
    assert _make_output("MODEL=smollm2", "RECIPE=recipes/smollm2-edge-int8.yaml") == "out/smollm2-edge-int8"
    assert _make_output("RECIPE=recipes/baseline.yaml") == "out/minilm-baseline"
    assert _make_output("MODEL=smollm2", "RECIPE=recipes/baseline.yaml") == "out/smollm2-baseline"
    assert _make_output("OUTPUT=out/mine") == "out/mine"
    recipes = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    folders = {_make_output(f"RECIPE=recipes/{name}") for name in recipes}
    assert len(folders) == len(recipes)
    assert "out/smollm2-edge-int8" in README and "out/minilm-auto/onnx/model_quantized.onnx" in README
