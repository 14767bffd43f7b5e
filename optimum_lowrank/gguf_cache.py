"""The float32 safetensors cache of GGUF files: where an entry lives, how it is written, how a damaged one is found.

A GGUF-loaded transformers model carries a ``quantization_config`` and refuses
``save_pretrained``; :func:`convert_gguf` dequantises the file once, rebuilds a plain model
and writes it (with the tokenizer and a manifest) atomically under :func:`gguf_cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from optimum_lowrank.cache import cache_root
from optimum_lowrank.errors import ModelLoadError
from optimum_lowrank.output import remove_stale

__all__ = ["cache_entry_problem", "convert_gguf", "gguf_cache_dir", "gguf_field"]

# Bump when the conversion changes what is written (entries of other versions are ignored).
_GGUF_CACHE_FORMAT = 2


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Folder where the float32 safetensors conversion of a GGUF file is cached.

    ``<root>/gguf/<stem>-<size in bytes>-<hash>/`` where ``<root>`` is
    ``$OPTIMUM_LOWRANK_CACHE`` if set, else ``$XDG_CACHE_HOME/optimum_lowrank``
    (default ``~/.cache/optimum_lowrank``), and ``<hash>`` is 12 hex digits of the
    SHA-256 of the file's absolute path, modification time (ns) and the cache format
    version, so an edited or replaced file (or a new conversion recipe) gets a fresh
    entry.

    Parameters
    ----------
    gguf_path : str or PathLike
        An existing ``.gguf`` file.

    Returns
    -------
    Path
        The cache folder (which may not exist yet).
    """
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = f"{_GGUF_CACHE_FORMAT}\0{path}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{stat.st_size}-{digest}"


def gguf_field(gguf: Path, key: str) -> object | None:
    """Value of a scalar metadata field of a GGUF file, or None if absent/unreadable."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields.get(key)
        return field.contents() if field is not None else None
    except Exception:  # noqa: BLE001 - metadata is a nicety here
        return None


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and save model + tokenizer to ``target`` atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the GGUF file {str(gguf)!r}: {exc}") from exc

    # transformers builds a Llama tokenizer that always prepends BOS; honour the
    # file's tokenizer.ggml.add_bos_token (False for SmolLM2, like its HF tokenizer).
    add_bos = gguf_field(gguf, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and not bool(add_bos) and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False

    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained;
    # rebuild a plain model from the config and copy the (dequantised) weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    try:  # skip the random init of weights that are all overwritten below (saves seconds)
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    # With tied embeddings lm_head.weight shares embed_tokens.weight; nothing else may be missing.
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"GGUF conversion of {str(gguf)!r} did not map all weights "
            f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})"
        )
    plain.tie_weights()
    del loaded

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, f".{target.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        manifest = {"format": _GGUF_CACHE_FORMAT, "files": {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}}
        (tmp / _MANIFEST).write_text(json.dumps(manifest))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache entry is ordinary data
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer's finished entry
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_MANIFEST = "optimum-lowrank-cache.json"


def cache_entry_problem(entry: Path) -> str | None:
    """None if the GGUF cache entry is complete; ``"absent"``; or what is wrong with it.

    An entry holds :data:`_MANIFEST` (format version and the size of every file, written
    last); an entry written before the manifest existed must hold ``config.json`` and
    ``model.safetensors``.
    """
    if not entry.exists():
        return "absent"
    if not entry.is_dir():
        return "not a folder"
    manifest_path = entry / _MANIFEST
    if not manifest_path.is_file():
        missing = [name for name in ("config.json", "model.safetensors") if not (entry / name).is_file()]
        return f"no {', '.join(missing)}" if missing else None
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest: {type(err).__name__}"
    if manifest.get("format") != _GGUF_CACHE_FORMAT:
        return f"cache format {manifest.get('format')!r}, expected {_GGUF_CACHE_FORMAT}"
    for name, size in files.items():
        path = entry / str(name)
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    return None
