"""Edge-grade weight-only quantization: block-wise 2/4/8-bit weights for every large table of a graph.

ONNX Runtime's :class:`~onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`
turns constant-weight ``MatMul`` nodes into ``com.microsoft.MatMulNBits``, but on its own
it leaves the biggest tables of a small language model in fp32:

- it quantizes token-embedding ``Gather`` tables at 4 bits only (8 bits is refused);
- a tied LM head is exported as ``MatMul(h, Transpose(E))``: its weight is not a
  constant, so no algorithm touches it (SmolLM2-135M: 113 MB of fp32 table kept).

This module quantizes those tables itself, in ORT's own layout, and calls ORT's quantizer
for the rest, one pass per bit-width (per-target ``overrides``):

1. **Tied tables.** When a float table ``E`` (V, d) feeds both a ``Gather`` and a
   ``MatMul(h, Transpose(E))``, one uint8 tensor of shape (V, ceil(d/b), b*bits/8) (the
   ``MatMulNBits`` weight layout, rows of ``E`` quantized along d in blocks of b) feeds
   both a ``GatherBlockQuantized`` (``quantize_axis=2``, then a Reshape to (..., d)) and a
   ``MatMulNBits`` (K=d, N=V). Symmetric quantization makes the default zero point
   ``2^(bits-1)`` identical in both ops. Only the scales are stored twice (V*d/b floats).
   This saves file bytes, not RAM: ``MatMulNBits`` pre-packs its own copy at session
   start (measured with ORT 1.32 on CPU: 131 MB RSS shared vs 121 MB with two copies; with
   pre-packing disabled 83 MB, but 40-50x slower).
2. **Other tables** read by a ``Gather`` (low-rank codes, exact rows of a hybrid table,
   tensor-train cores) get the same ``GatherBlockQuantized`` layout, unshared.
3. **Transposed constants.** ``MatMul(x, Transpose(W))`` with ``W`` an initializer used
   by nothing else (the factors of a low-rank tied head) gets ``W^T`` as a constant, so the
   quantizer sees it.
4. **MatMul weights** go through ORT's quantizer: ``rtn`` (ORT's native round-to-nearest,
   ``DefaultWeightOnlyQuantConfig``), ``k_quant`` or ``hqq`` (its 8-bit layers get symmetric ``rtn``: ORT's
   CPU ``MatMulNBits`` has no 8-bit kernel with float zero points). GPTQ is refused: in ORT 1.32
   its Hessian update reads the wrong triangle of the Cholesky factor
   (``neural_compressor/weight_only.py``), and its output was measured bit-identical to RTN.

``accuracy_level``: 8-bit and 2-bit ``MatMulNBits`` ran 60-100x slower on this CPU unless
``accuracy_level=4`` (int8 activations per block); it is the default for those widths,
and unset (fp32 activations) for 4 bits. The accuracy gate sees its effect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from optimum_lowrank.api import match_names
from optimum_lowrank.errors import RecipeError, TargetError
from optimum_lowrank.exporters.nbits import dequantize, pack, relative_error

__all__ = [
    "ALGORITHMS",
    "BITS",
    "WeightOnlySpec",
    "check_ort_support",
    "initializer_table",
    "module_path",
    "quantize_weight_only_model",
]

BITS = (2, 4, 8)
ALGORITHMS = ("rtn", "k_quant", "hqq")
MIN_TABLE_BYTES = 4096  # smaller Gather tables (e.g. token-type embeddings) stay float


@dataclass(frozen=True)
class WeightOnlySpec:
    """What to quantize and how; see :class:`optimum_lowrank.export_config.WeightOnlyConfig` for the options."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "rtn"
    accuracy_level: int | None = None
    embedding_bits: int = 8
    head_bits: int | None = None
    overrides: tuple[tuple[tuple[str, ...], int], ...] = ()
    exclude_nodes: tuple[str, ...] = ()

    def level_for(self, bits: int) -> int | None:
        if self.accuracy_level is not None:
            return self.accuracy_level
        return None if bits == 4 else 4


