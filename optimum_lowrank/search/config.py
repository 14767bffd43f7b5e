"""``search:``: the objective and the search space of :func:`optimum_lowrank.search.search`.

A recipe with a ``search:`` section (or ``optimum-lowrank optimize --max-drop 1.0`` without a
recipe) asks "how small can this model get without losing more than X?". Exactly one
objective is set:

- ``max_drop`` (metric points, for a higher-is-better metric: ``stsb_spearman``): the smallest
  model whose quantized ONNX graph loses at most that much;
- ``max_increase`` (relative, for ``perplexity``: 0.05 = +5%): the same for a lower-is-better metric;
- ``size_mb``: the best metric among the graphs of at most that many megabytes (1e6 bytes).

Example
-------
.. code-block:: yaml

    version: 1
    search:
      max_drop: 1.0                 # STS-B Spearman points (x100)
      bits: [8, 4]                  # per linear layer (MatMulNBits)
      embedding_bits: [8, 4]        # every Gather table, shared with a tied head
      embedding_ratios: [1, 2.5, 5, 10]

Everything left out gets the model kind's default (:data:`KIND_DEFAULTS`): encoders are
searched on STS-B *train* pairs and gated on STS-B *dev*; decoders are searched on WikiText-2
*valid* and gated on WikiText-2 raw *test*.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimum_lowrank.exporters.weight_only import BITS
from optimum_lowrank.strict import StrictScalars

__all__ = ["KIND_DEFAULTS", "OBJECTIVES", "SEARCH_METRICS", "SearchConfig"]

#: The objective fields; exactly one is set.
OBJECTIVES = ("max_drop", "max_increase", "size_mb")

#: Metrics a search can score, with the accuracy objective each takes.
SEARCH_METRICS = {"stsb_spearman": "max_drop", "perplexity": "max_increase"}

#: Per model kind: metric, gate data and search data (relative to the shared data folder, see
#: :func:`optimum_lowrank.data.shared_data_dir`), sample counts and embedding ratios.
#: Decoders get ratio 1 only: every measured compression of a tied token table broke SmolLM2
#: (perplexity 30 -> 200-1000 at ratio 5-20, docs/usage_aware.md).
KIND_DEFAULTS: dict[str, dict[str, object]] = {
    "encoder": {
        "metric": "stsb_spearman",
        "data": "stsb/sts-dev.tsv",
        "search_data": "stsb/sts-train.tsv",
        "search_samples": 1000,  # pairs
        "sensitivity_samples": 32,  # pairs (64 sentences)
        "embedding_ratios": (1.0, 2.5, 5.0, 10.0),
    },
    "decoder": {
        "metric": "perplexity",
        "data": "wikitext-2-raw/wiki.test.raw",
        "search_data": "wikitext-2/wiki.valid.tokens",
        "search_samples": 8,  # windows of 512 tokens
        "sensitivity_samples": 1,  # windows of sensitivity_seq_len tokens
        "embedding_ratios": (1.0,),
    },
}


class SearchConfig(StrictScalars):
    """The ``search:`` section. Unknown keys are errors naming the allowed ones.

    Attributes
    ----------
    max_drop : float in [0, 100], optional
        Objective: allowed drop of a higher-is-better metric, in its points (STS-B Spearman x100).
    max_increase : float in [0, 100], optional
        Objective: allowed relative increase of a lower-is-better metric (perplexity; 0.05 = +5%).
    size_mb : float > 0, optional
        Objective: the file size (MB, 1e6 bytes, external data included) the graph must fit in.
    metric : {"stsb_spearman", "perplexity"}, optional
        Default: the model kind's (``stsb_spearman`` for encoders, ``perplexity`` for decoders).
    data : str, optional
        The gate's data: an STS-B TSV (``stsb_spearman``) or a text source (``perplexity``,
        see :func:`optimum_lowrank.data.load_text`). Default: STS-B dev / WikiText-2 raw test.
    search_data : str, optional
        The split candidates are scored on; must not be the gate's. Default: STS-B train /
        WikiText-2 valid.
    calibration : str, optional
        Text source of the token counts of the embedding compression (usage-aware SVD).
        Default: the sentences of ``search_data`` (encoders), ``search_data`` (decoders).
    search_samples : int >= 2, optional
        Pairs (encoders; default 1000) or windows of 512 tokens (decoders; default 8) of the search split.
    sensitivity_samples : int >= 1, optional
        Pairs (default 32) or windows of ``sensitivity_seq_len`` tokens (default 1) for the
        per-layer sensitivity (:mod:`optimum_lowrank.search.sensitivity`).
    sensitivity_seq_len : int in [8, 8192]
        Tokens per sensitivity window (decoders) or per sentence at most (encoders).
    bits : tuple of int
        Bit-widths each linear layer may get; a subset of the exporter's ``(2, 4, 8)``.
    embedding_bits : tuple of int
        Bit-widths of the token tables (every ``Gather`` table of 4 KB or more, and a tied head).
    embedding_ratios : tuple of float >= 1, optional
        Compression ratios of the token-embedding table (usage-aware truncated SVD, ``svd`` pass
        with frequency row weighting); 1 = not factorized. Default: 1, 2.5, 5, 10 for encoders, 1
        for decoders.
    keep_share : float in [0, 1)
        Share of a factorized table's budget spent on exact rows of the most frequent tokens
        (``keep_top_k = round(keep_share * V / ratio, -2)``). 0.16 reproduces the best measured
        MiniLM settings (1,000 rows at ratio 5, 500 at ratio 10; docs/usage_aware.md).
    algorithms : tuple of {"rtn", "hqq"}
        Weight-only algorithms of the linear layers, one per graph (token tables are always symmetric
        round-to-nearest: ``GatherBlockQuantized`` takes no float zero points). ``rtn``: symmetric
        round-to-nearest, no zero points. ``hqq``: Half-Quadratic Quantization (Badri & Shaji, 2023),
        asymmetric with a float zero point per block (4 more bytes per block). A layer's damage under
        ``hqq`` is estimated from its measured ``rtn`` damage with the quadratic rule below (the
        exact HQQ weight error over the RTN one, squared); each algorithm gets its own path and the
        one predicted to give the better answer is verified. Default ``rtn`` only: on SmolLM2,
        ``MatMulNBits`` with float zero points decoded at 0.17x the fp32 graph's speed, RTN at 1.8x
        (docs/edge_quantization.md); add ``hqq`` when the size matters more than decode speed.
    block_size : int or tuple of int, powers of 2 in [16, 256]
        Weights per scale of the weight-only quantization (one for the whole graph; the exporter
        uses the largest power of 2 up to it that divides a row). Several: the one whose greedy
        path predicts the better answer is verified (damage at the others estimated from the
        exact weight errors). Default 32, 64 and 128: on MiniLM, 4-bit weights in blocks of 64 gave
        the same STS-B as blocks of 32 at 0.8 MB less (docs/search.md).
    measure_all_bits : bool
        Measure every bit-width of every linear layer. False (default): the largest one is
        estimated from the next as ``damage * (error_top / error_next) ** 2`` (relative weight
        error; quadratic model of small perturbations), which halves the cost.
    max_rounds : int in [1, 20]
        Candidates exported, quantized and scored with ONNX Runtime along the chosen path (one more
        is allowed to check the largest candidate when none passed), plus at most one on another
        (block size, algorithm) path that now predicts a smaller graph within the budget.
    enforce_gate : bool
        A chosen graph that fails the objective on the gate data raises
        :class:`~optimum_lowrank.errors.ObjectiveNotMetError` (nothing written). False: it is
        written and the report says so.
    seed : int
        Seed of the passes (the search itself draws nothing at random).

    Raises
    ------
    pydantic.ValidationError
        No objective or several, bits outside ``(2, 4, 8)``, an objective that does not fit the
        metric, a block size that is not a power of 2.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_drop: float | None = Field(None, ge=0, le=100)
    max_increase: float | None = Field(None, ge=0, le=100)
    size_mb: float | None = Field(None, gt=0)
    metric: Literal["stsb_spearman", "perplexity"] | None = None
    data: str | None = None
    search_data: str | None = None
    calibration: str | None = None
    search_samples: int | None = Field(None, ge=2)
    sensitivity_samples: int | None = Field(None, ge=1)
    sensitivity_seq_len: int = Field(256, ge=8, le=8192)
    bits: tuple[int, ...] = (8, 4)
    embedding_bits: tuple[int, ...] = (8, 4)
    embedding_ratios: tuple[float, ...] | None = None
    algorithms: tuple[Literal["rtn", "hqq"], ...] = ("rtn",)
    keep_share: float = Field(0.16, ge=0, lt=1)
    block_size: int | tuple[int, ...] = (32, 64, 128)
    measure_all_bits: bool = False
    max_rounds: int = Field(4, ge=1, le=20)
    enforce_gate: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        given = [name for name in OBJECTIVES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one objective of {', '.join(OBJECTIVES)}; got {', '.join(given) or 'none'}")
        for name in ("bits", "embedding_bits"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name}: give at least one bit-width of {', '.join(map(str, BITS))}")
            wrong = [b for b in values if b not in BITS]
            if wrong:
                raise ValueError(f"{name}: {wrong} not supported by the weight-only exporter; allowed bit-widths: {', '.join(map(str, BITS))}")
        if not self.algorithms:
            raise ValueError("algorithms: give at least one of rtn, hqq")
        if self.embedding_ratios is not None and (not self.embedding_ratios or min(self.embedding_ratios) < 1):
            raise ValueError(f"embedding_ratios: give compression ratios >= 1 (1 = not factorized), got {list(self.embedding_ratios)}")
        wrong = [b for b in self.block_sizes if b < 16 or b > 256 or b & (b - 1)]
        if wrong or not self.block_sizes:
            raise ValueError(f"block_size: give powers of 2 in [16, 256], got {self.block_size}")
        if self.metric is not None:
            self.check_metric(self.metric)
        return self

    def check_metric(self, metric: str) -> None:
        """Raise ValueError if the accuracy objective does not suit ``metric`` (e.g. ``max_drop`` with perplexity)."""
        name = self.objective[0]
        wanted = SEARCH_METRICS.get(metric)
        if wanted is None:
            raise ValueError(f"metric {metric!r} cannot be searched; allowed: {', '.join(SEARCH_METRICS)}")
        if name != "size_mb" and name != wanted:
            raise ValueError(f"metric {metric!r} takes the objective {wanted!r} (or size_mb), not {name!r}")

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """``block_size`` as a sorted tuple."""
        return tuple(sorted({self.block_size} if isinstance(self.block_size, int) else set(self.block_size)))

    @property
    def objective(self) -> tuple[str, float]:
        """``(name, value)`` of the one objective set, e.g. ``("max_drop", 1.0)``."""
        name = next(n for n in OBJECTIVES if getattr(self, n) is not None)
        return name, float(getattr(self, name))

    def default(self, kind: str, field: str):
        """The value of ``field`` for a model of ``kind``: the one set, else :data:`KIND_DEFAULTS`."""
        value = getattr(self, field)
        return KIND_DEFAULTS[kind][field] if value is None else value
