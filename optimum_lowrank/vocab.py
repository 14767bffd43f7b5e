"""Token statistics of calibration text: how often each vocabulary entry is used.

The embedding passes weight rows by these counts (``row_weighting: frequency``)
and keep the most frequent rows exact (``keep_top_k``); see
:mod:`optimum_lowrank.passes.embedding.usage`. Counts are computed once per tokenizer and
text and cached on disk (``$OPTIMUM_LOWRANK_CACHE/token_counts``, default
``~/.cache/optimum_lowrank/token_counts``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from optimum_lowrank.errors import DataError

__all__ = ["TokenCounts", "check_vocabulary", "count_ids", "row_weights", "token_counts", "usage_report"]

# A tokenizer may be smaller than the table (models pad the vocabulary, e.g. Phi-2: 50,295 ids for
# 51,200 rows, 1.8%); a bigger gap means the tokenizer belongs to another model.
MAX_PADDING = 0.05


@dataclass(frozen=True)
class TokenCounts:
    """Occurrences of every token id in a calibration text.

    Attributes
    ----------
    counts : Tensor, shape (V,), float64
        ``counts[p]`` = occurrences of id ``p`` (>= 0).
    source : str
        Where the counts come from (text and tokenizer), for reports.
    """

    counts: Tensor
    source: str
    #: Tokens in the text (before the special tokens get their assigned count); 0 if unknown.
    tokens: int = 0

    @property
    def total(self) -> int:
        """Number of calibration tokens (special tokens included at their assigned count, see :func:`token_counts`)."""
        return int(self.counts.sum())

    def resized(self, vocab_size: int, what: str = "embedding") -> TokenCounts:
        """The counts for a table of ``vocab_size`` rows; see :func:`check_vocabulary`."""
        check_vocabulary(self.counts.shape[0], vocab_size, what)
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        counts[: self.counts.shape[0]] = self.counts
        return TokenCounts(counts, self.source, self.tokens)


def check_vocabulary(tokenizer_size: int, vocab_size: int, what: str = "embedding") -> None:
    """Refuse a tokenizer that does not belong to a ``vocab_size``-row table.

    Parameters
    ----------
    tokenizer_size : int
        Ids the tokenizer can produce (``len(tokenizer)``, or the largest id seen + 1).
    vocab_size : int
        Rows of the embedding table.
    what : str
        Named in the error.

    Raises
    ------
    DataError
        If the tokenizer produces ids the table lacks, or is more than 5% smaller
        than the table (padding to a multiple of 64/128 is allowed).
    """
    if tokenizer_size > vocab_size or tokenizer_size < vocab_size * (1 - MAX_PADDING):
        raise DataError(
            f"the tokenizer's vocabulary ({tokenizer_size:,} ids) does not match {what} with {vocab_size:,} rows; "
            f"allowed: {int(vocab_size * (1 - MAX_PADDING)):,}..{vocab_size:,} ids (is it the model's own tokenizer?)"
        )


def count_ids(ids: Tensor, vocab_size: int, source: str = "token ids") -> TokenCounts:
    """Counts of the ids in ``ids`` (any shape, values in [0, vocab_size)).

    Raises
    ------
    DataError
        If ``ids`` is empty or holds ids outside [0, vocab_size).
    """
    flat = ids.reshape(-1).long()
    if flat.numel() == 0:
        raise DataError(f"{source}: no tokens to count")
    if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:
        raise DataError(f"{source}: token ids span [{int(flat.min())}, {int(flat.max())}], outside a vocabulary of {vocab_size:,}")
    return TokenCounts(torch.bincount(flat, minlength=vocab_size).double(), source)


def _cache_dir() -> Path:
    from optimum_lowrank.cache import cache_root

    return cache_root() / "token_counts"


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    return digest.hexdigest()[:20]


def token_counts(tokenizer, text: str, description: str = "calibration text", *, cache: bool = True) -> TokenCounts:
    """Count every token of ``text`` as the model's tokenizer splits it (no special tokens).

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    text : str
    description : str
        Names the text in the result's ``source`` and in errors.
    cache : bool
        Read/write ``<cache>/token_counts/<tokenizer hash>-<text hash>.pt``: a dict with the
        format version, the counts and their SHA-256. An entry that does not load or whose
        checksum, format or shape is off is rebuilt with a warning.

    Returns
    -------
    TokenCounts
        ``counts`` has ``len(tokenizer)`` entries (or more, if the tokenizer produced
        a larger id). The tokenizer's special tokens (``[CLS]``, ``[SEP]``, BOS, ...)
        frame every model input but never occur in raw text; each gets the count of
        the most frequent token, so that weighting and ``keep_top_k`` treat them as
        the most used rows.

    Raises
    ------
    DataError
        If the text produces no tokens.
    """
    key = f"{_tokenizer_fingerprint(tokenizer)}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
    path = _cache_dir() / f"{key}.pt"
    source = f"{description}, tokenized by {type(tokenizer).__name__}"
    counts = _read_cached_counts(path) if cache else None
    if counts is None:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            raise DataError(f"{description}: the text produces no tokens")
        size = max(len(tokenizer), max(ids) + 1)
        counts = count_ids(torch.tensor(ids), size, description).counts
        if cache:
            _write_cached_counts(path, counts)
    if float(counts.sum()) == 0:
        raise DataError(f"{description}: the text produces no tokens")
    total = int(counts.sum())
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < counts.shape[0]]
    if special:  # [CLS]/[SEP]/BOS frame every input but never occur in raw text: rank them first
        counts = counts.clone()
        counts[special] = torch.maximum(counts[special], counts.max().expand(len(special)))
    return TokenCounts(counts, f"{source} ({total:,} tokens; special tokens {special} counted as the most frequent)", total)


#: Version of the token-count cache entries; entries of other versions are rebuilt.
_COUNTS_FORMAT = 2


def _counts_digest(counts: Tensor) -> str:
    return hashlib.sha256(counts.contiguous().numpy().tobytes()).hexdigest()


def _read_cached_counts(path: Path) -> Tensor | None:
    """The counts cached at ``path``, or None (absent; corrupt or stale entries are removed with a warning)."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        counts = entry.get("counts") if isinstance(entry, dict) else None
        valid = (
            isinstance(entry, dict)
            and entry.get("format") == _COUNTS_FORMAT
            and isinstance(counts, Tensor)
            and counts.dim() == 1
            and counts.numel() > 0
            and bool(torch.isfinite(counts).all())
            and bool((counts >= 0).all())
            and entry.get("sha256") == _counts_digest(counts)
        )
        problem = None if valid else "wrong format, shape or checksum"
    except Exception as err:  # noqa: BLE001 - a damaged file can fail in many ways (EOFError, UnpicklingError, ...)
        problem, counts = f"{type(err).__name__}: {str(err)[:120]}", None
    if problem is None:
        return counts
    warnings.warn(f"the token-count cache entry {path} is unreadable ({problem}); recounting", stacklevel=3)
    path.unlink(missing_ok=True)
    return None


