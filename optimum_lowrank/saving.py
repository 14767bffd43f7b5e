"""Keep a compressed PyTorch model: :func:`save_pretrained` writes a folder, :func:`from_pretrained` rebuilds it exactly.

The folder holds

- ``config.json``: ``model_type`` ``"optimum-lowrank"`` (so ``transformers.AutoModel`` refuses the
  folder with "does not recognize this architecture" instead of building the dense model with
  random layers) and, under ``"optimum_lowrank"``: the original architecture (a ``transformers``
  class name) and its config; ``modules``, one entry per module that differs from what that
  architecture builds from its config (module path, registered layer name, constructor
  arguments, the recipe pass and options that put it there); ``attributes``, plain attributes
  changed in place (e.g. the head count of a pruned attention block); ``aliases``, weights
  shared under several names (tied embeddings);
- ``model.lowrank.safetensors``: every weight once, in safetensors (no pickle); the name is not
  one ``transformers`` looks for, so ``BertModel.from_pretrained(folder)`` fails on the missing
  weights file instead of initialising them;
- the tokenizer's files, when one is given (``AutoTokenizer.from_pretrained(folder)`` reads them).

Rebuilding: the architecture is built from its config (weights not initialised), each recorded
module is built by its registered layer class from its constructor arguments (a tensor argument
is read from the weights file; a module argument is the rebuilt module at that path, so a head
tied to a compressed embedding shares it again), put in place, and every weight is loaded with
``strict`` checking. Layer classes come from the ``lowrank_register_layers`` hook
(:class:`~optimum_lowrank.plugins.LayerRegistry`); third-party plugins register theirs there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from optimum_lowrank.errors import ModelLoadError, UnknownLayerError
from optimum_lowrank.output import check_output, staging

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.plugins import LayerRegistry
    from optimum_lowrank.report import PassReport

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "MODEL_TYPE", "WEIGHTS_NAME", "from_pretrained", "save_pretrained", "write_pretrained"]

#: ``model_type`` of the saved config: unknown to transformers, so its Auto classes refuse the folder.
MODEL_TYPE = "optimum-lowrank"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.lowrank.safetensors"
_LOAD_HINT = "load it with optimum_lowrank.from_pretrained(folder); transformers' Auto classes cannot rebuild its compressed layers"
_PLAIN = (bool, int, float, str, type(None))


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer: Any = None,
    passes: list[PassReport] | None = None,
    overwrite: bool = False,
    registry: LayerRegistry | None = None,
) -> Path:
    """Write ``model`` (a ``transformers`` model compressed by passes) to ``folder``, atomically.

    Parameters
    ----------
    model : PreTrainedModel
        A ``transformers`` class whose modules are either what that class builds from
        ``model.config`` or registered layers (see ``lowrank_register_layers``).
    folder : path
        Written through :func:`optimum_lowrank.output.staging`: nothing is left half-written.
    tokenizer : PreTrainedTokenizerBase, optional
        Saved beside the model.
    passes : list of PassReport, optional
        The passes that compressed the model (``optimize`` / ``apply_passes`` reports): each
        recorded module names the pass (and its options) of the longest reported layer path
        containing it.
    overwrite : bool
        Replace a non-empty folder this project wrote (see :func:`optimum_lowrank.output.check_output`).
    registry : LayerRegistry, optional
        Defaults to every installed plugin's layers.

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    UnknownLayerError
        A module that the architecture does not build is of an unregistered class.
    ModelLoadError
        ``model`` is not a ``transformers`` model class.
    OutputError, OutputExistsError
        ``folder`` cannot be written (see :func:`optimum_lowrank.output.check_output`).
    """
    out_dir = check_output(folder, overwrite)
    with staging(out_dir) as tmp:
        write_pretrained(model, tmp, tokenizer=tokenizer, passes=passes, registry=registry)
    return out_dir


def write_pretrained(model: nn.Module, folder: Path, *, tokenizer: Any = None, passes: list[PassReport] | None = None,
                     registry: LayerRegistry | None = None) -> None:
    """:func:`save_pretrained` into ``folder`` as it is (the caller stages it); creates the folder."""
    from safetensors.torch import save_file

    from optimum_lowrank.plugins import get_layer_registry

    registry = registry or get_layer_registry()
    architecture = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ModelLoadError(f"cannot save a {architecture}: only transformers models (with a config) can be saved and rebuilt")
    base_config = config.to_dict()
    attn = getattr(config, "_attn_implementation", None)
    with torch.device("meta"):
        stock = _build_architecture(architecture, base_config, attn)
    paths = {id(module): name for name, module in model.named_modules()}
    keys, aliases, weights = _weights(model)
    modules, attributes = _differences(model, stock, registry, paths, keys)
    _name_passes(modules, passes or [])
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    record = {
        "model_type": MODEL_TYPE,
        "architectures": [f"OptimumLowRank{architecture}"],
        "optimum_lowrank": {
            "format_version": FORMAT_VERSION,
            "how_to_load": _LOAD_HINT,
            "architecture": architecture,
            "attn_implementation": attn,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "weights": WEIGHTS_NAME,
            "modules": modules,
            "attributes": attributes,
            "aliases": aliases,
            "passes": [{"pass": p.pass_id, **{k: v for k, v in p.config.items() if k != "pass"}} for p in passes or []],
            "base_config": base_config,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "written_by": "optimum-lowrank"})
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2, default=_json_default) + "\n", encoding="utf-8")
    if callable(getattr(tokenizer, "save_pretrained", None)):  # a stand-in tokenizer without files is left out
        tokenizer.save_pretrained(folder)


def from_pretrained(folder: str | os.PathLike, *, registry: LayerRegistry | None = None) -> nn.Module:
    """Rebuild the model :func:`save_pretrained` wrote to ``folder`` (or to ``folder/pytorch``), in eval mode.

    Parameters
    ----------
    folder : path
        A folder written by :func:`save_pretrained`, or an ``optimize`` output folder
        holding one as ``pytorch/``.
    registry : LayerRegistry, optional
        Where layer names are looked up; defaults to every installed plugin's layers.

    Returns
    -------
    PreTrainedModel
        The saved architecture's class, with the recorded modules in place and every weight
        loaded; ``model.config`` is the saved model's config.

    Raises
    ------
    ModelLoadError
        No such folder, no ``config.json`` written by this project, an unsupported format
        version, a missing or mismatched weight.
    UnknownLayerError
        The folder names a layer class no installed plugin registers (the message lists the registered ones).
    """
    from safetensors.torch import load_file

    from optimum_lowrank.plugins import get_layer_registry

    folder = _saved_folder(Path(folder))
    saved = _read_config(folder)
    registry = registry or get_layer_registry()
    records = saved["modules"]
    unknown = sorted({r["layer"] for r in records.values() if registry.entry(r["layer"]) is None})
    if unknown:
        raise UnknownLayerError(
            f"{folder}: layer class {', '.join(map(repr, unknown))} is not registered by any installed plugin "
            f"(registered: {', '.join(registry.names())}); install the plugin that provides it"
        )
    weights_name = saved.get("weights", WEIGHTS_NAME)
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name or not weights_name.endswith(".safetensors"):
        raise ModelLoadError(f"{folder}: 'weights' must name a .safetensors file in the folder, got {weights_name!r}")
    weights_path = folder / weights_name
    if not weights_path.is_file():
        raise ModelLoadError(f"{folder}: the weights file {weights_path.name} is missing")
    tensors = load_file(str(weights_path))
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():  # every weight is loaded below, strictly
        model = _build_architecture(saved["architecture"], saved["base_config"], saved.get("attn_implementation"))
    model.tie_weights()  # as transformers' from_pretrained does: ties the config asks for (tie_word_embeddings)
    built: dict[str, nn.Module] = {}
    building: list[str] = []

    def module_at(path: str) -> nn.Module:
        if path in records:
            return build(path)
        try:
            return model.get_submodule(path)
        except AttributeError as err:
            raise ModelLoadError(f"{folder}: a recorded module refers to {path!r}, which the rebuilt model does not have") from err

    def tensor(key: str) -> torch.Tensor:
        key = saved["aliases"].get(key, key)
        if key not in tensors:
            raise ModelLoadError(f"{folder}: a recorded module refers to the weight {key!r}, missing from {weights_path.name}")
        return tensors[key]

    def build(path: str) -> nn.Module:
        if path not in built:
            if path in building:
                raise ModelLoadError(f"{folder}: recorded modules refer to each other in a cycle: {' -> '.join([*building, path])}")
            building.append(path)
            record = records[path]
            config = _decode(record["config"], module_at, tensor)
            try:
                built[path] = registry.entry(record["layer"]).from_config(config)
            except Exception as err:  # a layer's own validation: the folder does not match the installed code
                raise ModelLoadError(f"{folder}: cannot rebuild {path} as {record['layer']}({_short(record['config'])}): {err}") from err
            building.pop()
        return built[path]

    for path in records:
        build(path)
    for path in sorted(records, key=lambda p: p.count(".")):
        model.set_submodule(path, built[path])
    for path, changed in saved["attributes"].items():
        module = model.get_submodule(path)
        for name, value in changed.items():
            setattr(module, name, set(value["$set"]) if isinstance(value, dict) and "$set" in value else value)
    model.to(getattr(torch, saved.get("torch_dtype", "float32")))
    state = dict(tensors)
    state.update({alias: tensors[key] for alias, key in saved["aliases"].items() if key in tensors})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: the weights do not match the rebuilt model: missing {_few(missing)}; unexpected {_few(unexpected)}"
        )
    return model.eval()


# --------------------------------------------------------------------------- saving


def _weights(model: nn.Module) -> tuple[dict[int, str], dict[str, str], dict[str, torch.Tensor]]:
    """``id(tensor) -> state-dict key`` (first name), ``alias -> key`` for shared tensors, and the tensors to write."""
    keys: dict[int, str] = {}
    aliases: dict[str, str] = {}
    weights: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in keys:
            aliases[key] = keys[id(value)]
            continue
        keys[id(value)] = key
        weights[key] = value.detach().contiguous()
    return keys, aliases, weights


def _differences(model: nn.Module, stock: nn.Module, registry: LayerRegistry, paths: dict[int, str],
                 keys: dict[int, str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Modules of ``model`` that ``stock`` (the same architecture, from the same config) lacks or has
    with another structure, and plain attributes changed in place.

    The children a recorded layer's constructor builds itself are not recorded; those it
    receives as arguments (:meth:`layer_config` values) are compared like any module.
    """
    if type(model) is not type(stock):
        raise ModelLoadError(f"cannot save a {type(model).__name__}: rebuilding its config gives a {type(stock).__name__}")
    modules: dict[str, dict] = {}
    attributes: dict[str, dict] = {}
    owned: dict[str, bool] = {}  # path -> True: a recorded layer (its other descendants are built by it); False: an argument
    for path, module in model.named_modules():
        if not path or _built_by_owner(path, owned):
            continue
        reference = _submodule(stock, path)
        name = registry.name_of(type(module))
        if reference is not None and type(reference) is type(module):
            if name is None:
                changed = _changed_attributes(module, reference)
                if changed:
                    attributes[path] = changed
                continue
            entry = registry.entry(name)
            if _structure(entry.to_config(module)) == _structure(entry.to_config(reference)):
                continue
        if name is None:
            raise UnknownLayerError(
                f"cannot save {path}: its class {type(module).__module__}.{type(module).__qualname__} is not a registered layer "
                f"(registered: {', '.join(registry.names())}); a plugin registers its layers through the lowrank_register_layers hook"
            )
        arguments: list[str] = []
        config = _encode(registry.entry(name).to_config(module), paths, keys, path, arguments)
        modules[path] = {"layer": name, "config": config}
        owned[path] = True
        owned.update({arg: False for arg in arguments if arg.startswith(path + ".")})
    return modules, attributes


