"""Per-layer sensitivity: the damage of changing one unit alone, measured in PyTorch.

For every linear layer that the ONNX graph turns into a constant ``MatMul`` and every candidate
bit-width, the layer's weight is fake-quantized with exactly the block layout ONNX Runtime's
``MatMulNBits`` stores (:func:`optimum_lowrank.exporters.nbits.pack` on ``W`` as ``(N, K)``
rows, then :func:`~optimum_lowrank.exporters.weight_only.dequantize`), every other weight left in
fp32, and a few batches of the search split are run:

- decoders: the mean KL divergence of the next-token distributions from the original's on
  WikiText-2 valid windows (nats per token): the expected increase of the token negative
  log-likelihood under the original's own predictions, so ``exp`` of a summed divergence predicts
  the perplexity ratio. Not the NLL increase on the window's own tokens: on SmolLM2 that was at
  or below 0 for 82 of 210 layers at 4 bits (sampling noise on 255 tokens), which made them look
  free; together they cost +4.6% perplexity. The divergence is positive and far less noisy;
- encoders: the mean ``1 - cos`` between the mean-pooled embeddings and the original's on
  STS-B train sentences (cheap, and monotone with the loss of Spearman correlation).

The token-embedding group is measured the same way for every (compression ratio, bits): the
``svd`` pass is applied to a copy of the model at each ratio and every ``Gather`` table (and the
factorized table's projection) is fake-quantized at each bit-width.

Only the transformer blocks from the changed layer onwards are recomputed: the outputs of the
earlier blocks are recorded once and replayed (exact: a block's input does not depend on later
blocks). Results are cached on disk (``$OPTIMUM_LOWRANK_CACHE/search/``) per model weights,
data and options.

References
----------
.. [1] Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
   NeurIPS 2020, arXiv:1911.03852 (per-layer sensitivity drives mixed precision).
.. [2] Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
   Language Models", arXiv:2312.05821 (per-layer sensitivity of each truncation, measured by
   perplexity on calibration data, then a global search).
.. [3] Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
   Model Compression", arXiv:2403.07378.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from optimum_lowrank.evaluation.base import hidden_state, mean_pool, torch_forward
from optimum_lowrank.exporters.nbits import dequantize, pack
from optimum_lowrank.exporters.weight_only import fit_block, layer_algorithm
from optimum_lowrank.output import read_json_cache, write_json_cache
from optimum_lowrank.progress import bar

__all__ = ["Probe", "Sensitivity", "fake_quantize", "key", "measure_sensitivity", "model_fingerprint"]

CACHE_FORMAT = 2


def fake_quantize(rows: Tensor, bits: int, block_size: int, algorithm: str = "rtn") -> Tensor:
    """``rows`` (N, K) quantized along K in blocks and dequantized, exactly as the exporter stores it.

    The block is :func:`~optimum_lowrank.exporters.weight_only.fit_block` of K and ``block_size``.
    ``rtn``: symmetric round-to-nearest through ORT's own C++ quantizer (:func:`~optimum_lowrank.exporters.nbits.pack`);
    ``hqq``: ORT's HQQ quantizer (asymmetric, float scale and zero point per block), the code
    ``MatMulNBitsQuantizer`` runs for ``algorithm: hqq`` (at 8 bits the exporter uses ``rtn``, and so does this).

    Parameters
    ----------
    rows : Tensor, shape (N, K)
        A weight as ``MatMulNBits`` stores it (out_features rows of in_features values).
    bits : {2, 4, 8}
    block_size : int, power of 2 in [16, 256]
    algorithm : {"rtn", "hqq"}

    Returns
    -------
    Tensor, shape (N, K), the dtype of ``rows``

    Raises
    ------
    ValueError
        For another algorithm.

    References
    ----------
    Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023),
    https://mobiusml.github.io/hqq_blog/.
    """
    block = fit_block(rows.shape[1], block_size)
    algorithm = layer_algorithm(algorithm, bits)  # hqq at 8 bits is exported as rtn
    if algorithm == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

        quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=bits))
        codes, scales, zeros = quantizer.quantize_internal(rows.detach().float().cpu(), bits=bits, group_size=block)
        n, k = rows.shape
        grid = codes.float().reshape(n, -1, block)
        return ((grid - zeros.reshape(n, -1, 1)) * scales.reshape(n, -1, 1)).reshape(n, -1)[:, :k].to(rows.dtype)
    if algorithm != "rtn":
        raise ValueError(f"fake_quantize: unknown algorithm {algorithm!r}; allowed: rtn, hqq")
    array = rows.detach().float().cpu().numpy()
    packed, scales, _ = pack(array, bits, block, True)
    return torch.from_numpy(dequantize(packed, scales, None, bits, array.shape[1])).to(rows.dtype)


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class Sensitivity:
    """Measured damage (proxy units) of each unit's choices.

    Attributes
    ----------
    proxy : str
        What a damage is (``"mean KL divergence ..."`` or ``"mean 1 - cosine ..."``).
    linears : dict
        Unit -> {``"bits/block"``: damage}.
    errors : dict
        Unit -> {``"bits/block"``: relative Frobenius error of the fake-quantized weight}.
    embedding : dict
        ``"ratio/bits/block"`` -> damage of the token-embedding group at that choice.
    correlation_loss : dict
        Encoders: ``"unit@bits/block"`` / ``"emb@ratio/bits/block"`` of each measurement -> predicted
        relative loss of the pair-cosine correlation, ``var(residual change) / (2 var(cosine))``;
        times 100 times the original correlation it is a prior for the Spearman drop.
    estimated : list of str
        ``"unit@bits/block"`` estimated by the quadratic rule, not measured.
    seconds : float
    measurements : int
    """

    proxy: str
    linears: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    embedding: dict[str, float] = field(default_factory=dict)
    correlation_loss: dict[str, float] = field(default_factory=dict)
    estimated: list[str] = field(default_factory=list)
    seconds: float = 0.0
    measurements: int = 0
    cached: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> Sensitivity:
        return cls(**data)

    def prior_scale(self) -> float | None:
        """Least-squares slope of the predicted correlation loss on the proxy (through 0), or None."""
        proxies = {**{f"{u}@{b}": d for u, v in self.linears.items() for b, d in v.items()}, **{f"emb@{k}": d for k, d in self.embedding.items()}}
        pairs = [(proxies[k], v) for k, v in self.correlation_loss.items() if k in proxies and proxies[k] > 0]
        den = sum(p * p for p, _ in pairs)
        return sum(p * v for p, v in pairs) / den if den > 0 else None


# --------------------------------------------------------------------------- measuring


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's largest ``nn.ModuleList`` of at least two modules: its transformer blocks."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[2]):
                best = (name, module, size)
    return None if best is None else (best[0], best[1])


def _clone(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class Probe:
    """Reference outputs of the original model on the sensitivity batches, and the damage of a change.

    Parameters
    ----------
    model : nn.Module
        The model whose layers are changed in place by the caller (it records the outputs of
        every transformer block to replay them).
    kind : {"encoder", "decoder"}
    batches : list of dict of Tensor
        Encoders: tokenized sentences, the first sentences of the pairs first, then the
        second ones (``pairs`` of each); decoders: ``{"input_ids": (B, L)}`` windows (the
        reference log-probabilities, B x (L - 1) x V floats per batch, are kept in memory).
    pairs : int
        Encoders: number of sentence pairs in ``batches``.
    """

    def __init__(self, model: nn.Module, kind: str, batches: Sequence[dict[str, Tensor]], pairs: int = 0):
        self.model, self.kind, self.batches, self.pairs = model, kind, list(batches), pairs
        found = _blocks(model)
        self.block_prefix, self.blocks = (found[0], list(found[1])) if found else ("", [])
        self._outputs: list[list] = []
        self._batch = 0
        handles = [block.register_forward_hook(self._record(i)) for i, block in enumerate(self.blocks)]
        try:
            self.reference = self._run(model)
        finally:
            for handle in handles:
                handle.remove()
        if kind == "encoder":
            cosines = self._pair_cosines(self.reference)
            self._cos0 = cosines
            self._cos0_var = float(cosines.var()) if cosines.numel() > 1 else 0.0

    def block_of(self, module_name: str) -> int | None:
        """Index of the block holding ``module_name``, or None (outside the blocks)."""
        for i in range(len(self.blocks)):
            if module_name.startswith(f"{self.block_prefix}.{i}."):
                return i
        return None

    def _record(self, index: int) -> Callable:
        def hook(module, args, output):
            while len(self._outputs) <= self._batch:
                self._outputs.append([None] * len(self.blocks))
            self._outputs[self._batch][index] = _clone(output)

        return hook

    def _recorded(self, index: int, *args, **kwargs):
        """Block ``index``'s recorded output for the current batch (a copy), whatever its inputs."""
        return _clone(self._outputs[self._batch][index])

    @contextlib.contextmanager
    def _replaying(self, start: int) -> Iterator[None]:
        """Blocks ``0 .. start-1`` return their recorded outputs instead of computing them."""
        replaced = []
        try:
            for j in range(min(start, len(self.blocks))):
                block = self.blocks[j]
                block.forward = functools.partial(self._recorded, j)
                replaced.append(block)
            yield
        finally:
            for block in replaced:
                del block.forward

    def _run(self, model: nn.Module) -> Tensor:
        """Encoders: pooled embeddings (n, H). Decoders: the KL divergence from the reference's next-token
        distributions, summed over tokens, and the number of tokens (2,); on the reference run itself its
        log-probabilities are kept (one (B, L - 1, V) float32 tensor per batch)."""
        pieces = []
        record = not hasattr(self, "reference")
        if record and self.kind == "decoder":
            self._log_probs = []
        with torch.inference_mode():
            for index, batch in enumerate(self.batches):
                self._batch = index
                if self.kind == "encoder":
                    hidden = hidden_state(torch_forward(model, batch)).float()
                    pieces.append(mean_pool(hidden, batch["attention_mask"]))
                    continue
                out = torch_forward(model, batch, use_cache=False)
                log_probs = torch.log_softmax((out.logits if hasattr(out, "logits") else out[0])[:, :-1].float(), dim=-1)
                if record:
                    self._log_probs.append(log_probs)
                    kl = torch.zeros((), dtype=torch.float64)
                else:
                    reference = self._log_probs[index]
                    kl = (reference.exp() * (reference - log_probs)).sum(-1).double().sum()
                pieces.append(torch.stack([kl, torch.tensor(float(log_probs.shape[0] * log_probs.shape[1]), dtype=torch.float64)]))
        return torch.cat(pieces) if self.kind == "encoder" else torch.stack(pieces).sum(0)

    def _pair_cosines(self, pooled: Tensor) -> Tensor:
        n = self.pairs
        return torch.nn.functional.cosine_similarity(pooled[:n].double(), pooled[n : 2 * n].double(), dim=-1)

    def measure(self, model: nn.Module | None = None, start_block: int | None = None) -> tuple[float, float | None]:
        """Damage of ``model`` (default: the probed one, as changed now) vs the reference.

        Parameters
        ----------
        model : nn.Module, optional
            Another model (e.g. a copy with a factorized embedding): run in full.
        start_block : int, optional
            With the probed model: the first block whose computation may differ.

        Returns
        -------
        damage : float
            Decoders: mean KL divergence of the next-token distributions from the original's (nats
            per token); encoders: mean ``1 - cos`` of pooled embeddings.
        correlation_loss : float or None
            Encoders: ``var(residual pair-cosine change) / (2 var(pair cosine))``; None for decoders.
        """
        if model is None or model is self.model:
            with self._replaying(start_block or 0):
                result = self._run(self.model)
        else:
            result = self._run(model)
        if self.kind == "decoder":
            return float(result[0] / result[1]), None
        damage = float((1 - torch.nn.functional.cosine_similarity(result.double(), self.reference.double(), dim=-1)).mean())
        if self.pairs < 2 or self._cos0_var <= 0:
            return damage, None
        change = self._pair_cosines(result) - self._cos0
        centred = self._cos0 - self._cos0.mean()
        beta = float((change * centred).sum() / (centred * centred).sum())
        residual = change - beta * centred
        return damage, float(residual.var() / (2 * self._cos0_var))


