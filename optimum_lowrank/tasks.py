"""Labelled task data (sequence classification) and the batches built from it.

- :func:`load_labelled_tsv` reads a TSV with a header: one text column (or a pair
  of columns) and an integer label column, e.g. GLUE SST-2's ``label<TAB>text_a``.
- :func:`check_num_labels` checks the labels against a classification head.
- :func:`encode_batches` tokenizes examples into padded batches.
- :func:`finetune_classifier` trains a classification head (and body) with the
  task cross-entropy; the ``minilm-sst2`` model alias is built with it.

Nothing heavy happens at import time.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optimum_lowrank.data import RELATIVE_PATH_RULE
from optimum_lowrank.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["LabelledData", "build_task_model", "check_num_labels", "encode_batches", "finetune_classifier", "load_labelled_tsv"]

#: Header names tried, in order, when the text columns are not given.
TEXT_COLUMN_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("text_a", "text_b"),
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("text_a",),
    ("sentence",),
    ("text",),
)


@dataclass(frozen=True)
class LabelledData:
    """Labelled examples read from a task file.

    Attributes
    ----------
    texts : list of str, or list of (str, str) for pair tasks
    labels : list of int, each >= 0
    columns : tuple of str
        The text column(s) read.
    source : str
        Where the examples came from (shown in reports).
    """

    texts: list
    labels: list[int]
    columns: tuple[str, ...]
    source: str

    @property
    def num_labels(self) -> int:
        """``max(labels) + 1``: the smallest head that can predict every label."""
        return max(self.labels) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> LabelledData:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return LabelledData(self.texts[:n], self.labels[:n], self.columns, f"{self.source}, first {n}")


def load_labelled_tsv(
    path: str | os.PathLike,
    *,
    text_columns: tuple[str, ...] | None = None,
    label_column: str = "label",
    max_rows: int | None = None,
) -> LabelledData:
    """Read a classification TSV with a header row.

    Fields are split on tabs only (no CSV quoting). The text is one column or a pair
    of columns (e.g. ``sentence1``/``sentence2``); labels are integers ``>= 0``.

    Parameters
    ----------
    path : str or PathLike
        E.g. ``../shared/data/sst2/dev.tsv`` (header ``label<TAB>text_a``).
    text_columns : tuple of 1 or 2 str, optional
        Header names of the text column(s); by default the first of
        :data:`TEXT_COLUMN_CANDIDATES` whose columns are all present.
    label_column : str
        Header name of the label column.
    max_rows : int >= 1, optional
        Read only the first ``max_rows`` examples.

    Returns
    -------
    LabelledData

    Raises
    ------
    DataError
        If the file is missing or empty, a named column is absent (the message lists
        the header), a row has too few fields, or a label is missing, not an integer
        or negative (the message gives the line number).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task file {str(path)!r} does not exist ({RELATIVE_PATH_RULE})")
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be >= 1, got {max_rows}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"task file {str(path)!r} is empty or has no header row")
    header = [h.strip() for h in lines[0].split("\t")]
    if label_column not in header:
        raise DataError(f"task file {str(path)!r}: no label column {label_column!r}; header: {header}")
    if text_columns is None:
        text_columns = next((c for c in TEXT_COLUMN_CANDIDATES if all(n in header for n in c)), None)
        if text_columns is None:
            raise DataError(f"task file {str(path)!r}: no text column found (tried {TEXT_COLUMN_CANDIDATES}); header: {header}")
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"text_columns must name 1 or 2 columns, got {text_columns}")
    missing = [c for c in text_columns if c not in header]
    if missing:
        raise DataError(f"task file {str(path)!r}: no column(s) {missing}; header: {header}")
    i_label = header.index(label_column)
    i_text = [header.index(c) for c in text_columns]
    needed = max(i_label, *i_text) + 1
    texts, labels = [], []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < needed:
            raise DataError(f"{str(path)!r} line {number}: {len(fields)} tab-separated fields, expected at least {needed}")
        raw = fields[i_label].strip()
        try:
            label = int(raw)
        except ValueError:
            raise DataError(f"{str(path)!r} line {number}: label {raw!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{str(path)!r} line {number}: label {label} is negative")
        parts = [fields[i].strip() for i in i_text]
        texts.append(parts[0] if len(parts) == 1 else (parts[0], parts[1]))
        labels.append(label)
        if max_rows is not None and len(labels) >= max_rows:
            break
    if not labels:
        raise DataError(f"task file {str(path)!r} has a header but no examples")
    return LabelledData(texts, labels, tuple(text_columns), str(path))