def _built_by_owner(path: str, owned: dict[str, bool]) -> bool:
    """Whether the nearest recorded ancestor-or-argument of ``path`` is a recorded layer (strict ancestor)."""
    best = max((p for p in owned if path.startswith(p + ".") or path == p), key=len, default=None)
    return best is not None and owned[best] and best != path


def _encode(value: Any, paths: dict[int, str], keys: dict[int, str], where: str, arguments: list[str]) -> Any:
    if isinstance(value, torch.Tensor):
        if id(value) not in keys:
            raise UnknownLayerError(f"cannot save {where}: its layer_config() holds a tensor that is not a weight or buffer of the model")
        return {"$tensor": keys[id(value)]}
    if isinstance(value, nn.Module):
        if id(value) not in paths:
            raise UnknownLayerError(f"cannot save {where}: its layer_config() holds a {type(value).__name__} that is not part of the model")
        arguments.append(paths[id(value)])
        return {"$module": paths[id(value)]}
    if isinstance(value, dict):
        return {str(k): _encode(v, paths, keys, where, arguments) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, paths, keys, where, arguments) for v in value]
    if isinstance(value, _PLAIN):
        return value
    raise UnknownLayerError(f"cannot save {where}: its layer_config() holds a {type(value).__name__}"
                            f"; allowed: JSON values, tensors, modules")


