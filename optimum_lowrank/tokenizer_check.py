"""A tokenizer checked on real text before a model is used with it.

transformers' conversion of a GGUF file's tokenizer can be wrong with only a warning (one
SentencePiece vocabulary came out splitting "The capital of France is" into 10 pieces, and
the model's perplexity about 10x too high): :func:`check_tokenizer` catches that.
"""

from __future__ import annotations

__all__ = ["check_tokenizer"]

#: Characters of the sample text :func:`check_tokenizer` tokenizes.
TOKENIZER_SAMPLE_CHARS = 20_000
#: Fewest characters per token on English prose allowed for a vocabulary of at least
#: :data:`LARGE_VOCAB` entries (healthy ones give about 4: SmolLM2 4.24, MiniLM 4.13).
MIN_CHARS_PER_TOKEN = 2.5
LARGE_VOCAB = 8000
#: Largest share of the sample's frequent words the tokenizer may never emit although its
#: vocabulary holds them as one piece (``Ġword`` / ``▁word``).
MAX_MISSING_WORD_SHARE = 0.5


def check_tokenizer(tokenizer, where: str) -> str:
    """Check a tokenizer on real text (English prose shipped with Python), before a model is used with it.

    Three checks on the first :data:`TOKENIZER_SAMPLE_CHARS` characters of ``pydoc_data.topics``:

    - round trip: decoding the ids gives the text back (whitespace runs compared as one space);
    - pieces: of the 100 most frequent words (4+ letters) that the vocabulary holds as one
      piece (``Ġword`` or ``▁word``), at most :data:`MAX_MISSING_WORD_SHARE` may never be
      emitted (a conversion that lost its merges splits every word into small pieces);
    - characters per token at least :data:`MIN_CHARS_PER_TOKEN` for a vocabulary of at least
      :data:`LARGE_VOCAB` entries.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    where : str
        Names the tokenizer's origin in the message.

    Returns
    -------
    str
        One line with the figures (characters per token, words checked).

    Raises
    ------
    ModelLoadError
        If a check fails; the message gives the figures and an example.
    """
    import re
    from collections import Counter

    from optimum_lowrank.data import default_text
    from optimum_lowrank.errors import ModelLoadError

    text = default_text()[0][:TOKENIZER_SAMPLE_CHARS]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise ModelLoadError(f"the tokenizer of {where} turns {len(text):,} characters of English into no tokens")
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    want, got = " ".join(text.split()), " ".join(decoded.split())
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise ModelLoadError(
            f"the tokenizer of {where} does not round-trip English text: at character {at} the text reads "
            f"{want[max(0, at - 20):at + 20]!r}, decoded {got[max(0, at - 20):at + 20]!r}; its conversion is broken"
        )
    per_token = len(text) / len(ids)
    vocab = tokenizer.get_vocab()
    emitted = set(tokenizer.convert_ids_to_tokens(ids))
    words = [w for w, _ in Counter(re.findall(r"(?<=\s)([a-z]{4,})(?=[\s.,;:])", text)).most_common(100)]
    held = [(w, form) for w in words for form in (f"\u0120{w}", f"\u2581{w}") if form in vocab]
    missing = [w for w, form in held if form not in emitted]
    figures = f"{per_token:.2f} characters per token, {len(held) - len(missing)} of {len(held)} whole-word pieces emitted"
    if len(held) >= 10 and len(missing) / len(held) > MAX_MISSING_WORD_SHARE:
        example = tokenizer.convert_ids_to_tokens(tokenizer(f" {missing[0]}", add_special_tokens=False)["input_ids"])
        raise ModelLoadError(
            f"the tokenizer of {where} splits words its vocabulary holds whole ({figures}; e.g. {missing[0]!r} -> {example}); "
            "its conversion lost the merges or scores"
        )
    if len(vocab) >= LARGE_VOCAB and per_token < MIN_CHARS_PER_TOKEN:
        raise ModelLoadError(
            f"the tokenizer of {where} gives {per_token:.2f} characters per token on English prose "
            f"(at least {MIN_CHARS_PER_TOKEN} expected for {len(vocab):,} entries); its conversion is broken"
        )
    return f"tokenizer checked on English prose: {figures}"