@dataclass
class WeightOnlyResult:
    """What :func:`quantize_weight_only_model` did: bits per weight and relative errors."""

    bits: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    shared_tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def module_path(node_name: str) -> str:
    """The module that exported an ONNX node: ``/model/layers.0/mlp/down_proj/MatMul`` -> ``model.layers.0.mlp.down_proj``."""
    parts = [p for p in node_name.strip("/").split("/") if p]
    return ".".join(parts[:-1])


def _module_prefixes(node_name: str) -> list[str]:
    parts = module_path(node_name).split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts)) if parts[0]]


# --------------------------------------------------------------------------- graph surgery


class _Graph:
    """Index of one ONNX graph: initializers, producers and consumers of each tensor."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def float_table(self, name: str) -> bool:
        from onnx import TensorProto

        t = self.inits.get(name)
        return t is not None and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(t.dims) == 2

    def add(self, array: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def drop_unused(self) -> None:
        used = {name for node in self.graph.node for name in node.input} | {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        self.refresh()


def _gather_quantized(g: _Graph, gather, data: str, scales: str, bits: int, block: int, d: int) -> list:
    """GatherBlockQuantized on a (V, kb, blob) table, reshaped (and sliced) back to (..., d)."""
    from onnx import helper

    out, ids = gather.output[0], gather.input[1]
    name = re.sub(r"\W", "_", gather.name or out)
    kb_block = g.inits[data].dims[1] * block
    minus_one = g.add(np.array([-1], dtype=np.int64), f"{name}_minus_one")
    nodes = [
        helper.make_node("GatherBlockQuantized", [data, ids, scales], [f"{name}_q"], name=f"{name}_Q{bits}", domain="com.microsoft",
                         bits=bits, block_size=block, gather_axis=0, quantize_axis=2),
        helper.make_node("Shape", [ids], [f"{name}_ids_shape"], name=f"{name}_ids_shape"),
        helper.make_node("Concat", [f"{name}_ids_shape", minus_one], [f"{name}_out_shape"], name=f"{name}_out_shape", axis=0),
    ]
    if kb_block == d:
        nodes.append(helper.make_node("Reshape", [f"{name}_q", f"{name}_out_shape"], [out], name=f"{name}_reshape"))
        return nodes
    zero, end, axis = (g.add(np.array([v], dtype=np.int64), f"{name}_{label}") for label, v in (("zero", 0), ("end", d), ("axis", -1)))
    nodes += [
        helper.make_node("Reshape", [f"{name}_q", f"{name}_out_shape"], [f"{name}_padded"], name=f"{name}_reshape"),
        helper.make_node("Slice", [f"{name}_padded", zero, end, axis], [out], name=f"{name}_slice"),
    ]
    return nodes


def _strip_runtime_zeros(g: _Graph) -> None:
    """Undo :func:`optimum_lowrank.layers.base.runtime_zero`: ``Add(W, ConstantOfShape(0))`` -> ``W``.

    The zero only keeps the exporter from constant-folding a tied table into a second fp32
    copy; once the tables are quantized here it hides the table from the quantizer.
    """
    rename: dict[str, str] = {}
    dead: set[str] = set()
    for add in [n for n in g.graph.node if n.op_type == "Add"]:
        for table, other in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            zero = g.producer.get(other)
            if g.float_table(table) and zero is not None and zero.op_type == "ConstantOfShape" and _is_zero(zero):
                rename[add.output[0]] = table
                dead.add(_key(add))
                break
    if not rename:
        return
    kept = [n for n in g.graph.node if _key(n) not in dead]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.graph.node[:]
    g.graph.node.extend(kept)
    _drop_dead_nodes(g)


def _is_zero(constant_of_shape) -> bool:
    from onnx import numpy_helper

    value = _attr(constant_of_shape, "value", None)
    return value is None or not numpy_helper.to_array(value).any()


def _drop_dead_nodes(g: _Graph) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), then unused initializers."""
    outputs = {o.name for o in g.graph.output}
    while True:
        read = {name for node in g.graph.node for name in node.input} | outputs
        live = [n for n in g.graph.node if any(o in read for o in n.output)]
        if len(live) == len(g.graph.node):
            break
        del g.graph.node[:]
        g.graph.node.extend(live)
    g.drop_unused()


