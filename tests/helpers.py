"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from optimum_lowrank.api import PassContext

LLAMA_TARGETS = ["re:model\\.layers\\.\\d+\\..*_proj"]
SOFTLM_TOLERANCE = 0.02  # softlm ends within 2 percentage points below its budget, never above

# q_proj of the tiny Llama is 32x32: break-even rank 16; rank 15 saves 6.25% of the weights (< 10%), rank 14 saves 12.5%.
ZONE_RANK, SAVING_RANK = 15, 14


class WordTokenizer:
    """'w17' -> 17 (mod 128); enough of a tokenizer for token_windows and the pipeline."""

    bos_token_id = None

    def __call__(self, text, **_):
        return {"input_ids": [int(word[1:]) % 128 for word in text.split()]}


def decoder_context(ids: torch.Tensor) -> PassContext:
    return PassContext(kind="decoder", calibration_loader=lambda: ids)


def correlated_inputs(n_tokens: int = 2000, features: int = 24, seed: int = 0) -> torch.Tensor:
    """Tokens (n_tokens, features) with correlated channels of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) * torch.logspace(-2, 1, features)[:, None]
    return torch.randn(n_tokens, features, generator=g) @ mixing


def padded_batch(low: int, high: int, length: int, lengths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids in [low, high) of shape (len(lengths), length) and an attention mask keeping the first ``lengths[i]`` of row i."""
    ids = torch.randint(low, high, (len(lengths), length), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(length) < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def params_ratio(reports) -> float:
    return sum(r.params_after for r in reports) / sum(r.params_before for r in reports)


TASK_WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "a", "very", "not"]


def tiny_classifier(seed: int = 0, num_labels: int = 2):
    """A random 2-layer BertForSequenceClassification (vocab 64, hidden 64, 4 heads, intermediate 128), eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def word_tokenizer(tmp_path):
    """A real BertTokenizer over [PAD] [UNK] [CLS] [SEP] [MASK] and :data:`TASK_WORDS`."""
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TASK_WORDS]) + "\n")
    return BertTokenizer(str(vocab))


def sentiment_tsv(path, rows: int = 24, seed: int = 0):
    """A labelled TSV like SST-2 (header ``label<TAB>text_a``): label 1 for positive words."""
    import random

    rng = random.Random(seed)
    lines = ["label\ttext_a"]
    for _ in range(rows):
        label = rng.randint(0, 1)
        words = ["good", "great", "fine"] if label else ["bad", "awful", "poor"]
        text = " ".join(rng.choice(words + ["the", "movie", "very", "a", "film"]) for _ in range(rng.randint(3, 9)))
        lines.append(f"{label}\t{text}")
    path.write_text("\n".join(lines) + "\n")
    return path


def fill_gates(gates, log_alpha: float, names: tuple[str, ...] | None = None) -> None:
    """Set ``log_alpha`` of every hard-concrete gate of ``gates`` (or only the named ones of each layer)."""
    with torch.no_grad():
        for layer in gates:
            modules = layer.modules() if names is None else (getattr(layer, n) for n in names)
            for gate in modules:
                gate.log_alpha.fill_(log_alpha)


def randomize_gates(gates, seed: int = 0, scale: float = 3.0) -> None:
    """Draw every gate's ``log_alpha`` from ``N(0, scale^2)`` (seeded): a mix of open, closed and partial gates."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in gates:
            for gate in layer.modules():
                gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=generator) * scale)