def _structure(value: Any) -> Any:
    """A layer config with tensors as (shape, dtype) and modules as class names: what equal structure means."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, nn.Module):
        return ("module", type(value).__qualname__)
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_structure(v) for v in value]
    return value


def _changed_attributes(module: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """Plain public attributes (numbers, strings, and lists / tuples / sets of them) that differ from ``reference``."""
    changed = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training" or not _plain(value):
            continue
        if name not in vars(reference) or vars(reference)[name] != value:
            changed[name] = {"$set": sorted(value)} if isinstance(value, set | frozenset) else value
    return changed


def _plain(value: Any) -> bool:
    if isinstance(value, list | tuple | set | frozenset):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def _name_passes(modules: dict[str, dict], passes: list[PassReport]) -> None:
    """Give each record the pass (and options) of the longest reported layer path containing it, else of a module it refers to."""
    owners: dict[str, tuple[str, dict]] = {}
    for report in passes:
        options = {k: v for k, v in report.config.items() if k != "pass"}
        for layer in report.layers:
            if layer.action != "skipped":
                owners[layer.name] = (report.pass_id, options)

    def owner(path: str) -> tuple[str, dict] | None:
        best = max((p for p in owners if path == p or path.startswith(p + ".")), key=len, default=None)
        return None if best is None else owners[best]

    for path, record in modules.items():
        found = owner(path)
        if found is None:  # e.g. a tied head: the pass of the embedding it shares
            refs = [r for r in _module_refs(record["config"]) if owner(r) is not None]
            found = owner(refs[0]) if refs else None
        if found is not None:
            record["pass"], record["options"] = found


def _module_refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        if "$module" in value:
            return [value["$module"]]
        return [r for v in value.values() for r in _module_refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _module_refs(v)]
    return []


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------- loading


def _saved_folder(folder: Path) -> Path:
    if not (folder / CONFIG_NAME).is_file() and (folder / "pytorch" / CONFIG_NAME).is_file():
        return folder / "pytorch"
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no {CONFIG_NAME}; give a folder written by save_pretrained / optimize(save_pytorch=True)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable ({err})") from err
    saved = record.get("optimum_lowrank") if isinstance(record, dict) else None
    if record.get("model_type") != MODEL_TYPE or not isinstance(saved, dict):
        raise ModelLoadError(
            f"{path}: model_type {record.get('model_type')!r} is not {MODEL_TYPE!r}: not a compressed model written by "
            f"optimum-lowrank (a stock model loads with transformers' AutoModel)"
        )
    if saved.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format_version {saved.get('format_version')!r}; this optimum-lowrank reads {FORMAT_VERSION}")
    for key in ("architecture", "base_config", "modules", "attributes", "aliases"):
        if key not in saved:
            raise ModelLoadError(f"{path}: the optimum_lowrank section lacks {key!r}")
    return saved


def _build_architecture(architecture: str, base_config: dict, attn_implementation: str | None) -> nn.Module:
    """``transformers.<architecture>`` built from ``base_config`` (a class name from ``transformers``, nothing else)."""
    import transformers
    from transformers import CONFIG_MAPPING

    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{architecture!r} is not a transformers model class; only transformers models can be saved and rebuilt")
    config_dict = dict(base_config)
    model_type = config_dict.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"model_type {model_type!r} of the saved config is unknown to this transformers {transformers.__version__}")
    config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return cls._from_config(config, **kwargs)


def _decode(value: Any, module_at, tensor) -> Any:
    if isinstance(value, dict):
        if "$module" in value:
            return module_at(value["$module"])
        if "$tensor" in value:
            return tensor(value["$tensor"])
        return {k: _decode(v, module_at, tensor) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, module_at, tensor) for v in value]
    return value


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _few(names: list[str]) -> str:
    return "none" if not names else ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _short(config: dict) -> str:
    text = json.dumps(config)
    return text if len(text) <= 200 else text[:200] + "..."
