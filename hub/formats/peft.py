"""Adapter artifacts on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Whatever PEFT saves, ``read_adapter`` reads; whatever ``write_adapter`` writes for a method PEFT knows, PEFT
loads unchanged. Only safetensors are read: pickle files are refused, never opened.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from hub.errors import Conflict, HubError, InvalidArtifact
from hub.formats.spec import AdapterSpec
from hub.methods.base import KEY_PREFIX  # noqa: F401  (the prefix of every module key, re-exported)
from hub.methods.table import lookup  # method modules (and torch) load only when an adapter of theirs is read

if TYPE_CHECKING:  # torch loads when tensors are read or written, so registry-only commands start fast
    import torch

    from hub.methods.base import Method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")


@dataclass
class Adapter:
    """An adapter in memory: its PEFT config and its tensors (file keys, as in the safetensors file).

    ``kind`` is its method (``hub.methods.table``), which knows what the tensors mean; ``spec`` what the registry
    indexes about it.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    spec: AdapterSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = describe(self.config, self.tensors)

    @property
    def kind(self) -> Method:
        return method_of(self.config)

    @property
    def method(self) -> str:
        """The name the registry records (``lora``, ``dora``, ``vera``...)."""
        return self.spec.method

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors grouped by adapted module path (``model.layers.0.self_attn.q_proj``) and parameter name."""
        return self.kind.modules(self.tensors)

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def method_of(config: dict[str, Any]) -> Method:
    """The method of a config's ``peft_type`` (a composition artifact's included). Raises InvalidArtifact."""
    return lookup(config.get("peft_type"))


def describe(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterSpec:
    """Normalize a PEFT config plus its tensors into an AdapterSpec (validation is ``validate``'s job)."""
    method = method_of(config)
    modules = method.modules(tensors)
    alpha = method.alpha(config)
    option_keys = ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                   "num_virtual_tokens", "placement", "feedforward_modules", "modules_to_save")
    options = {key: config[key] for key in option_keys if config.get(key) not in (None, {}, [], False)}
    return AdapterSpec(method=method.label(config), rank=method.rank(config, modules),
                       alpha=None if alpha is None else float(alpha), targets=method.targets(config, modules),
                       base_model=config.get("base_model_name_or_path"), options=options,
                       variants=method.variants(config))


def validate(adapter: Adapter) -> None:
    """Refuse adapters whose config is malformed or whose tensors contradict it or hold non-finite values."""
    method = adapter.kind
    method.check_config(adapter.config)
    for key, tensor in adapter.tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise InvalidArtifact(f"tensor {key} contains NaN or infinite values")
    method.validate(adapter.config, adapter.tensors)


def normalize_keys(method: Method, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as PEFT saves them. PEFT also loads files whose keys keep the in-model adapter name, one segment in
    every key (``...q_proj.lora_A.default.weight``, ``...lm_head.modules_to_save.default.weight``): the segment is
    dropped when that turns keys into the method's own, and leaves every other key a module's weight or bias."""
    if not tensors or not method.params:
        return tensors
    common = set.intersection(*(set(key.split(".")) for key in tensors)) - {"base_model", "model"}
    for name in sorted(common):
        renamed = {key: _drop_last(key, name).replace(".modules_to_save.", ".") for key in tensors}
        gained = any(method.split_key(new) is not None and method.split_key(key) is None
                     for key, new in renamed.items())
        if gained and all(method.split_key(new) is not None or new.endswith((".weight", ".bias"))
                          for new in renamed.values()):
            if len(set(renamed.values())) != len(renamed):
                raise InvalidArtifact(f"tensor keys collide once the adapter name {name!r} is dropped from them")
            return {renamed[key]: tensor for key, tensor in tensors.items()}
    return tensors


def _drop_last(key: str, segment: str) -> str:
    parts = key.split(".")
    index = len(parts) - 1 - parts[::-1].index(segment)
    return ".".join(parts[:index] + parts[index + 1:])


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read and validate a PEFT-format adapter folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidArtifact(f"{folder} is not a folder")
    weights = folder / WEIGHTS_NAME
    pickles = [name for name in PICKLE_NAMES if (folder / name).exists()]
    if pickles and not weights.exists():
        raise InvalidArtifact(
            f"{folder / pickles[0]} is a pickle file, which the hub never opens; convert it in a trusted "
            "environment: load it with torch.load and save it with safetensors.torch.save_file as "
            f"{WEIGHTS_NAME}"
        )
    config = read_config(folder / CONFIG_NAME)
    if not weights.exists():
        raise InvalidArtifact(f"{folder} has no {WEIGHTS_NAME}")
    _refuse_nested_adapters(folder, config)
    from safetensors.torch import load_file  # torch loads only when tensors are read (fast registry commands)

    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidArtifact(f"{weights} is not a readable safetensors file ({exc})") from None
    adapter = Adapter(config=config, tensors=normalize_keys(method_of(config), tensors))
    validate(adapter)
    return adapter


def _refuse_nested_adapters(folder: Path, config: dict[str, Any]) -> None:
    """A folder whose config names other adapters saved in its subfolders (X-LoRA's experts: ``adapters``) is more
    than one version can hold: registering the top level alone would drop the experts without a word."""
    named = config.get("adapters") if isinstance(config.get("adapters"), dict) else {}
    nested = sorted(name for name in named if (folder / name / CONFIG_NAME).is_file())
    if nested:
        shown = ", ".join(nested[:5]) + (", ..." if len(nested) > 5 else "")
        raise InvalidArtifact(f"{folder} keeps the adapters it names in subfolders ({shown}), which one version cannot "
                              "hold: register each of them, then combine them with hub compose --kind mixture")


def read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise InvalidArtifact(f"{path.parent} has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArtifact(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidArtifact(f"{path} nests too deeply to be an adapter config") from None
    except OSError as exc:
        raise InvalidArtifact(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise InvalidArtifact(f"{path} must hold a JSON object")
    method_of(config).check_config(config)
    return config


def export_adapter(adapter: Adapter, target: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as the PEFT folder ``target``, whole or not at all: written beside it, then renamed.

    Raises Conflict when ``target`` exists and is not an empty folder, HubError when it cannot be written.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise Conflict(f"{target} exists and is not an empty folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise HubError(f"cannot write to {target}: {exc.strerror or exc}") from None
    try:
        write_adapter(adapter, staging)
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    except OSError as exc:
        raise HubError(f"cannot write to {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_adapter(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as a PEFT folder (config sorted like PEFT's own, tensors contiguous, fsynced)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / CONFIG_NAME
    config_path.write_text(json.dumps(_jsonable(adapter.config), indent=2, sort_keys=True) + "\n")
    weights_path = folder / WEIGHTS_NAME
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, weights_path, metadata={"format": "pt"})
    for written in (config_path, weights_path):
        with open(written, "rb") as handle:
            os.fsync(handle.fileno())
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArtifact(f"config value {value} is not finite")
    return value
