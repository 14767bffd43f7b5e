"""The documentation runs: the plugin tutorial is the example package, its Python blocks run, its
contract test passes; every YAML block validates verbatim; the pass-option reference is generated."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_lowrank.cli import main
from optimum_lowrank.plugins import get_registry
from optimum_lowrank.reference import BEGIN, END, options_reference, update_section

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "optimum-lowrank-rsvd"
TUTORIAL = ROOT / "docs" / "plugins.md"
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n```\w+\n(?P<body>.*?)```\n", re.S)
CODE_BLOCK = re.compile(r"(?P<marker><!-- file: [^ ]+ -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
#: A YAML block that is deliberately not a whole recipe starts with this comment, followed by the reason.
FRAGMENT = "# fragment:"


def test_tutorial_shows_the_example_package_file_by_file():
    blocks = {m["path"]: m["body"] for m in FILE_BLOCK.finditer(TUTORIAL.read_text())}
    assert {"pyproject.toml", "optimum_lowrank_rsvd/__init__.py", "optimum_lowrank_rsvd/rsvd.py", "tests/test_contract.py"} <= set(blocks)
    shipped = {str(p.relative_to(EXAMPLE)) for p in EXAMPLE.rglob("*") if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts}
    assert shipped == set(blocks), "every file of the example package is in the tutorial, and nothing else"
    for path, body in blocks.items():
        assert body == (EXAMPLE / path).read_text(), f"docs/plugins.md's block of {path} differs from the file"
    pyproject = blocks["pyproject.toml"]
    assert "[project]" in pyproject and "[build-system]" in pyproject and "[project.entry-points.optimum_lowrank]" in pyproject
    assert "def apply(" in blocks["optimum_lowrank_rsvd/rsvd.py"] and "..." not in blocks["optimum_lowrank_rsvd/rsvd.py"]


def test_tutorial_python_blocks_that_are_not_files_run():
    snippets = [m["body"] for m in CODE_BLOCK.finditer(TUTORIAL.read_text()) if m["lang"] == "python" and not m["marker"]]
    assert snippets, "the layer helpers block"
    for snippet in snippets:
        exec(compile(snippet, str(TUTORIAL), "exec"), {})  # noqa: S102 - the documentation's own code


def test_tutorial_install_command_names_the_package_folder():
    text = TUTORIAL.read_text()
    assert "cd examples/plugins/optimum-lowrank-rsvd\npip install --no-deps -e ." in text


def test_example_plugin_contract_test_passes_as_the_tutorial_runs_it():
    """``python -m pytest -q tests/`` in the plugin's folder (step 6 of the tutorial)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/"], cwd=EXAMPLE,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


def _yaml_blocks():
    for md in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = md.read_text()
        for m in re.finditer(r"```yaml\n(.*?)```", text, re.S):
            yield pytest.param(m.group(1), id=f"{md.name}:{text[: m.start()].count(chr(10)) + 1}")


@pytest.mark.parametrize("block", list(_yaml_blocks()))
def test_every_docs_yaml_block_validates_verbatim(block, tmp_path, capsys):
    if block.startswith(FRAGMENT):
        assert len(block.splitlines()[0]) > len(FRAGMENT) + 10, "a fragment says why it is one"
        return
    assert re.search(r"^version: 1\b", block, re.M), "a recipe in the docs carries version: 1"
    path = tmp_path / "recipe.yaml"
    path.write_text(block)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_recipes_reference_is_generated_from_the_code():
    text = (ROOT / "docs" / "recipes.md").read_text()
    assert BEGIN in text and END in text
    assert update_section(text, options_reference()) == text, "run: python -m optimum_lowrank.reference docs/recipes.md"
    section = text[text.index(BEGIN): text.index(END)]
    assert "### `svd`" in section and "| `rank_ratio` | float or null | `null` |" in section
    assert "randomized_svd" not in section, "third-party passes document themselves"
    with pytest.raises(ValueError, match="markers missing"):
        update_section("no markers", "x")


def test_every_pass_option_has_a_description_and_passes_prints_it(capsys):
    from optimum_lowrank.passes.embedding.refine import RefineConfig

    configs = [entry.pass_class.config_class for _, entry in get_registry().entries()] + [RefineConfig]
    missing = [f"{c.__name__}.{name}" for c in configs for name, field in c.model_fields.items() if not (field.description or "").strip()]
    assert missing == []
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "    rank_ratio: float or null (default null)\n        Rank as a fraction of `min(out_features, in_features)`" in out
    assert "Extra random directions beyond the rank" in out, "a plugin pass's descriptions too"
