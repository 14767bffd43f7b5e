"""``optimum-cli lowrank ...`` (optimum/commands/register/register_lowrank.py), run as a user runs it: a subprocess.

The subprocesses put this checkout first on PYTHONPATH, so the ``optimum.commands.register``
namespace package gets this checkout's portion whether or not the package was (re)installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTER = ROOT / "optimum" / "commands" / "register" / "register_lowrank.py"


def _command(name: str) -> list[str]:
    """The console script beside this interpreter, else the module it runs."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    module = {"optimum-cli": "optimum.commands.optimum_cli", "optimum-lowrank": "optimum_lowrank.cli"}[name]
    return [sys.executable, "-m", module]


def _run(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run([*_command(name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def bad_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "bad.yaml"
    path.write_text("version: 1\npasses:\n  - {pass: svd, targets: ['*dense'], rank_ratio: 0.5, rank: 4}\n")
    return path


def test_validate_prints_the_same_normalised_recipe_as_optimum_lowrank():
    recipe = str(ROOT / "recipes" / "minilm-svd.yaml")
    cli = _run("optimum-cli", "lowrank", "validate", recipe)
    plain = _run("optimum-lowrank", "validate", recipe)
    assert cli.returncode == 0, cli.stderr
    assert plain.returncode == 0, plain.stderr
    assert "pass: svd" in cli.stdout
    assert cli.stdout == plain.stdout


def test_a_bad_recipe_exits_2_with_the_same_one_line_error(bad_recipe):
    cli = _run("optimum-cli", "lowrank", "validate", str(bad_recipe))
    plain = _run("optimum-lowrank", "validate", str(bad_recipe))
    assert cli.returncode == plain.returncode == 2
    errors = [line for line in cli.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "rank" in errors[0], cli.stderr
    assert errors == [line for line in plain.stderr.splitlines() if line.startswith("error: ")]


def test_optimize_without_a_recipe_or_objective_exits_2(tmp_path):
    result = _run("optimum-cli", "lowrank", "optimize", "--model", "minilm", "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error: give --recipe, or an objective" in result.stderr
    assert not (tmp_path / "out").exists()


def test_passes_lists_the_registered_passes_metrics_and_quantizers():
    result = _run("optimum-cli", "lowrank", "passes")
    assert result.returncode == 0, result.stderr
    for name in ("svd  (plugin:", "activation_svd  (plugin:", "accuracy metrics", "dynamic_int8"):
        assert name in result.stdout


def test_plugins_lists_the_builtin_plugins():
    result = _run("optimum-cli", "lowrank", "plugins")
    assert result.returncode == 0, result.stderr
    assert "(built-in)" in result.stdout and "svd (pass)" in result.stdout


def test_optimize_has_the_options_of_optimum_lowrank():
    cli = _run("optimum-cli", "lowrank", "optimize", "--help")
    plain = _run("optimum-lowrank", "optimize", "--help")
    assert cli.returncode == plain.returncode == 0

    def options(text: str) -> set[str]:
        return {word.rstrip(",") for word in text.split() if word.startswith("--")}

    assert options(cli.stdout) == options(plain.stdout)
    assert {"--model", "--recipe", "--output", "--overwrite", "--quiet", "--max-drop"} <= options(cli.stdout)


def test_no_subcommand_is_a_usage_error():
    result = _run("optimum-cli", "lowrank")
    assert result.returncode == 2
    assert "optimize,passes,plugins,validate" in result.stderr


def test_optimum_own_commands_still_register():
    result = _run("optimum-cli", "--help")
    assert result.returncode == 0
    for command in ("export", "lowrank"):
        assert command in result.stdout


def test_the_register_module_is_packaged_as_a_namespace_portion():
    """setuptools' namespace-aware finder, with pyproject's include list, ships the register module
    (a fresh ``pip install -e .`` / wheel then exposes ``optimum-cli lowrank``)."""
    import tomllib
    from setuptools import find_namespace_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert config.get("namespaces", True)
    packages = find_namespace_packages(where=str(ROOT), include=config["include"])
    assert "optimum.commands.register" in packages and "optimum_lowrank" in packages
    assert REGISTER.is_file()
    # PEP 420: an __init__.py anywhere on the way would shadow Optimum's own portions
    assert not any((ROOT / part / "__init__.py").exists() for part in ("optimum", "optimum/commands", "optimum/commands/register"))