def _quantize_tables(g: _Graph, spec: WeightOnlySpec, result: WeightOnlyResult) -> None:
    """Steps 1-3 of the module docstring: Gather tables (shared with a tied head where there is one)."""
    from onnx import helper

    replace: dict[str, list] = {}
    drop: set[str] = set()
    for gather in [n for n in g.graph.node if n.op_type == "Gather"]:
        table = gather.input[0]
        if not g.float_table(table) or g.inits[table].ByteSize() < MIN_TABLE_BYTES or _attr(gather, "axis", 0) != 0:
            continue
        weight = g.array(table).astype(np.float32)
        v, d = weight.shape
        heads = [t for t in g.consumers.get(table, []) if t.op_type == "Transpose" and list(_attr(t, "perm", [1, 0])) == [1, 0]]
        head_matmuls = [(t, m) for t in heads for m in g.consumers.get(t.output[0], []) if m.op_type == "MatMul" and m.input[1] == t.output[0]]
        others = [c for c in g.consumers.get(table, []) if c is not gather and c not in heads]
        shared = bool(head_matmuls) and not others
        bits = spec.embedding_bits
        if shared and spec.head_bits is not None and spec.head_bits != bits:
            shared = False
            result.notes.append(f"{table}: head_bits {spec.head_bits} != embedding_bits {bits}: the head gets its own copy")
        block = fit_block(d, spec.block_size)
        packed, scales, _ = pack(weight, bits, block, True)
        stem = re.sub(r"\W", "_", table)
        data = g.add(packed, f"{stem}_Q{bits}")
        scales3 = g.add(scales.reshape(v, -1, 1), f"{stem}_scales3")
        replace[_key(gather)] = _gather_quantized(g, gather, data, scales3, bits, block, d)
        result.bits[table] = bits
        result.errors[table] = relative_error(weight, dequantize(packed, scales, None, bits, d))
        if shared:
            scales2 = g.add(scales, f"{stem}_scales")
            level = spec.level_for(bits)
            for transpose, matmul in head_matmuls:
                extra = {} if level is None else {"accuracy_level": level}
                replace[_key(matmul)] = [helper.make_node(
                    "MatMulNBits", [matmul.input[0], data, scales2], list(matmul.output), name=f"{matmul.name}_Q{bits}",
                    domain="com.microsoft", K=d, N=v, bits=bits, block_size=block, **extra)]
                drop.add(_key(transpose))
                result.bits[matmul.name] = bits
            result.shared_tables.append(table)
    _fold_transposes(g, drop)
    nodes = []
    for node in g.graph.node:
        if _key(node) in drop:
            continue
        nodes.extend(replace.get(_key(node), [node]))
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    _drop_dead_nodes(g)


def _fold_transposes(g: _Graph, drop: set[str]) -> None:
    """``MatMul(x, Transpose(W))`` with a 2-D float initializer W: store ``W^T`` so the quantizer sees a constant."""
    for transpose in [n for n in g.graph.node if n.op_type == "Transpose" and _key(n) not in drop]:
        source = transpose.input[0]
        users = g.consumers.get(transpose.output[0], [])
        if not g.float_table(source) or not users or any(u.op_type != "MatMul" or u.input[1] != transpose.output[0] for u in users):
            continue
        g.add(np.ascontiguousarray(g.array(source).T), transpose.output[0])
        drop.add(_key(transpose))


def _key(node) -> str:
    """A node's identity for rewriting: its first output (unique in a valid graph)."""
    return node.output[0]


def _attr(node, name: str, default):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


# --------------------------------------------------------------------------- MatMul weights through ORT


def constant_matmuls(model) -> dict[str, str]:
    """ONNX MatMul node name -> its constant 2-D float weight initializer, in graph order."""
    g = _Graph(model)
    return {n.name: n.input[1] for n in g.graph.node if n.op_type == "MatMul" and g.float_table(n.input[1])}


