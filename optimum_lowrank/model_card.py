"""The Hugging Face model card written as ``onnx/README.md``, so the folder can be uploaded as it is.

The card has the Hub's YAML front matter (``library_name``, ``tags``, ``base_model`` where the
source is known, ``pipeline_tag``), says what was done (passes, ranks, quantization), gives the
measured figures (size, accuracy, latency) with any slowdown in a visible line, and shows how to
load the graph with the ``optimum.onnxruntime.ORTModelFor...`` class of the export task.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.report import OptimizationReport

__all__ = ["BASE_MODELS", "ORT_CLASSES", "base_model", "card_metadata", "front_matter", "loading_snippet", "model_card", "ort_model_class",
           "render_card"]

#: Export task (without ``-with-past``) -> (``optimum.onnxruntime`` class, the Hub's ``pipeline_tag`` or None).
ORT_CLASSES: dict[str, tuple[str, str | None]] = {
    "feature-extraction": ("ORTModelForFeatureExtraction", "feature-extraction"),
    "text-generation": ("ORTModelForCausalLM", "text-generation"),
    "text-classification": ("ORTModelForSequenceClassification", "text-classification"),
    "token-classification": ("ORTModelForTokenClassification", "token-classification"),
    "fill-mask": ("ORTModelForMaskedLM", "fill-mask"),
    "question-answering": ("ORTModelForQuestionAnswering", "question-answering"),
    "multiple-choice": ("ORTModelForMultipleChoice", None),
}

#: Hub ids of the packaged models, by alias (:data:`optimum_lowrank.models.ALIASES`).
BASE_MODELS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "minilm-sst2": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def ort_model_class(task: str) -> str:
    """The ``optimum.onnxruntime`` class that loads a graph exported for ``task`` (``ORTModelForCustomTasks`` if none fits)."""
    return ORT_CLASSES.get(task.removesuffix("-with-past"), ("ORTModelForCustomTasks", None))[0]


def base_model(source: str) -> str | None:
    """The Hub id the report's ``model`` came from: an alias's model, a Hub id given as is, else None (a local folder, in memory)."""
    first = source.split(" (")[0].split(";")[0].strip()
    if first in BASE_MODELS:
        return BASE_MODELS[first]
    if _HUB_ID.match(first) and not first.startswith((".", "/")) and " " not in source.split(";")[0].strip():
        return first
    return None


def card_metadata(source: str, task: str, extra_tags: list[str]) -> dict:
    """Front matter: ``library_name: onnx``, ``tags`` (the project's and ``extra_tags``), ``base_model`` (when
    :func:`base_model` knows it), ``pipeline_tag`` (when the task has one)."""
    tags = ["onnx", "onnxruntime", "optimum", "optimum-lowrank", "low-rank", *(t.replace("_", "-") for t in extra_tags)]
    data: dict = {"library_name": "onnx", "tags": list(dict.fromkeys(tags))}
    base = base_model(source)
    if base is not None:
        data["base_model"] = base
    tag = ORT_CLASSES.get(task.removesuffix("-with-past"), (None, None))[1]
    if tag is not None:
        data["pipeline_tag"] = tag
    return data


def front_matter(report: OptimizationReport) -> dict:
    """:func:`card_metadata` of an ``optimize`` run: the passes and the quantizer are tags."""
    exp = report.export
    extra = sorted({p.pass_id for p in report.passes}) + ([exp.quantization] if exp.quantization != "none" else [])
    return card_metadata(report.model, exp.task, extra)


def render_card(*, meta: dict, source: str, alerts: list[str], intro: str, done: list[str], figures: list[str], task: str,
                file_name: str, records: str = "`report.json` and `report.md`") -> str:
    """A model card from its parts: front matter, title, alert lines (bold quotes), intro, "What was done",
    "Figures" (Markdown lines), "Use" (:func:`loading_snippet`); ``records`` names the run's files one folder up."""
    name = base_model(source) or source.split(" (")[0]
    parts = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name.split('/')[-1]}, compressed with optimum-lowrank", ""]
    parts += [f"> **{line}**" for line in alerts] + ([""] if alerts else [])
    parts += [intro.format(name=name, file_name=file_name), "", "## What was done", "", *done, "", "## Figures", "", *figures, "",
              "## Use", "", "```python", loading_snippet(task, file_name), "```", "",
              f"`model.onnx` is the same model before quantization. The run's {records} (one folder up) hold every figure.", ""]
    return "\n".join(parts)