def check_num_labels(model: PreTrainedModel, data: LabelledData) -> int:
    """The model head's label count, checked against ``data``.

    Returns
    -------
    int
        ``model.config.num_labels``.

    Raises
    ------
    DataError
        If the model has no classification head config, or a label of ``data`` is
        ``>= num_labels`` (the message gives both counts).
    """
    config = getattr(model, "config", None)
    num = getattr(config, "num_labels", None)
    if not isinstance(num, int) or not hasattr(model, "classifier"):
        raise DataError(f"{type(model).__name__} has no sequence-classification head (expected a ...ForSequenceClassification model)")
    if data.num_labels > num:
        raise DataError(f"{data.source} has labels 0..{data.num_labels - 1} ({data.num_labels} classes) but the model's head has {num} labels")
    return num


def encode_batches(
    tokenizer: PreTrainedTokenizerBase,
    data: LabelledData,
    batch_size: int,
    max_length: int = 128,
    *,
    sort_by_length: bool = False,
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]]:
    """Tokenize ``data`` into padded batches.

    Returns
    -------
    list of (inputs, labels, indices)
        ``inputs``: ``input_ids``/``attention_mask``/``token_type_ids`` LongTensors of
        shape (b, L); ``labels``: LongTensor (b,); ``indices``: positions in ``data``.
        With ``sort_by_length`` examples are grouped by length (less padding).
    """
    import torch

    order = list(range(len(data)))
    if sort_by_length:
        order.sort(key=lambda i: len(data.texts[i]) if isinstance(data.texts[i], str) else sum(map(len, data.texts[i])))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = [data.texts[i] for i in idx]
        if isinstance(texts[0], tuple):
            enc = tokenizer([t[0] for t in texts], [t[1] for t in texts], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        else:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
        batches.append(({k: v.long() for k, v in enc.items()}, labels, idx))
    return batches


def finetune_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: LabelledData,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-5,
    max_length: int = 64,
    seed: int = 0,
    log_every: int = 0,
    train_word_embeddings: bool = False,
) -> dict:
    """Train ``model`` (in place) on ``data`` with the task cross-entropy.

    AdamW (weight decay 0.01), linear warm-up over 6% of the steps then linear decay;
    batches drawn by a seeded shuffle of ``data``.

    Parameters
    ----------
    model : PreTrainedModel
        A ``...ForSequenceClassification`` model; left in eval mode.
    steps : int >= 1
    batch_size : int >= 1
    lr : float > 0
    train_word_embeddings : bool
        Also train the token-embedding table (default False: frozen, which halves the
        time of a CPU step; SST-2 sees a small part of the vocabulary anyway).

    Returns
    -------
    dict
        ``steps``, ``seconds``, ``final_loss`` (mean of the last 50 steps).

    Raises
    ------
    DataError
        If the labels do not fit the head.
    FloatingPointError
        If the loss becomes non-finite.
    """
    import torch

    check_num_labels(model, data)
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    order: list[int] = []
    embeddings = model.get_input_embeddings()
    frozen = set() if train_word_embeddings or embeddings is None else {id(p) for p in embeddings.parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, int(0.06 * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(data)))
            rng.shuffle(extra)
            order.extend(extra)
        idx, order = order[:batch_size], order[batch_size:]
        batch = LabelledData([data.texts[i] for i in idx], [data.labels[i] for i in idx], data.columns, data.source)
        (inputs, labels, _), = encode_batches(tokenizer, batch, batch_size, max_length)
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(saved[id(p)])
    tail = losses[-50:]
    return {"steps": steps, "seconds": time.perf_counter() - start, "final_loss": sum(tail) / len(tail)}


def build_task_model(base: Path, task_file: Path, target: Path, *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Fine-tune a classification head (and body) on ``task_file`` from the model folder
    ``base`` and save model + tokenizer to ``target`` atomically (a temporary folder renamed).

    Returns
    -------
    dict
        :func:`finetune_classifier`'s statistics, also written to ``target/finetune.json``.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = load_labelled_tsv(task_file)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=data.num_labels, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        stats = finetune_classifier(model, tokenizer, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "finetune.json").write_text(json.dumps({"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, **stats}) + "\n")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return stats