def plan_bits(names: Sequence[str], spec: WeightOnlySpec, head_names: Iterable[str] = ()) -> dict[str, int]:
    """Bits per MatMul node: the last matching override, the head's bits, else ``spec.bits``.

    Raises
    ------
    TargetError
        If an override pattern matches no quantizable MatMul (the message lists some module names).
    """
    modules = {name: _module_prefixes(name) for name in names}
    every_module = sorted({m for prefixes in modules.values() for m in prefixes})
    plan = {name: spec.bits for name in names if name not in spec.exclude_nodes}
    for name in head_names:
        if name in plan:
            plan[name] = spec.head_bits or spec.embedding_bits
    for patterns, bits in spec.overrides:
        for pattern in patterns:
            matched = set(match_names(pattern, every_module))
            hit = [name for name, prefixes in modules.items() if matched.intersection(prefixes) and name in plan]
            if not hit:
                shown = ", ".join(m for m in every_module if m.count(".") <= 4)[:400]
                raise TargetError(f"weight_only override {pattern!r} matches no quantizable MatMul; modules: {shown}")
            plan.update(dict.fromkeys(hit, bits))
    return plan


def layer_algorithm(algorithm: str, bits: int) -> str:
    """The algorithm a ``MatMul`` quantized at ``bits`` really gets: ``hqq`` at 8 bits falls back to symmetric
    ``rtn`` (ONNX Runtime's CPU ``MatMulNBits`` has no 8-bit kernel with float zero points)."""
    return "rtn" if algorithm == "hqq" and bits == 8 else algorithm


def _algo_config(spec: WeightOnlySpec, bits: int):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if spec.algorithm == "rtn":
        return mnq.DefaultWeightOnlyQuantConfig(
            block_size=spec.block_size, is_symmetric=spec.symmetric, accuracy_level=spec.level_for(bits), bits=bits
        )
    if spec.algorithm == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=bits)
    if spec.algorithm == "k_quant":
        return mnq.KQuantWeightOnlyQuantConfig()
    raise RecipeError(f"unknown weight-only algorithm {spec.algorithm!r}; allowed: {', '.join(ALGORITHMS)}")


def fit_block(k: int, block: int) -> int:
    """The block size for a weight whose rows have ``k`` values: the largest power of 2 in
    [16, ``block``] that divides ``k`` (no padded block: SmolLM2's 576 in blocks of 128 would
    store 11% padding), else ``block`` itself (the last block is padded)."""
    size = block
    while size >= 16:
        if k % size == 0:
            return size
        size //= 2
    return block


