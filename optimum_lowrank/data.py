"""Text and sentence-pair sources for evaluation and calibration.

- :func:`load_text` reads calibration or evaluation text: a text file, a
  Hugging Face data set (``datasets:NAME[:CONFIG][:SPLIT]``, optional dependency) or,
  by default, :func:`default_text`, English prose shipped with Python itself. It
  keeps the last few texts it read (:func:`clear_text_cache` empties it), so a run
  that asks for the calibration text three times reads it once.
- :func:`load_sts_pairs` reads STS Benchmark sentence pairs with gold scores.
- :func:`token_windows` tokenizes a text once and cuts fixed-length windows.
- :func:`shared_data_dir` locates the real data sets used by tests and benchmarks.

Nothing heavy happens at import time.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from optimum_lowrank.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "RELATIVE_PATH_RULE",
    "TEXT_CACHE_SIZE",
    "clear_text_cache",
    "default_text",
    "load_sts_pairs",
    "load_text",
    "resolve_recipe_paths",
    "shared_data_dir",
    "token_windows",
]

_DATASETS_PREFIX = "datasets:"
_TSV_PREFIX = "tsv:"

#: Where a recipe file's relative data paths point; said by every missing-file error.
RELATIVE_PATH_RULE = "a relative path in a recipe file resolves against the recipe file's folder"
#: Recipe keys whose string values are data sources (a path, ``tsv:PATH:COLUMNS``, ``datasets:...``).
DATA_KEYS = ("data", "search_data", "calibration")

#: How many texts :func:`load_text` keeps (least recently used goes first).
TEXT_CACHE_SIZE = 4
_text_cache: OrderedDict[tuple, tuple[str, str]] = OrderedDict()
_text_cache_lock = threading.Lock()


def default_text() -> tuple[str, str]:
    """English prose that ships with every Python install, for data-free calibration.

    The values of ``pydoc_data.topics.topics``: the Python language reference
    sections that ``help()`` shows (465,047 characters, about 100k words, on Python
    3.11; it varies with the version), joined by blank lines in sorted key order.

    Returns
    -------
    text : str
    description : str
        Says where the text comes from and its length in characters.

    Raises
    ------
    DataError
        If this Python was built without ``pydoc_data`` (some minimal distributions).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - stripped Python builds
        raise DataError(
            "this Python has no pydoc_data module for the default text; pass a text file instead"
        ) from exc
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return text, f"Python reference documentation (pydoc_data.topics, {len(text):,} characters)"


def load_text(source: str | os.PathLike | None) -> tuple[str, str]:
    """Load evaluation or calibration text.

    Parameters
    ----------
    source : str, PathLike or None
        - ``None``: :func:`default_text`;
        - ``"datasets:NAME[:CONFIG][:SPLIT]"``: a Hugging Face data set (needs the
          optional ``datasets`` package; SPLIT defaults to ``test``), its ``text``
          column (or first string column) joined by newlines, e.g.
          ``datasets:wikitext:wikitext-2-raw-v1:test``;
        - ``"tsv:PATH:COLUMNS[:header]"``: the given 0-based, comma-separated
          columns of a tab-separated file, one field a line (rows with fewer
          columns are skipped; ``header`` skips the first line), e.g. the sentences
          of STS-B train, ``tsv:../shared/data/stsb/sts-train.tsv:5,6``;
        - otherwise a path to a UTF-8 text file, read with universal newlines.

    Returns
    -------
    text : str
    description : str
        Human description of the source, e.g. ``"wiki.test.raw (1,288,556 characters)"``.

    Raises
    ------
    DataError
        If the file does not exist, is not a file, cannot be decoded, or holds only
        whitespace; if ``datasets`` is not installed or the data set cannot be loaded.

    Notes
    -----
    The last :data:`TEXT_CACHE_SIZE` results are kept in memory, keyed by the
    source string and, for a file (also the file of a ``tsv:`` source), by its
    resolved path, modification time (ns) and size: a second call for the same
    source returns the same strings without reading again, and a file that was
    modified since is read again. A data set is keyed by its name only (it is not
    re-fetched within a process). Errors are not cached. :func:`clear_text_cache`
    empties the cache.
    """
    key = _cache_key(source)
    if key is not None:
        with _text_cache_lock:
            if key in _text_cache:
                _text_cache.move_to_end(key)
                return _text_cache[key]
    result = _load_text_uncached(source)
    if key is not None:
        with _text_cache_lock:
            _text_cache[key] = result
            while len(_text_cache) > TEXT_CACHE_SIZE:
                _text_cache.popitem(last=False)
    return result


