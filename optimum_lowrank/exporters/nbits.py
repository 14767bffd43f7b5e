"""ONNX Runtime's block-quantized weight layout (``MatMulNBits`` / ``GatherBlockQuantized``), in numpy.

A weight ``W`` (K, N) is stored transposed: each of its N rows of K values is cut into
``kb = ceil(K / block)`` blocks; a block holds ``block * bits / 8`` bytes of codes (lowest
bits first), one fp32 scale and, when asymmetric, a zero point (packed uint8, or float for
HQQ). Symmetric blocks use the zero point ``2^(bits - 1)``. :func:`pack` calls ORT's own
C++ quantizers (the ones ``MatMulNBitsQuantizer`` calls), :func:`dequantize` reads any of
these layouts back, so errors are measured on exactly what ships.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dequantize", "pack", "relative_error", "unpack"]


def pack(weight_t: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize rows of ``weight_t`` (N, K) along K: packed (N, kb, blob) uint8, scales (N, kb), zero points."""
    from onnxruntime.capi._pybind_state import quantize_matmul_2bits, quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight_t.shape
    kb = (k + block - 1) // block
    per_byte = 8 // bits
    packed = np.zeros((n, kb, block // per_byte), dtype=np.uint8)
    zero_points = np.zeros((n, (kb + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    weight = np.ascontiguousarray(np.pad(weight_t.T.astype(np.float32), ((0, kb * block - k), (0, 0))))
    quantize = {2: quantize_matmul_2bits, 4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    quantize(packed, weight, scales, zero_points, block, n, k, symmetric)
    return packed, scales, zero_points


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 (..., blob) -> integer codes (..., blob * 8 / bits), lowest bits first."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int) -> np.ndarray:
    """Rebuild the float rows (N, K) from ORT's (N, kb, blob) layout; ``zero_points`` packed uint8, float, or None."""
    n, kb = packed.shape[0], packed.shape[1]
    codes = unpack(packed.reshape(n, kb, -1), bits).astype(np.float32)  # (N, kb, block)
    scales = scales.reshape(n, kb, 1).astype(np.float32)
    if zero_points is None:
        zero = np.float32(1 << (bits - 1))
    elif zero_points.dtype == np.uint8:
        zero = unpack(zero_points.reshape(n, -1), bits)[:, :kb].astype(np.float32).reshape(n, kb, 1)
    else:
        zero = zero_points.reshape(n, kb, 1).astype(np.float32)
    return ((codes - zero) * scales).reshape(n, -1)[:, :k]


def relative_error(original: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(original))
    return float(np.linalg.norm(original - approx) / norm) if norm > 0 else 0.0