def _write_cached_counts(path: Path, counts: Tensor) -> None:
    from optimum_lowrank.output import pid_alive

    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob("*.tmp"):  # partial writes of killed runs: <key>.<pid>.tmp
        pid = leftover.suffixes[-2][1:] if len(leftover.suffixes) >= 2 else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            leftover.unlink(missing_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        torch.save({"format": _COUNTS_FORMAT, "counts": counts, "sha256": _counts_digest(counts)}, partial)
        partial.replace(path)
    except OSError as err:  # a read-only or full cache only costs the next run a recount
        warnings.warn(f"cannot write the token-count cache {path}: {err}", stacklevel=3)
    finally:
        partial.unlink(missing_ok=True)


def row_weights(counts: Tensor, exponent: float) -> Tensor:
    """Row weights ``w = (count + 1) ** exponent``, normalised to mean 1, shape (V,), float32.

    ``w_p`` multiplies row p's loss. ``exponent`` 0 gives uniform weights; 1 weights
    each row by how often it is used (the expected error per calibration token);
    for the weighted SVD ``min ||D (E - A B)||_F`` it is ``D = diag(sqrt(w))``, so
    exponent 1 is ``D = diag((count + 1)^0.5)``.
    """
    weights = (counts.double() + 1).pow(exponent)
    return (weights / weights.mean()).float()


@torch.no_grad()
def usage_report(original: Tensor, approx: Tensor, counts: Tensor, exact: Tensor | None = None, coverage: float = 0.9) -> dict[str, float]:
    """How well the compressed table serves the tokens actually used.

    Parameters
    ----------
    original, approx : Tensor, shape (V, d)
        The original and the compressed table (token order).
    counts : Tensor, shape (V,)
        Calibration counts.
    exact : BoolTensor (V,), optional
        Rows stored exactly (hybrid table).
    coverage : float in (0, 1]
        "Frequent" rows are the most frequent ones that together cover this share
        of the calibration tokens.

    Returns
    -------
    dict of float:
        ``calibration_tokens``; ``seen_rows`` (ids seen at least once);
        ``frequent_rows`` (rows covering ``coverage`` of the tokens);
        ``exact_rows`` and ``exact_token_share`` (share of calibration tokens whose
        row is exact; 0 without a hybrid table); ``token_weighted_cosine`` (mean row
        cosine over calibration tokens); ``frequent_cosine``, ``rare_cosine``
        (seen, not frequent) and ``unseen_cosine`` (mean row cosine per group); the
        same groups' ``*_relative_error`` (``||E_g - E_hat_g||_F / ||E_g||_F``).
    """
    counts = counts.double()
    total = float(counts.sum())
    order = torch.sort(counts, descending=True, stable=True).indices
    cumulative = counts[order].cumsum(0) / max(total, 1.0)
    n_frequent = int(torch.searchsorted(cumulative, torch.tensor(coverage, dtype=cumulative.dtype))) + 1
    frequent = torch.zeros_like(counts, dtype=torch.bool)
    frequent[order[:n_frequent]] = True
    seen = counts > 0
    cos = torch.nn.functional.cosine_similarity(approx.float(), original.float(), dim=-1).double()
    diff = (approx.float() - original.float()).double().square().sum(-1)
    ref = original.float().double().square().sum(-1)
    out = {
        "calibration_tokens": total,
        "seen_rows": float(seen.sum()),
        "frequent_rows": float(n_frequent),
        "exact_rows": float(exact.sum()) if exact is not None else 0.0,
        "exact_token_share": float(counts[exact].sum() / max(total, 1.0)) if exact is not None else 0.0,
        "token_weighted_cosine": float((cos * counts).sum() / max(total, 1.0)),
    }
    for group, mask in (("frequent", frequent), ("rare", seen & ~frequent), ("unseen", ~seen)):
        if mask.any():
            out[f"{group}_cosine"] = float(cos[mask].mean())
            out[f"{group}_relative_error"] = float((diff[mask].sum() / ref[mask].sum().clamp_min(1e-30)).sqrt())
    return out