def clear_text_cache() -> None:
    """Forget every text :func:`load_text` keeps."""
    with _text_cache_lock:
        _text_cache.clear()


def _cache_key(source: str | os.PathLike | None) -> tuple | None:
    """Cache key of ``source``: a file's stamp (plus the spec for ``tsv:``); None where no regular file is found (not cached)."""
    if source is None:
        return (None,)
    text_source = os.fspath(source)
    if text_source.startswith(_DATASETS_PREFIX):
        return (text_source,)
    if text_source.startswith(_TSV_PREFIX):
        stamp = _file_stamp(_split_tsv(text_source[len(_TSV_PREFIX):])[0])
        return None if stamp is None else (text_source, *stamp)
    stamp = _file_stamp(text_source)
    return None if stamp is None else ("file", *stamp)


def _file_stamp(file: str) -> tuple[str, int, int] | None:
    """(resolved path, mtime in ns, size in bytes) of a regular file, or None."""
    try:
        path = Path(file).expanduser().resolve()
        info = path.stat()
    except (OSError, RuntimeError, ValueError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return str(path), info.st_mtime_ns, info.st_size


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the name itself is invalid (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _shown(path: Path, limit: int = 200) -> str:
    """``repr`` of a path, cut to ``limit`` characters."""
    text = repr(str(path))
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _read_file(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _load_text_uncached(source: str | os.PathLike | None) -> tuple[str, str]:
    if source is None:
        return default_text()
    text_source = os.fspath(source)
    if text_source.startswith(_DATASETS_PREFIX):
        return _load_hf_text(text_source[len(_DATASETS_PREFIX):])
    if text_source.startswith(_TSV_PREFIX):
        return _load_tsv_text(text_source[len(_TSV_PREFIX):])
    path = Path(text_source).expanduser()
    if not _is_file(path):
        raise DataError(f"text file {_shown(path)} does not exist or is not a file ({RELATIVE_PATH_RULE})")
    try:
        text = _read_file(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {_shown(path)} is not UTF-8: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read the text file {_shown(path)}: {exc.strerror or exc}") from exc
    if not text.strip():
        raise DataError(f"text file {str(path)!r} is empty")
    return text, f"{path.name} ({len(text):,} characters, {path.resolve()})"


def _split_tsv(spec: str) -> tuple[str, str, bool]:
    """``PATH:COLUMNS[:header]`` -> (PATH, COLUMNS, header); PATH may hold colons."""
    parts = spec.split(":")
    header = len(parts) > 2 and parts[-1] == "header"
    if header:
        parts = parts[:-1]
    if len(parts) < 2:
        raise DataError(f"expected tsv:PATH:COLUMNS[:header], got {_TSV_PREFIX}{spec!r}")
    return ":".join(parts[:-1]), parts[-1], header


def _load_tsv_text(spec: str) -> tuple[str, str]:
    path_text, columns_text, header = _split_tsv(spec)
    try:
        columns = [int(c) for c in columns_text.split(",")]
    except ValueError:
        raise DataError(f"tsv columns must be 0-based integers separated by commas, got {columns_text!r}") from None
    if not columns or min(columns) < 0:
        raise DataError(f"tsv columns must be 0-based integers separated by commas, got {columns_text!r}")
    table, _ = _load_text_uncached(path_text)  # the extracted text is what load_text keeps
    lines = table.splitlines()[1 if header else 0 :]
    fields = [row[c].strip() for row in (line.split("\t") for line in lines) if len(row) > max(columns) for c in columns]
    text = "\n".join(f for f in fields if f)
    if not text:
        raise DataError(f"columns {columns} of {path_text!r} hold no text (rows need more than {max(columns)} tab-separated fields)")
    return text, f"columns {columns_text} of {Path(path_text).name} ({len(fields):,} fields, {len(text):,} characters)"


def _load_hf_text(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"expected datasets:NAME[:CONFIG][:SPLIT], got {_DATASETS_PREFIX}{spec!r}")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"text source {_DATASETS_PREFIX}{spec} needs the optional 'datasets' package: pip install datasets"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (network, missing config)
        raise DataError(f"cannot load data set {name!r} (config {config!r}, split {split!r}): {exc}") from exc
    columns = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string"]
    if not columns:
        raise DataError(f"data set {name!r} has no string column (columns: {list(dataset.features)})")
    column = "text" if "text" in columns else columns[0]
    text = "\n".join(dataset[column])
    if not text.strip():
        raise DataError(f"data set {name!r} split {split!r} column {column!r} is empty")
    label = ":".join(p for p in (name, config, split) if p)
    return text, f"{label} column {column!r} ({len(text):,} characters, Hugging Face datasets)"


def load_sts_pairs(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """Read STS Benchmark sentence pairs with their gold similarity.

    Two layouts are accepted:

    - the original release (``sts-dev.tsv``): no header, tab-separated
      ``genre, file, year, id, score, sentence1, sentence2``; extra trailing columns
      (a few rows carry two) are ignored;
    - a TSV with a header row naming ``sentence1``, ``sentence2`` and one of
      ``score``, ``label`` or ``similarity_score`` (GLUE / datasets exports).

    Fields are split on tabs only (no CSV quoting: the sentences contain quotes).

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    list of (sentence1, sentence2, score)
        ``score`` as in the file (0-5 for STS-B), in file order.

    Raises
    ------
    DataError
        If the file is missing or has no pairs, or a row has too few columns or a
        score that is not a finite number (the message gives the line number).
    """
    path = Path(path).expanduser()
    if not _is_file(path):
        raise DataError(f"STS pairs file {_shown(path)} does not exist ({RELATIVE_PATH_RULE})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"STS pairs file {_shown(path)} is not UTF-8: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read the STS pairs file {_shown(path)}: {exc.strerror or exc}") from exc
    rows = [(number, line.split("\t")) for number, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise DataError(f"STS pairs file {str(path)!r} is empty")

    header = [h.strip().lower() for h in rows[0][1]]
    if "sentence1" in header and "sentence2" in header:
        score_names = [n for n in ("score", "label", "similarity_score") if n in header]
        if not score_names:
            raise DataError(
                f"{str(path)!r}: the header has sentence1/sentence2 but no score column "
                "(expected one of score, label, similarity_score)"
            )
        i_score, i_s1, i_s2 = header.index(score_names[0]), header.index("sentence1"), header.index("sentence2")
        rows = rows[1:]
    else:
        i_score, i_s1, i_s2 = 4, 5, 6

    needed = max(i_score, i_s1, i_s2) + 1
    pairs: list[tuple[str, str, float]] = []
    for number, fields in rows:
        if len(fields) < needed:
            raise DataError(f"{str(path)!r} line {number}: {len(fields)} tab-separated fields, expected at least {needed}")
        try:
            score = float(fields[i_score])
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{str(path)!r} line {number}: score {fields[i_score]!r} is not a finite number")
        pairs.append((fields[i_s1].strip(), fields[i_s2].strip(), score))
    if not pairs:
        raise DataError(f"STS pairs file {str(path)!r} has a header but no pairs")
    return pairs


def _relocated_shared_data(path: Path) -> Path | None:
    """``$OPTIMUM_LOWRANK_DATA/REST`` for a path ``.../shared/data/REST`` when that file exists, else None."""
    env = os.environ.get("OPTIMUM_LOWRANK_DATA")
    parts = path.parts
    if not env:
        return None
    for i in range(len(parts) - 1):
        if parts[i] == "shared" and parts[i + 1] == "data" and i + 2 < len(parts):
            moved = Path(env).expanduser().joinpath(*parts[i + 2:])
            return moved if moved.exists() else None
    return None


def resolve_recipe_paths(recipe: object, folder: Path) -> list[str]:
    """Make the relative data paths of a recipe read from a file in ``folder`` absolute, in place.

    Every string under a key of :data:`DATA_KEYS` (at any depth: ``calibration.data``,
    ``accuracy.data``, a pass's ``data``, ``search.data`` / ``search_data`` / ``calibration``)
    is a data source. A relative file path, alone or inside ``tsv:PATH:COLUMNS[:header]``, is
    resolved against ``folder``; ``datasets:...``, absolute and ``~`` paths are left as they
    are. For recipes written before this rule: when the path does not exist there but does
    relative to the working directory, that file is used and a warning says how to write it.
    A path through the project's shared data folder (``.../shared/data/REST``) that exists
    neither way is looked up as ``$OPTIMUM_LOWRANK_DATA/REST`` when that variable is set
    (a checkout that does not sit beside ``shared/``, e.g. a CI clone).

    Parameters
    ----------
    recipe : the parsed YAML (dicts and lists); modified in place.
    folder : Path
        The recipe file's folder, absolute.

    Returns
    -------
    list of str
        The warnings (one per path resolved against the working directory).
    """
    notes: list[str] = []

    def resolve(path_text: str, key: str) -> str:
        path = Path(path_text)
        if not path_text or path.is_absolute() or path_text.startswith("~"):
            return path_text
        beside = Path(os.path.normpath(folder / path))
        here = Path(os.path.normpath(Path.cwd() / path))
        if not beside.exists() and not here.exists():
            moved = _relocated_shared_data(path)
            if moved is not None:
                return str(moved)
        if not beside.exists() and here.exists():
            notes.append(
                f"recipe {key}: {path_text!r} is not in the recipe's folder ({beside} does not exist); using {here} "
                f"relative to the working directory. {RELATIVE_PATH_RULE[0].upper()}{RELATIVE_PATH_RULE[1:]}: "
                f"write {os.path.relpath(here, folder)!r}"
            )
            return str(here)
        return str(beside)

    def source(value: str, key: str) -> str:
        if value.startswith(_DATASETS_PREFIX):
            return value
        if value.startswith(_TSV_PREFIX):
            path_text, columns, header = _split_tsv(value[len(_TSV_PREFIX):])
            return f"{_TSV_PREFIX}{resolve(path_text, key)}:{columns}{':header' if header else ''}"
        return resolve(value, key)

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                name = f"{where}.{key}" if where else str(key)
                if key in DATA_KEYS and isinstance(value, str):
                    node[key] = source(value, name)
                else:
                    walk(value, name)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{where}[{index}]")

    walk(recipe, "")
    return notes


def shared_data_dir() -> Path | None:
    """Locate the shared real data sets (WikiText-2, STS-B, SST-2) for tests and benchmarks.

    Looks, in order, at ``$OPTIMUM_LOWRANK_DATA``, ``<project root>/../shared/data``
    and ``<project root>/shared/data``, where the project root is the folder
    holding the ``optimum_lowrank`` package (a source checkout).

    Returns
    -------
    Path or None
        The first of those folders that exists, or None.
    """
    env = os.environ.get("OPTIMUM_LOWRANK_DATA")
    candidates = [Path(env).expanduser()] if env else []
    root = Path(__file__).resolve().parent.parent
    candidates += [root.parent / "shared" / "data", root / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    max_windows: int,
    stride: int | None = None,
    *,
    add_bos: bool = False,
    strict: bool = False,
) -> torch.LongTensor:
    """Tokenize ``text`` once (no special tokens) and cut it into fixed windows.

    Window ``i`` holds tokens ``[i * stride, i * stride + seq_len)`` of the token
    stream; only full windows are returned, at most ``max_windows`` of them, from
    the start of the text. By default a text too short for ``max_windows`` windows
    silently gives fewer; ``strict=True`` makes that an error.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    text : str
    seq_len : int, >= 1
        Tokens per window.
    max_windows : int, >= 1
    stride : int, >= 1, optional
        Tokens between window starts; defaults to ``seq_len`` (no overlap).
    add_bos : bool
        Start the token stream with ``tokenizer.bos_token_id`` (when the tokenizer
        has one), marking the start of the document, so that the text's first token
        is predicted too. Special tokens are never added anywhere else.
    strict : bool
        Require exactly ``max_windows`` windows (for callers that need N windows,
        e.g. N fresh fine-tuning windows after the calibration ones).

    Returns
    -------
    torch.LongTensor, shape (n_windows, seq_len)
        ``1 <= n_windows <= max_windows`` (``n_windows == max_windows`` if ``strict``).

    Raises
    ------
    ValueError
        If ``seq_len``, ``max_windows`` or ``stride`` is below 1.
    DataError
        If the text has fewer than ``seq_len`` tokens, or, with ``strict``, gives fewer
        than ``max_windows`` windows (the message says how many it gives).
    """
    import torch

    stride = seq_len if stride is None else stride
    for name, value in (("seq_len", seq_len), ("max_windows", max_windows), ("stride", stride)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        ids = [bos, *ids]
    if len(ids) < seq_len:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    available = (len(ids) - seq_len) // stride + 1
    if strict and available < max_windows:
        raise DataError(
            f"asked for {max_windows} windows of {seq_len} tokens (stride {stride}), but the text has {len(ids):,} tokens: "
            f"only {available} windows"
        )
    n = min(max_windows, available)
    tensor = torch.tensor(ids, dtype=torch.long)
    return torch.stack([tensor[i * stride : i * stride + seq_len] for i in range(n)])