def _quantize_matmuls(model, plan: dict[str, int], spec: WeightOnlySpec, k_of: dict[str, int]):
    """One ORT quantizer pass per (bits, block size); every other MatMul is excluded from that pass."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    groups: dict[tuple[int, int], list[str]] = {}
    for name, bits in plan.items():
        groups.setdefault((bits, fit_block(k_of[name], spec.block_size)), []).append(name)
    for (bits, block), chosen in sorted(groups.items(), reverse=True):
        excluded = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in chosen]
        group_spec = replace(spec, block_size=block)
        if layer_algorithm(spec.algorithm, bits) != spec.algorithm:  # hqq at 8 bits
            group_spec = replace(group_spec, algorithm=layer_algorithm(spec.algorithm, bits), symmetric=True)
        config = _algo_config(group_spec, bits)
        if spec.algorithm == "k_quant":
            config.customized_weight_config = {name: {"bits": bits, "group_size": block,
                                                      "scheme": "sym" if spec.symmetric else "asym"} for name in chosen}
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block, is_symmetric=group_spec.symmetric, accuracy_level=spec.level_for(bits),
            nodes_to_exclude=excluded, algo_config=config,
        )
        quantizer.process()
        model = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    return model


def _matmul_errors(model, originals: dict[str, np.ndarray], result: WeightOnlyResult) -> None:
    """Relative Frobenius error of each quantized MatMul weight, read back from the MatMulNBits blobs."""
    g = _Graph(model)
    for node in g.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        original = next((name for name in originals if node.name.startswith(name + "_Q") or node.name == name), None)
        if original is None or original in result.errors:
            continue
        bits, k = _attr(node, "bits", 4), _attr(node, "K", 0)
        zero = g.array(node.input[3]) if len(node.input) > 3 and node.input[3] in g.inits else None
        approx = dequantize(g.array(node.input[1]), g.array(node.input[2]), zero, bits, k)
        result.bits[original] = bits
        result.errors[original] = relative_error(originals[original].T, approx)


def check_ort_support(spec: WeightOnlySpec) -> None:
    """Raise :class:`RecipeError` naming the installed ONNX Runtime if it lacks the bits or algorithm of ``spec``."""
    import onnxruntime
    from onnxruntime.capi import _pybind_state
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    widths = [b for b in BITS if hasattr(_pybind_state, f"quantize_matmul_{b}bits")]
    wanted = {spec.bits, spec.embedding_bits, *(bits for _, bits in spec.overrides)} | ({spec.head_bits} - {None})
    if not wanted <= set(widths):
        raise RecipeError(f"onnxruntime {onnxruntime.__version__} quantizes MatMulNBits weights to {widths} bits only, not {sorted(wanted - set(widths))}")
    configs = {"rtn": "DefaultWeightOnlyQuantConfig", "k_quant": "KQuantWeightOnlyQuantConfig", "hqq": "HQQWeightOnlyQuantConfig"}
    have = [name for name, cls in configs.items() if hasattr(mnq, cls)]
    if spec.algorithm not in have:
        raise RecipeError(f"onnxruntime {onnxruntime.__version__} has no {spec.algorithm!r} weight-only quantizer; it has {', '.join(have)}")


def quantize_weight_only_model(model, spec: WeightOnlySpec) -> tuple[object, WeightOnlyResult]:
    """Quantize an in-memory ``onnx.ModelProto`` (modified in place) as the module docstring says.

    Parameters
    ----------
    model : onnx.ModelProto
        An fp32 graph with its weights loaded (external data read in).
    spec : WeightOnlySpec

    Returns
    -------
    model : onnx.ModelProto
        The quantized graph (opset >= 21 / IR 10 where ORT's quantizer raises them).
    result : WeightOnlyResult
        Bits and relative Frobenius error per quantized weight (keyed by ONNX node or
        table name), the tables shared with a tied head, notes.

    Raises
    ------
    RecipeError
        Unknown algorithm or bits.
    TargetError
        An override that matches no quantizable MatMul.
    """
    from onnx import helper

    if spec.bits not in BITS or spec.embedding_bits not in BITS:
        raise RecipeError(f"weight_only bits must be one of {BITS}, got {spec.bits} / {spec.embedding_bits}")
    check_ort_support(spec)
    result = WeightOnlyResult()
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    g = _Graph(model)
    _strip_runtime_zeros(g)
    _quantize_tables(g, spec, result)
    weights = constant_matmuls(model)
    originals = {name: g.array(init) for name, init in weights.items()}
    heads = [name for name in weights if module_path(name).split(".")[-1] in ("lm_head", "embed_out", "output")]
    plan = plan_bits(list(weights), spec, heads)
    if plan:
        model = _quantize_matmuls(model, plan, spec, {name: originals[name].shape[0] for name in plan})
    _matmul_errors(model, originals, result)
    return model, result


def initializer_table(model_or_path, min_bytes: int = 100_000) -> list[dict[str, object]]:
    """Initializers of at least ``min_bytes``: name, dtype, shape and stored bytes, largest first."""
    import onnx
    from onnx import helper

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(Path(model_or_path)))
    rows = []
    for t in model.graph.initializer:
        dims = list(t.dims)
        size = int(np.prod(dims)) if dims else 1
        stored = len(t.raw_data) or size * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        if stored >= min_bytes:
            rows.append({"name": t.name, "dtype": helper.tensor_dtype_to_np_dtype(t.data_type).name, "shape": dims, "bytes": int(stored)})
    return sorted(rows, key=lambda r: -r["bytes"])
