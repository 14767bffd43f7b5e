"""Bytes of each choice in ONNX Runtime's layout, and the greedy allocation that trades them for damage.

Byte model
----------
The weight-only exporter (:mod:`optimum_lowrank.exporters.weight_only`) stores, for a weight of
``N`` rows quantized along ``K`` in blocks of ``b`` at ``q`` bits (``MatMulNBits``: ``N`` =
out_features, ``K`` = in_features; a ``Gather`` table ``(V, d)``: ``N = V``, ``K = d``):

- packed codes: ``N * ceil(K / b) * b * q / 8`` bytes (the last block padded);
- one float32 scale per block: ``4 * N * ceil(K / b)`` bytes;
- a table shared by a ``Gather`` and a tied head stores its codes once and its scales twice;
- symmetric round-to-nearest stores no zero points; HQQ (``algorithms: [hqq]``) stores a float32 zero point per block (below 8 bits: its 8-bit layers are symmetric RTN);
- a few hundred bytes of protobuf framing per quantized weight (:data:`MATMUL_FRAMING`, :data:`TABLE_FRAMING`).

Everything else stays as exported: norms, biases, tables under 4 KB (``MIN_TABLE_BYTES``),
integer buffers, ``Gemm`` weights (GPT-2's ``Conv1D``: ORT quantizes ``MatMul`` only), constants
and the protobuf framing. Those bytes are read off the exported fp32 graph (its file size minus
the weights that get quantized), so layers the graph drops (BERT's pooler in a
``feature-extraction`` export) are not counted.

Allocation
----------
Every searched unit (a linear layer: its bit-width; the token-embedding group: compression ratio
and bit-width) has choices with bytes and a measured damage. :func:`greedy_path` starts from every
unit's largest choice and repeatedly takes the single change with the least damage per byte
saved, until every unit is at its smallest choice: a path of configurations of decreasing size
that approximates the Pareto front of size vs damage (the marginal-analysis / greedy knapsack
used for mixed precision by HAWQ-V2/V3 and for rank allocation by ASVD/SVD-LLM-style searches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optimum_lowrank.exporters.weight_only import MIN_TABLE_BYTES, constant_matmuls, fit_block, layer_algorithm, module_path

#: Protobuf bytes the exporter adds per quantized MatMul (``MatMulNBits`` attributes, the scales'
#: initializer) and per quantized table (``GatherBlockQuantized`` and its Shape / Concat / Reshape
#: nodes and constants), measured on tiny BERT / GPT-2 / Llama graphs; noise beside real weights.
MATMUL_FRAMING = 160
TABLE_FRAMING = 700

__all__ = [
    "Choice",
    "DamageModel",
    "GraphLayout",
    "PathPoint",
    "Unit",
    "fill_gap",
    "greedy_path",
    "matmul_bytes",
    "pick_index",
    "table_bytes",
]


def matmul_bytes(rows: int, cols: int, bits: int, block_size: int, zero_points: bool = False) -> int:
    """Bytes of a ``(rows, cols)`` weight quantized along ``cols``: codes and scales (symmetric), plus a float
    zero point per block with ``zero_points`` (HQQ).

    Parameters
    ----------
    rows : int
        ``N``: out_features of a MatMul weight, rows of a table.
    cols : int
        ``K``: the quantized axis (in_features, embedding_dim).
    bits : int, one of 2, 4, 8
    block_size : int, power of 2
    zero_points : bool
        HQQ's float32 zero point per block.

    Returns
    -------
    int
        ``rows * ceil(cols / b) * (b * bits / 8 + 4)`` (``+ 8`` with zero points) with ``b = fit_block(cols, block_size)`` (the exporter
        uses the largest power of 2 up to ``block_size`` that divides ``cols``, if any).
    """
    block = fit_block(cols, block_size)
    blocks = -(-cols // block)
    return rows * blocks * (block * bits // 8 + (8 if zero_points else 4))


def table_bytes(rows: int, cols: int, bits: int, block_size: int, shared_head: bool) -> int:
    """Bytes of a ``Gather`` table (``GatherBlockQuantized``); a tied head adds a second copy of the scales."""
    blocks = -(-cols // fit_block(cols, block_size))
    return matmul_bytes(rows, cols, bits, block_size) + (4 * rows * blocks if shared_head else 0)


@dataclass
class GraphLayout:
    """What the weight-only exporter will quantize in one fp32 graph, and what it keeps.

    Attributes
    ----------
    fixed_bytes : int
        File bytes that do not depend on the bit-widths (file size minus the fp32 weights below).
    linears : dict
        Module path -> ``[(N, K), ...]`` of its constant ``MatMul`` weights (outside the embedding).
    group_linears : list of (N, K)
        Constant ``MatMul`` weights inside the token embedding (a factorized table's projection);
        they get the embedding's bits.
    tables : dict
        Initializer name -> ``(V, d, shared_with_head)`` of each ``Gather`` table of at least
        ``MIN_TABLE_BYTES`` (quantized at the embedding's bits).
    """

    fixed_bytes: int
    linears: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    group_linears: list[tuple[int, int]] = field(default_factory=list)
    tables: dict[str, tuple[int, int, bool]] = field(default_factory=dict)

    @classmethod
    def from_graph(cls, model, file_bytes: int, embedding_prefix: str | None = None) -> GraphLayout:
        """Classify the initializers of an fp32 ``onnx.ModelProto`` as the exporter will.

        Parameters
        ----------
        model : onnx.ModelProto
            The exported fp32 graph, weights loaded.
        file_bytes : int
            Its size on disk (external data included).
        embedding_prefix : str, optional
            Module path of the token embedding: constant MatMuls under it go to ``group_linears``.
        """
        import numpy as np
        from onnx import TensorProto

        inits = {t.name: t for t in model.graph.initializer}
        consumers: dict[str, list] = {}
        producer = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)

        def is_float_2d(name: str) -> bool:
            t = inits.get(name)
            return t is not None and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(t.dims) == 2

        def fp_bytes(name: str) -> int:
            t = inits[name]
            return int(np.prod(t.dims)) * (2 if t.data_type == TensorProto.FLOAT16 else 4)

        layout = cls(fixed_bytes=file_bytes)
        for node_name, weight in constant_matmuls(model).items():
            k, n = (int(d) for d in inits[weight].dims)
            path = module_path(node_name)
            if embedding_prefix and (path == embedding_prefix or path.startswith(embedding_prefix + ".")):
                layout.group_linears.append((n, k))
            else:
                layout.linears.setdefault(path, []).append((n, k))
            layout.fixed_bytes -= fp_bytes(weight)
        for node in model.graph.node:
            table = node.input[0] if node.op_type == "Gather" and node.input else None
            if table is None or table in layout.tables or not is_float_2d(table) or fp_bytes(table) < MIN_TABLE_BYTES:
                continue
            if any(a.name == "axis" and a.i != 0 for a in node.attribute):
                continue
            v, d = (int(x) for x in inits[table].dims)
            layout.tables[table] = (v, d, _feeds_tied_head(table, consumers, producer))
            layout.fixed_bytes -= fp_bytes(table)
        return layout

    def replace_embedding(self, table: str, parameters: Sequence[tuple[str, str, tuple[int, ...], int]]) -> GraphLayout:
        """The layout after the token table ``table`` is replaced by a factorized module.

        Parameters
        ----------
        table : str
            The original table's initializer name (its ``Gather`` table in this layout).
        parameters : sequence of (name, role, shape, bytes)
            The new module's tensors: role ``"linear"`` (an ``nn.Linear`` weight ``(N, K)``, exported
            as a constant MatMul), ``"table"`` (a float table read by a ``Gather``) or ``"fixed"``
            (kept as exported: a small table, an integer index). ``bytes``: as stored in fp32.
        """
        tables = dict(self.tables)
        _, _, shared = tables.pop(table)
        out = GraphLayout(self.fixed_bytes, {k: list(w) for k, w in self.linears.items()}, list(self.group_linears), tables)
        for name, role, shape, nbytes in parameters:
            if role == "linear":
                out.group_linears.append((shape[0], shape[1]))
            elif role == "table" and nbytes >= MIN_TABLE_BYTES:
                out.tables[name] = (shape[0], shape[1], shared)
            else:
                out.fixed_bytes += nbytes
        return out

    def linear_bytes(self, unit: str, bits: int, block_size: int, algorithm: str = "rtn") -> int:
        """Bytes of one linear unit's MatMuls at ``bits`` (``algorithm`` ``hqq`` stores float zero points below 8 bits)."""
        zero = layer_algorithm(algorithm, bits) == "hqq"
        return sum(matmul_bytes(n, k, bits, block_size, zero) for n, k in self.linears[unit]) + MATMUL_FRAMING * len(self.linears[unit])

    def embedding_bytes(self, bits: int, block_size: int, algorithm: str = "rtn") -> int:
        """Bytes of every ``Gather`` table (always symmetric) and of the embedding's own MatMuls at ``bits``."""
        zero = layer_algorithm(algorithm, bits) == "hqq"
        return sum(table_bytes(v, d, bits, block_size, s) + TABLE_FRAMING for v, d, s in self.tables.values()) + sum(
            matmul_bytes(n, k, bits, block_size, zero) + MATMUL_FRAMING for n, k in self.group_linears
        )

    def nbytes(self, linear_bits: Mapping[str, int], embedding_bits: int, block_size: int, algorithm: str = "rtn") -> int:
        """Predicted file size in bytes with ``linear_bits[unit]`` per linear unit and ``embedding_bits``."""
        return (
            self.fixed_bytes
            + sum(self.linear_bytes(unit, linear_bits[unit], block_size, algorithm) for unit in self.linears)
            + self.embedding_bytes(embedding_bits, block_size, algorithm)
        )




def _feeds_tied_head(table: str, consumers: Mapping[str, list], producer: Mapping[str, object]) -> bool:
    """Whether ``table`` (or ``table + runtime zero``) reaches a ``MatMul`` through a ``Transpose``."""
    frontier = [table]
    for _ in range(2):
        following = []
        for name in frontier:
            for node in consumers.get(name, []):
                if node.op_type == "Transpose" and any(m.op_type == "MatMul" and m.input[1] == node.output[0] for m in consumers.get(node.output[0], [])):
                    return True
                if node.op_type == "Add":
                    other = node.input[1] if node.input[0] == name else node.input[0]
                    if getattr(producer.get(other), "op_type", None) == "ConstantOfShape":
                        following.append(node.output[0])
        frontier = following
    return False


# --------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Choice:
    """One option of a unit: what it is, its bytes and its measured damage (proxy units)."""

    value: tuple
    nbytes: int
    damage: float


@dataclass(frozen=True)
class Unit:
    """A searched unit: a linear layer (choices: bits) or the token-embedding group (ratio, bits)."""

    name: str
    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"unit {self.name!r} has no choice")


