"""What a search needs besides its algorithm: resolved defaults, data, the embedding passes, the exporter's spec.

:class:`SearchSetup` resolves a :class:`~optimum_lowrank.search.config.SearchConfig` for one model
(metric, gate and search data, embedding ratios, the token table's name) and builds the evaluators,
the sensitivity batches and the factorized copies. :func:`weight_only_spec` turns an allocation
into the exporter's :class:`~optimum_lowrank.exporters.weight_only.WeightOnlySpec`, with compact
``overrides`` that are checked against the exporter's own planning.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from optimum_lowrank.data import load_sts_pairs, load_text, shared_data_dir, token_windows
from optimum_lowrank.errors import DataError, PassError, RecipeError
from optimum_lowrank.exporters.weight_only import WeightOnlySpec, constant_matmuls, module_path, plan_bits
from optimum_lowrank.layers.lowrank import linear_weight
from optimum_lowrank.passes.embedding.install import tied_output_head
from optimum_lowrank.pipeline import _context, apply_passes
from optimum_lowrank.recipe import Recipe, format_validation_error, load_recipe
from optimum_lowrank.search.allocate import DamageModel, GraphLayout
from optimum_lowrank.search.config import KIND_DEFAULTS, SearchConfig
from optimum_lowrank.search.sensitivity import EmbeddingVariant, LinearTarget, Sensitivity, encoder_batches

__all__ = ["SearchSetup", "compact_targets", "parse_search_config", "weight_only_spec"]

PERPLEXITY_SEQ_LEN = 512


def parse_search_config(config: Any) -> SearchConfig:
    """A :class:`SearchConfig` from itself, a mapping of its fields, or a recipe with a ``search:`` section.

    Raises
    ------
    RecipeError
        Unknown key (the message lists the allowed ones), invalid value, or a recipe without ``search:``.
    """
    if isinstance(config, SearchConfig):
        return config
    if isinstance(config, dict) and "version" not in config:
        try:
            return SearchConfig.model_validate(config)
        except ValidationError as err:
            raise RecipeError(format_validation_error(err, "search", SearchConfig)) from None
    recipe = config if isinstance(config, Recipe) else load_recipe(config)
    if recipe.search is None:
        raise RecipeError("this recipe has no 'search:' section; run it with optimize() / optimum-lowrank optimize --recipe")
    return recipe.search


def _stamp(source: str | None) -> Any:
    """A data source and, for a file, its size and modification time (cache keys)."""
    if source is None:
        return None
    path = Path(source.split(":")[1] if source.startswith("tsv:") else source)
    return [source, path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else source


def _name(source: str) -> str:
    return Path(source.split(":")[1] if source.startswith("tsv:") else source).name


def sts_text_source(path: str) -> str:
    """``tsv:PATH:COLUMNS[:header]`` naming the sentence columns of an STS-B TSV (either layout)."""
    first = Path(path).read_text(encoding="utf-8").split("\n", 1)[0].lower().split("\t")
    first = [h.strip() for h in first]
    if "sentence1" in first and "sentence2" in first:
        return f"tsv:{path}:{first.index('sentence1')},{first.index('sentence2')}:header"
    return f"tsv:{path}:5,6"


class SearchSetup:
    """One search's resolved options for one model.

    Raises
    ------
    RecipeError
        The metric does not suit the model kind, or the search and gate data are the same file.
    DataError
        A default data file is needed but the shared data folder is missing.
    """

    def __init__(self, config: SearchConfig, loaded):
        self.config, self.loaded, self.kind = config, loaded, loaded.kind
        defaults = KIND_DEFAULTS[self.kind]
        self.metric = config.metric or defaults["metric"]
        try:
            config.check_metric(self.metric)
        except ValueError as err:
            raise RecipeError(f"search: {err}") from None
        if self.metric != defaults["metric"]:
            raise RecipeError(f"search: metric {self.metric!r} does not suit {self.kind}s; use {defaults['metric']!r}")
        self.data = self._source(config.data, "data")
        self.search_data = self._source(config.search_data, "search_data")
        if os.path.abspath(self.data) == os.path.abspath(self.search_data):
            raise RecipeError(f"search: search_data must be another split than the gate's data ({self.data})")
        self.calibration = config.calibration or (sts_text_source(self.search_data) if self.kind == "encoder" else self.search_data)
        self.ratios = sorted({float(r) for r in config.default(self.kind, "embedding_ratios")})
        self.search_samples = int(config.default(self.kind, "search_samples"))
        self.sensitivity_samples = int(config.default(self.kind, "sensitivity_samples"))
        model = loaded.model
        embedding = model.get_input_embeddings()
        self.embedding_name = next(name for name, module in model.named_modules() if module is embedding)
        self.table_name = f"{self.embedding_name}.weight"
        self.vocab, self.dim = embedding.weight.shape
        self.tied = tied_output_head(model, embedding) is not None
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or PERPLEXITY_SEQ_LEN
        self.positions = int(positions)
        self.seq_len = min(PERPLEXITY_SEQ_LEN, int(positions))  # perplexity windows (search and gate)
        self.sensitivity_seq_len = min(config.sensitivity_seq_len, int(positions))
        self.sensitivity_pairs = 0
        unit = "pairs" if self.kind == "encoder" else f"windows of {self.seq_len} tokens"
        self.search_label = f"{_name(self.search_data)}, first {self.search_samples} {unit}"
        self.gate_label = _name(self.data)
        self._node_names: dict[float, list[str]] = {}

    def _source(self, value: str | None, field: str) -> str:
        if value is not None:
            return value
        root = shared_data_dir()
        if root is None:
            raise DataError(f"search: no {field} given and no shared data folder found (set search.{field} or $OPTIMUM_LOWRANK_DATA)")
        return str(root / str(KIND_DEFAULTS[self.kind][field]))

    # ----------------------------------------------------------------- data

    def evaluators(self):
        """``(search, gate)`` evaluators; the gate's is what a recipe's ``accuracy:`` builds."""
        from optimum_lowrank.evaluation import PerplexityEvaluator, STSBEvaluator, build_evaluator

        tokenizer = self.loaded.tokenizer
        if self.kind == "encoder":
            pairs = load_sts_pairs(self.search_data)[: self.search_samples]
            search = STSBEvaluator(tokenizer, pairs, pairs_description=f"{Path(self.search_data).name} (first {len(pairs)} pairs)")
        else:
            text, description = load_text(self.search_data)
            search = PerplexityEvaluator(tokenizer, text, seq_len=self.seq_len, stride=self.seq_len,
                                         max_windows=self.search_samples, text_description=description)
        return search, build_evaluator(self.metric, self.loaded, data=self.data, **self.gate_options())

    def gate_options(self) -> dict[str, Any]:
        """Options of the gate's metric beyond its defaults (what the written recipe's ``accuracy:`` repeats)."""
        return {"seq_len": self.seq_len} if self.kind == "decoder" and self.seq_len != PERPLEXITY_SEQ_LEN else {}

    def sensitivity_batches(self) -> list[dict[str, torch.Tensor]]:
        tokenizer, seq_len = self.loaded.tokenizer, self.sensitivity_seq_len
        if self.kind == "encoder":
            pairs = load_sts_pairs(self.search_data)[: self.sensitivity_samples]
            self.sensitivity_pairs = len(pairs)
            return encoder_batches(tokenizer, pairs, seq_len)
        text, _ = load_text(self.search_data)
        return [{"input_ids": token_windows(tokenizer, text, seq_len, self.sensitivity_samples, add_bos=True)}]

    def cache_parts(self) -> dict[str, Any]:
        c = self.config
        return {"search_data": _stamp(self.search_data), "calibration": _stamp(self.calibration), "samples": self.sensitivity_samples,
                "seq_len": self.sensitivity_seq_len, "bits": sorted(c.bits), "embedding_bits": sorted(c.embedding_bits),
                "ratios": self.ratios, "keep_share": c.keep_share, "block": list(c.block_sizes), "all_bits": c.measure_all_bits, "seed": c.seed,
                **({"algorithms": sorted(c.algorithms)} if c.algorithms != ("rtn",) else {})}

    def reference_parts(self) -> dict[str, Any]:
        return {"metric": self.metric, "search": _stamp(self.search_data), "samples": self.search_samples, "gate": _stamp(self.data)}

    # ----------------------------------------------------------------- metric

    def metric_damage(self, original: float, value: float) -> float:
        """Points lost (higher-is-better metrics) or relative increase (perplexity)."""
        return original - value if self.kind == "encoder" else value / original - 1.0

    def damage_model(self, sensitivity: Sensitivity, original: float) -> DamageModel:
        """Decoders: ``exp(KL divergence) - 1``. Encoders: points per unit of ``1 - cos``, first from the pair-cosine noise."""
        if self.kind == "decoder":
            return DamageModel("log", 1.0)
        slope = sensitivity.prior_scale()
        return DamageModel("additive", (slope if slope and slope > 0 else 1.0) * abs(original))

    # ----------------------------------------------------------------- models and graphs

    def export(self, model: nn.Module, folder: Path) -> Path:
        from optimum_lowrank.exporters.onnx import export_onnx, onnx_task

        return export_onnx(model, folder, onnx_task(model))

    def layout(self, fp32: Path) -> GraphLayout:
        import onnx

        from optimum_lowrank.exporters.onnx import onnx_size_mb

        proto = onnx.load(str(fp32))
        return GraphLayout.from_graph(proto, int(round(onnx_size_mb(fp32) * 1e6)), self.embedding_name)

    def keep_top_k(self, ratio: float) -> int:
        """Exact rows at ``ratio``: ``keep_share`` of the factorized table's budget, rounded to hundreds."""
        return int(round(self.config.keep_share * self.vocab / ratio, -2))

    def rank(self, ratio: float) -> int:
        """The factorized table's rank at ``ratio``: the ``svd`` pass's own rank for that compression ratio
        (``floor((V d / ratio - k d - V) / (V - k + d))`` with ``k`` exact rows and their int32 index),
        rounded to a multiple of 16 where that still saves parameters. The exporter quantizes the codes'
        rows in blocks of a power of 2 that divides the rank, else pads them: MiniLM's rank 31 at ratio
        10 stored its codes padded to 64 or 128 values a row, more bytes than ratio 5."""
        k = self.keep_top_k(ratio)
        rest = self.vocab - k
        budget = self.vocab * self.dim / ratio - k * self.dim - (self.vocab if k else 0)
        exact = max(1, int(budget // (rest + self.dim)))
        rounded = max(16, 16 * round(exact / 16))
        return rounded if rounded <= min(rest, self.dim) and rounded * (rest + self.dim) < rest * self.dim else exact

    def pass_step(self, ratio: float) -> dict[str, Any]:
        """The ``svd`` pass that factorizes the token table at ``ratio`` (as a rank, see :meth:`rank`)."""
        step = {"pass": "svd", "targets": [self.embedding_name], "rank": self.rank(ratio)}
        if self.keep_top_k(ratio):
            step["keep_top_k"] = self.keep_top_k(ratio)
        return step

    def factorize(self, model: nn.Module, layout: GraphLayout, ratio: float) -> tuple[EmbeddingVariant, GraphLayout]:
        """A copy of ``model`` with the token table factorized at ``ratio``, and its predicted layout."""
        if self.table_name not in layout.tables:
            raise PassError(f"search: {self.table_name} is not a Gather table of the exported graph; use embedding_ratios: [1]")
        recipe = Recipe.from_dict({"version": 1, "seed": self.config.seed, "calibration": {"data": self.calibration},
                                   "passes": [self.pass_step(ratio)]})
        compressed, _ = apply_passes(model, recipe, _context(recipe, self.loaded))
        module = compressed.get_submodule(self.embedding_name)
        parts = []
        for sub_name, sub in module.named_modules(prefix=self.embedding_name):
            for name, p in sub.named_parameters(recurse=False):
                role = "linear" if isinstance(sub, nn.Linear) and name == "weight" else "table" if p.dim() == 2 and p.is_floating_point() else "fixed"
                parts.append((f"{sub_name}.{name}", role, tuple(p.shape), p.numel() * p.element_size()))
            for name, b in sub.named_buffers(recurse=False):
                parts.append((f"{sub_name}.{name}", "fixed", tuple(b.shape), b.numel() * b.element_size()))
        new_layout = layout.replace_embedding(self.table_name, parts)
        return embedding_variant(self, compressed, new_layout, ratio), new_layout

    def node_names(self, ratio: float, fp32: Path) -> list[str]:
        if ratio not in self._node_names:
            import onnx

            self._node_names[ratio] = list(constant_matmuls(onnx.load(str(fp32), load_external_data=False)))
        return self._node_names[ratio]


def embedding_variant(setup: SearchSetup, model: nn.Module, layout: GraphLayout, ratio: float) -> EmbeddingVariant:
    """The tensors of ``model`` that the embedding's bits quantize: its Gather tables and own Linear weights."""
    params = dict(model.named_parameters())
    tables = tuple(params[name] for name in layout.tables if name in params)
    linears = []
    if ratio != 1.0:
        for sub in model.get_submodule(setup.embedding_name).modules():
            if isinstance(sub, nn.Linear):
                linears.append(sub.weight)
    return EmbeddingVariant(ratio, model, tables, tuple(linears))


def linear_targets(model: nn.Module, layout: GraphLayout) -> tuple[list[LinearTarget], list[str]]:
    """Measurable linear units (a torch Linear / Conv1D of the exported shape) and the others."""
    targets, unmeasured = [], []
    for name, weights in layout.linears.items():
        try:
            module = model.get_submodule(name)
            rows = linear_weight(module)[0]
        except (AttributeError, PassError):
            unmeasured.append(name)
            continue
        if len(weights) != 1 or tuple(rows.shape) != weights[0]:
            unmeasured.append(name)
            continue
        targets.append(LinearTarget(name, module, lambda module=module: linear_weight(module)[0]))
    return targets, unmeasured


def compact_targets(chosen: list[str], every: list[str]) -> list[str]:
    """Override targets for the units ``chosen`` among ``every``: one glob per role where every layer
    of it is chosen (``model.layers.*.mlp.down_proj``), a regex over the layer numbers where some are
    (``re:model\\.layers\\.(1|4)\\.mlp\\.down_proj``), the name itself otherwise."""
    def role(name: str) -> tuple[str, str, str] | None:
        match = re.search(r"\.(\d+)\.", name)
        return None if match is None else (name[: match.start() + 1], match.group(1), name[match.end() - 1 :])

    members: dict[tuple[str, str], list[str]] = {}
    for name in every:
        r = role(name)
        if r is not None:
            members.setdefault((r[0], r[2]), []).append(name)
    wanted, done, out = set(chosen), set(), []
    for name in chosen:
        r = role(name)
        if r is None:
            out.append(name)
            continue
        key = (r[0], r[2])
        if key in done:
            continue
        done.add(key)
        picked = [n for n in members[key] if n in wanted]
        if len(picked) == len(members[key]) and len(picked) > 1:
            out.append(f"{key[0]}*{key[1]}")
        elif len(picked) > 1:
            numbers = "|".join(role(n)[1] for n in picked)
            out.append(f"re:{re.escape(key[0])}({numbers}){re.escape(key[1])}")
        else:
            out.extend(picked)
    return out


def weight_only_spec(setup: SearchSetup, fp32: Path, bits: dict[str, int], embedding_bits: int, ratio: float, block_size: int,
                     algorithm: str = "rtn") -> WeightOnlySpec:
    """The exporter's spec for ``bits`` per linear unit: the most common width as ``bits``, the others as
    compact overrides, the embedding's own MatMuls at ``embedding_bits``; checked against
    :func:`~optimum_lowrank.exporters.weight_only.plan_bits` (any node it would get wrong is named explicitly).

    Raises
    ------
    RuntimeError
        If the exporter would still plan other bits than intended (a bug).
    """
    nodes = setup.node_names(ratio, fp32)
    prefix = setup.embedding_name

    def intended(node: str) -> int:
        path = module_path(node)
        return embedding_bits if path == prefix or path.startswith(prefix + ".") else bits[path]

    counts = Counter(bits.values())
    default = max(counts, key=lambda b: (counts[b], b)) if counts else max(setup.config.bits)
    overrides = [(tuple(compact_targets([u for u in bits if bits[u] == b], list(bits))), b) for b in sorted(set(bits.values()) - {default}, reverse=True)]
    if any(intended(n) != default for n in nodes if module_path(n) not in bits):
        overrides.append(((prefix,), embedding_bits))
    heads = [n for n in nodes if module_path(n).split(".")[-1] in ("lm_head", "embed_out", "output")]
    base = dict(bits=default, block_size=block_size, symmetric=algorithm == "rtn", algorithm=algorithm, embedding_bits=embedding_bits)
    spec = WeightOnlySpec(**base, overrides=tuple(overrides))
    wrong = [n for n, b in plan_bits(nodes, spec, heads).items() if b != intended(n)]
    if wrong:
        spec = WeightOnlySpec(**base, overrides=tuple(overrides) + tuple(((module_path(n),), intended(n)) for n in wrong))
        if any(b != intended(n) for n, b in plan_bits(nodes, spec, heads).items()):
            raise RuntimeError(f"weight-only overrides do not reproduce the allocation for {wrong[:5]}")
    return spec