def loading_snippet(task: str, file_name: str) -> str:
    """Python that loads ``file_name`` from the card's folder with the task's ORTModel class and runs it once."""
    cls = ort_model_class(task)
    lines = [
        f"from optimum.onnxruntime import {cls}",
        "from transformers import AutoTokenizer",
        "",
        'repo = "."  # this folder; its Hub id once uploaded',
        f'model = {cls}.from_pretrained(repo, file_name="{file_name}")',
        "tokenizer = AutoTokenizer.from_pretrained(repo)",
    ]
    if cls == "ORTModelForCausalLM":
        lines += ['inputs = tokenizer("The capital of France is", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"]
    elif cls == "ORTModelForFeatureExtraction":
        lines += ['inputs = tokenizer(["A sentence to embed.", "Another one."], padding=True, return_tensors="pt")',
                  "hidden = model(**inputs).last_hidden_state  # (batch, tokens, hidden)",
                  'mask = inputs["attention_mask"].unsqueeze(-1)',
                  "embeddings = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does"]
    else:
        lines += ['inputs = tokenizer(["An example input."], return_tensors="pt")', "outputs = model(**inputs)"]
    return "\n".join(lines)


def _done(report: OptimizationReport) -> list[str]:
    """What was done, one bullet per pass, then quantization and the gate."""
    lines = []
    for p in report.passes:
        touched = [layer for layer in p.layers if layer.action != "skipped"]
        ranks = sorted({layer.rank for layer in touched if layer.rank is not None})
        rank = "" if not ranks else (f", rank {ranks[0]}" if len(ranks) == 1 else f", ranks {ranks[0]}-{ranks[-1]}")
        options = ", ".join(f"{k}: {v}" for k, v in p.config.items() if k not in ("pass", "targets"))
        lines.append(f"- `{p.pass_id}` ({options}) on {len(touched)} of {len(p.layers)} targeted layers{rank}: "
                     f"{p.model_params_before:,} -> {p.model_params_after:,} parameters")
    if not report.passes:
        lines.append("- no compression pass: the original model, exported")
    exp = report.export
    lines.append(f"- ONNX export ({exp.task}, opset {exp.opset or 'default'}); ONNX Runtime vs PyTorch max |diff| "
                 f"{exp.parity.get('max_abs_diff', float('nan')):.2e}")
    if exp.quantization != "none":
        lines.append(f"- quantization: `{exp.quantization}` (ONNX Runtime) -> `model_quantized.onnx`")
    if report.finetune:
        lines.append(f"- fine-tuned {report.finetune.get('steps')} steps after the passes")
    return lines


def model_card(report: OptimizationReport, figures: str, key_figures: list[str]) -> str:
    """The whole ``README.md``: front matter, title, slowdowns, what was done, figures, how to load it.

    Parameters
    ----------
    report : OptimizationReport
        A run with an export (``report.export`` set).
    figures : str
        The graphs' Markdown table (:func:`optimum_lowrank.report_files.figures_table`).
    key_figures : list of str
        Markdown bullets (:func:`optimum_lowrank.report_files.key_figures`).

    Raises
    ------
    ValueError
        If the report has no export.
    """
    exp = report.export
    if exp is None:
        raise ValueError("a model card needs a run with an export section")
    file_name = "model_quantized.onnx" if "onnx/model_quantized.onnx" in exp.sizes_mb else "model.onnx"
    figures_lines = [*key_figures, "", figures]
    lat = next(iter(exp.latency.values()), None)
    if lat:
        figures_lines += ["", f"Latency: ONNX Runtime on CPU, batch {lat.get('batch_size')} x {lat.get('seq_len')} tokens, "
                          f"{lat.get('threads')} threads, median of {lat.get('repeats')} runs on the machine that made the graphs."]
    return render_card(meta=front_matter(report), source=report.model, alerts=report.slowdowns(), intro=INTRO, done=_done(report),
                       figures=figures_lines, task=exp.task, file_name=file_name)


#: The card's first paragraph (``{name}``: the base model, ``{file_name}``: the graph to use).
INTRO = ("ONNX graphs of `{name}` made smaller with optimum-lowrank (low-rank passes and ONNX Runtime quantization). "
         "`{file_name}` is the graph to use.")