@dataclass(frozen=True)
class LinearTarget:
    """A searched linear layer: its module and the view of its weight as ``(N, K)`` rows."""

    name: str
    module: nn.Module
    rows: Callable[[], Tensor]


@dataclass(frozen=True)
class EmbeddingVariant:
    """The token-embedding group at one compression ratio: the model and the tensors to fake-quantize."""

    ratio: float
    model: nn.Module
    tables: tuple[Tensor, ...]  # (V, d) rows along d
    linears: tuple[Tensor, ...]  # (N, K) weights of the embedding's own Linear layers


def _with_rows(tensors: Sequence[Tensor], bits: int, block_size: int) -> list[Tensor]:
    """Fake-quantize each tensor in place; return the saved originals."""
    saved = []
    with torch.no_grad():
        for tensor in tensors:
            saved.append(tensor.detach().clone())
            tensor.copy_(fake_quantize(tensor, bits, block_size))
    return saved


def _restore(tensors: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for tensor, original in zip(tensors, saved):
            tensor.copy_(original)


def key(bits: int, block_size: int, algorithm: str = "rtn") -> str:
    """The key of one choice of a linear unit in :attr:`Sensitivity.linears`: ``"4/32"`` (rtn), ``"hqq4/32"``."""
    return f"{'' if algorithm == 'rtn' else algorithm}{bits}/{block_size}"


def measure_sensitivity(
    probe: Probe,
    linears: Sequence[LinearTarget],
    embeddings: Sequence[EmbeddingVariant],
    bits: Sequence[int],
    embedding_bits: Sequence[int],
    block_sizes: Sequence[int],
    *,
    measure_all_bits: bool = False,
    algorithms: Sequence[str] = ("rtn",),
    cache_file: Path | None = None,
) -> Sensitivity:
    """Measure every unit's damage at every choice (see the module docstring).

    Parameters
    ----------
    probe : Probe
        Built on the model whose linear layers are listed in ``linears``.
    linears : sequence of LinearTarget
    embeddings : sequence of EmbeddingVariant
        One per compression ratio (ratio 1: the probed model itself).
    bits, embedding_bits : sequence of int
    block_sizes : sequence of int
        The embedding group is measured at each. A linear layer is measured at the smallest
        only; its damage at another block size (and, unless ``measure_all_bits``, at its largest
        bit-width) is estimated from the measured one as ``damage * (error / error_measured) ** 2``
        (relative weight errors, computed exactly: the quadratic model of small perturbations).
    measure_all_bits : bool
    algorithms : sequence of {"rtn", "hqq"}
        Damages are measured with ``rtn``; another algorithm's are estimated from them with the same
        quadratic rule, from its exact weight error at each (bits, block).
    cache_file : Path, optional
        Read if it exists, written after measuring.

    Returns
    -------
    Sensitivity
        Linear keys ``"bits/block"`` (``"hqq4/64"`` for HQQ, :func:`key`), embedding keys ``"ratio/bits/block"``.
    """
    result = read_json_cache(cache_file, Sensitivity.from_json) if cache_file is not None else None
    if result is not None:
        result.cached = True
        return result
    started = time.perf_counter()
    bits, blocks = sorted(set(bits), reverse=True), sorted(set(block_sizes))
    measured_bits = bits if measure_all_bits or len(bits) == 1 else bits[1:]
    proxy = ("mean KL divergence of next-token distributions from the original's (nats/token)" if probe.kind == "decoder"
             else "mean 1 - cosine of mean-pooled embeddings vs the original")
    result = Sensitivity(proxy=proxy)
    total = len(linears) * len(measured_bits) + len(embeddings) * len(set(embedding_bits)) * len(blocks)
    with bar(total=total, desc="sensitivity", unit="change") as progress:
        for target in linears:
            rows = target.rows().detach()
            start = probe.block_of(target.name)
            errors, damages = {}, {}
            norm = float(rows.norm())
            for algorithm in dict.fromkeys(["rtn", *algorithms]):
                for b in bits:
                    for block in blocks:
                        approx = fake_quantize(rows, b, block, algorithm)
                        errors[key(b, block, algorithm)] = float((rows - approx).norm()) / norm if norm > 0 else 0.0
            for b in measured_bits:
                saved = _with_rows([rows], b, blocks[0])
                try:
                    damages[key(b, blocks[0])], loss = probe.measure(start_block=start if start is not None else 0)
                finally:
                    _restore([rows], saved)
                if loss is not None:
                    result.correlation_loss[f"{target.name}@{key(b, blocks[0])}"] = loss
                result.measurements += 1
                progress.update()
            for algorithm in dict.fromkeys(["rtn", *algorithms]):
                for b in bits:
                    reference = key(b if b in measured_bits else measured_bits[0], blocks[0])
                    for block in blocks:
                        name = key(b, block, algorithm)
                        if name not in damages:
                            scale = (errors[name] / errors[reference]) ** 2 if errors[reference] > 0 else 0.0
                            damages[name] = damages[reference] * scale
                            result.estimated.append(f"{target.name}@{name}")
            result.linears[target.name] = {k: _round(d) for k, d in damages.items()}
            result.errors[target.name] = {k: _round(e) for k, e in errors.items()}
        for variant in embeddings:
            tensors = [*variant.tables, *variant.linears]
            for b in sorted(set(embedding_bits), reverse=True):
                for block in blocks:
                    saved = _with_rows(tensors, b, block)
                    try:
                        damage, loss = probe.measure(model=variant.model if variant.model is not probe.model else None)
                    finally:
                        _restore(tensors, saved)
                    name = f"{variant.ratio:g}/{key(b, block)}"
                    result.embedding[name] = _round(damage)
                    if loss is not None:
                        result.correlation_loss[f"emb@{name}"] = loss
                    result.measurements += 1
                    progress.update()
    result.seconds = time.perf_counter() - started
    if cache_file is not None:
        write_json_cache(cache_file, result.to_json())
    return result


def _round(value: float) -> float:
    """Six significant digits: run-to-run float noise must not reorder the greedy path."""
    return float(f"{value:.6g}") if math.isfinite(value) else value


def encoder_batches(tokenizer, pairs: Sequence[tuple[str, str, float]], max_length: int, batch_size: int = 32) -> list[dict[str, Tensor]]:
    """The pairs' first sentences, then their second ones, tokenized in batches (padding per batch)."""
    sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
    batches = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append({k: v.long() for k, v in enc.items()})
    return batches


def cache_key(**parts) -> str:
    """A stable hash of the options and data a measurement depends on."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