@dataclass(frozen=True)
class PathPoint:
    """One configuration on the greedy path: the choice index of every unit, its bytes and damage."""

    index: int
    picks: tuple[int, ...]
    nbytes: int
    damage: float
    step: str


def greedy_path(units: Sequence[Unit], fixed_bytes: int) -> list[PathPoint]:
    """Configurations of decreasing size, each one change away from the previous.

    Choices another choice of the same unit beats on both bytes and damage are dropped. Point 0
    has every unit at its largest remaining choice. Each step considers, for every unit, every
    choice smaller than its current one, scored by ``(damage(new) - damage(current)) / bytes
    saved``, and takes the lowest score (ties: first unit, then first choice, so the path is
    deterministic). It ends when no unit can get smaller.

    Parameters
    ----------
    units : sequence of Unit
    fixed_bytes : int
        Bytes no choice changes (added to every point).

    Returns
    -------
    list of PathPoint
        ``nbytes`` strictly decreasing; ``damage`` the sum of the units' damages (clipped at 0 each).
    """
    allowed = [_efficient(u.choices) for u in units]
    picks = [max(keep, key=lambda i, u=u: (u.choices[i].nbytes, -i)) for u, keep in zip(units, allowed)]

    def point(index: int, step: str) -> PathPoint:
        chosen = [u.choices[p] for u, p in zip(units, picks)]
        return PathPoint(index, tuple(picks), fixed_bytes + sum(c.nbytes for c in chosen), sum(max(c.damage, 0.0) for c in chosen), step)

    path = [point(0, "start: every unit at its largest choice")]
    while True:
        best = None
        for ui, unit in enumerate(units):
            current = unit.choices[picks[ui]]
            for ci in allowed[ui]:
                choice = unit.choices[ci]
                saved = current.nbytes - choice.nbytes
                if saved <= 0:
                    continue
                score = (max(choice.damage, 0.0) - max(current.damage, 0.0)) / saved
                if best is None or score < best[0]:
                    best = (score, ui, ci)
        if best is None:
            return path
        _, ui, ci = best
        before = units[ui].choices[picks[ui]].value
        picks[ui] = ci
        path.append(point(len(path), f"{units[ui].name}: {_label(before)} -> {_label(units[ui].choices[ci].value)}"))


def fill_gap(units: Sequence[Unit], smaller: PathPoint, limit_bytes: int, fixed_bytes: int) -> list[PathPoint]:
    """Configurations between two neighbours of the path, for when one step is a big jump in bytes.

    Starts from ``smaller`` (the neighbour that failed, or fits a size) and repeatedly takes the change
    to a larger choice that removes the most damage per byte added, while the total stays below
    ``limit_bytes`` (the larger neighbour's bytes, or the size budget). A step of the path that
    factorizes the token table saves megabytes at once; the points found here keep that step and
    give some layers their larger choice back instead.

    Returns
    -------
    list of PathPoint
        In order of increasing bytes (``index`` -1: the caller numbers them).
    """
    allowed = [_efficient(u.choices) for u in units]
    picks = list(smaller.picks)
    points = []

    def total() -> int:
        return fixed_bytes + sum(u.choices[p].nbytes for u, p in zip(units, picks))

    while True:
        best, current = None, total()
        for ui, unit in enumerate(units):
            now = unit.choices[picks[ui]]
            for ci in allowed[ui]:
                choice = unit.choices[ci]
                added = choice.nbytes - now.nbytes
                if added <= 0 or current + added >= limit_bytes:
                    continue
                gain = (max(now.damage, 0.0) - max(choice.damage, 0.0)) / added
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, ui, ci)
        if best is None:
            return points
        _, ui, ci = best
        before = units[ui].choices[picks[ui]].value
        picks[ui] = ci
        damage = sum(max(u.choices[p].damage, 0.0) for u, p in zip(units, picks))
        points.append(PathPoint(-1, tuple(picks), total(), damage, f"gap: {units[ui].name}: {_label(before)} -> {_label(units[ui].choices[ci].value)}"))


def _efficient(choices: Sequence[Choice]) -> list[int]:
    """Indices of the choices no other beats on both bytes and damage (e.g. a factorized table that block
    padding makes larger than the plain one), in order."""
    def beaten(c: Choice, i: int) -> bool:
        return any(
            (o.nbytes <= c.nbytes and max(o.damage, 0.0) <= max(c.damage, 0.0)) and (o.nbytes, max(o.damage, 0.0), j) < (c.nbytes, max(c.damage, 0.0), i)
            for j, o in enumerate(choices) if j != i
        )

    return [i for i, c in enumerate(choices) if not beaten(c, i)]


def _label(value: tuple) -> str:
    if len(value) == 1:
        return f"{value[0]}-bit"
    return f"ratio {value[0]:g}, {value[1]}-bit"


@dataclass
class DamageModel:
    """Maps the summed proxy damage of a configuration to the metric's damage.

    ``additive`` (encoders): drop in metric points ``= scale * proxy``.
    ``log`` (decoders, proxy = mean KL divergence of the next-token distributions, nats per token:
    the expected NLL increase): relative perplexity increase
    ``= exp(scale * proxy) - 1`` (``scale`` 1 is exact when the proxy is measured on the same text).
    ``scale`` starts at a prior and is refitted to each ONNX Runtime measurement (:meth:`fit`).
    """

    form: str
    scale: float

    def metric_damage(self, proxy: float) -> float:
        x = self.scale * max(proxy, 0.0)
        return math.expm1(min(x, 700.0)) if self.form == "log" else x

    def fit(self, proxy: float, measured: float) -> None:
        """Set ``scale`` so that ``proxy`` maps to ``measured`` (ignored when either is not positive)."""
        if proxy <= 0 or measured <= 0:
            return
        self.scale = (math.log1p(measured) if self.form == "log" else measured) / proxy


def pick_index(path: Sequence[PathPoint], objective: str, budget: float, damage: DamageModel, lo: int, hi: int,
               size_offset: int = 0) -> int:
    """The next path index to verify, strictly inside the bracket ``(lo, hi)``.

    Accuracy objectives: ``lo`` is the largest index known to pass (-1: none), ``hi`` the smallest
    known to fail (``len(path)``: none); the guess is the last point whose predicted metric damage
    is within ``budget``. ``size_mb``: ``lo`` is the largest index known not to fit, ``hi`` the
    smallest known to fit; the guess is the first point whose predicted bytes plus ``size_offset``
    (real minus predicted, from the last measurement) fit ``budget`` MB. Clamped into ``(lo, hi)``.
    """
    if objective == "size_mb":
        fits = [p.index for p in path if p.nbytes + size_offset <= budget * 1e6]
        guess = fits[0] if fits else len(path) - 1
    else:
        within = [p.index for p in path if damage.metric_damage(p.damage) <= budget]
        guess = within[-1] if within else 0
    return min(max(guess, lo + 1), hi - 1)
