"""Adapter artifacts on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Whatever PEFT saves, ``read_adapter`` reads; whatever ``write_adapter`` writes for a method PEFT knows, PEFT
loads unchanged. Only safetensors are read: pickle files are refused, never opened.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from hub.errors import InvalidArtifact
from hub.formats.composition import validate_composition
from hub.formats.spec import COMPOSITION_METHODS, PEFT_TYPES, PROMPT_METHODS, AdapterSpec, pattern_value

if TYPE_CHECKING:  # torch loads when tensors are read or written, so registry-only commands start fast
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."

# Per method, the parameter names that sit under an adapted module (the file key is "<module>.<param>").
MODULE_PARAMS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
             "lora_embedding_A", "lora_embedding_B"),
    "adalora": ("lora_A", "lora_B", "lora_E", "ranknum"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "ia3": ("ia3_l",),
    "oft": ("oft_R.weight", "oft_R", "oft_s"),
    "boft": ("boft_R", "boft_s"),
    "ln_tuning": ("ln_tuning_layers.weight", "ln_tuning_layers.bias"),
    "bitfit": ("bias",),
    "bottleneck": ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"),
}


@dataclass
class Adapter:
    """An adapter in memory: its PEFT config and its tensors (file keys, as in the safetensors file)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    spec: AdapterSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = describe(self.config, self.tensors)

    @property
    def method(self) -> str:
        return self.spec.method

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors grouped by adapted module path (``model.layers.0.self_attn.q_proj``) and parameter name."""
        return group_by_module(self.spec.method, self.tensors)

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def method_of(config: dict[str, Any]) -> str:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise InvalidArtifact(f"{CONFIG_NAME} has no peft_type")
    method = PEFT_TYPES.get(peft_type.upper())
    if method is None:
        known = ", ".join(sorted(PEFT_TYPES))
        raise InvalidArtifact(f"unknown adapter method {peft_type!r} (known: {known})")
    return method


def split_key(method: str, key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.<param>`` → (module, param), or None for a key outside the method's params."""
    name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    for param in MODULE_PARAMS.get(method, ()):
        if name.endswith("." + param):
            return name[: -len(param) - 1], param
    return None


def group_by_module(method: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = split_key(method, key)
        if parts is not None:
            grouped.setdefault(parts[0], {})[parts[1]] = tensor
    return grouped


def describe(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterSpec:
    """Normalize a PEFT config plus its tensors into an AdapterSpec (validation is ``validate``'s job)."""
    method = method_of(config)
    modules = group_by_module(method, tensors)
    targets = tuple(sorted({path.rsplit(".", 1)[-1] for path in modules}))
    rank: int | None = None
    alpha: float | None = None
    if method in ("lora", "adalora", "loha", "lokr"):
        if method == "adalora":
            ranks = [adalora_rank(config, path) for path in modules] or [config.get("init_r", config.get("r"))]
        else:
            ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
        ranks = [int(r) for r in ranks if isinstance(r, (int, float)) and not isinstance(r, bool)]
        rank = max(ranks) if ranks else None
        alpha_value = config.get("lora_alpha", config.get("alpha"))
        alpha = float(alpha_value) if alpha_value is not None else None
    elif method in ("oft", "boft"):
        rank = config.get("r") or config.get("boft_block_size") or None
    elif method == "bottleneck":
        rank = config.get("bottleneck_size")
    option_keys = ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                   "num_virtual_tokens", "placement", "feedforward_modules", "modules_to_save")
    options = {key: config[key] for key in option_keys if config.get(key) not in (None, {}, [], False)}
    return AdapterSpec(method=method, rank=rank, alpha=alpha, targets=targets,
                       base_model=config.get("base_model_name_or_path"), options=options)


def validate(adapter: Adapter) -> None:
    """Refuse adapters whose tensors contradict their config or hold non-finite values."""
    method = adapter.method
    for key, tensor in adapter.tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise InvalidArtifact(f"tensor {key} contains NaN or infinite values")
    if method in COMPOSITION_METHODS:
        validate_composition(method, adapter.config, adapter.tensors)
        return
    if not adapter.tensors:
        raise InvalidArtifact(f"{WEIGHTS_NAME} holds no tensors")
    if method in PROMPT_METHODS:
        _validate_prompt(adapter)
        return
    modules = adapter.modules()
    if not modules:
        raise InvalidArtifact(f"no {method} tensors found in {WEIGHTS_NAME} (keys like {next(iter(adapter.tensors))})")
    if method == "lora":
        _validate_lora(adapter.config, modules)
    elif method == "adalora":
        _validate_adalora(adapter.config, modules)
    elif method in ("loha", "lokr"):
        _validate_lycoris(adapter.config, modules)
    elif method == "bottleneck":
        _validate_bottleneck(adapter.config, modules)
    elif method == "bitfit":
        for path, params in modules.items():
            if params["bias"].dim() != 1:
                raise InvalidArtifact(f"module {path}: bitfit bias has shape {tuple(params['bias'].shape)}, not 1-D")


def _validate_lora(config: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]]) -> None:
    for path, params in modules.items():
        a = params.get("lora_A.weight", params.get("lora_embedding_A"))
        b = params.get("lora_B.weight", params.get("lora_embedding_B"))
        if a is None or b is None:
            raise InvalidArtifact(f"module {path} has only one of lora_A / lora_B")
        rank = pattern_value(config.get("rank_pattern"), path, config.get("r"))
        is_embedding = "lora_embedding_A" in params
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidArtifact(f"module {path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
        a_rank = a.shape[0]
        if rank is not None and a_rank != rank:
            kind = "embedding" if is_embedding else "linear"
            raise InvalidArtifact(f"module {path} ({kind}): tensors have rank {a_rank} but the config says r={rank}")


def adalora_rank(config: dict[str, Any], path: str) -> int | None:
    """An AdaLoRA module's rank: ``init_r``, or once the budget is allocated, how many singular values its
    ``rank_pattern`` mask keeps (PEFT saves the tensors cut to that many)."""
    mask = (config.get("rank_pattern") or {}).get(f"{path}.lora_E")
    if isinstance(mask, list):
        return sum(1 for keep in mask if keep)
    return config.get("init_r", config.get("r"))


def _validate_adalora(config: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]]) -> None:
    for path, params in modules.items():
        missing = sorted({"lora_A", "lora_B", "lora_E"} - set(params))
        if missing:
            raise InvalidArtifact(f"module {path} lacks adalora tensors {', '.join(missing)}")
        a, b, e = params["lora_A"], params["lora_B"], params["lora_E"]
        if a.dim() != 2 or b.dim() != 2 or not a.shape[0] == b.shape[1] == e.shape[0]:
            raise InvalidArtifact(f"module {path}: lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)} and lora_B "
                                  f"{tuple(b.shape)} do not chain")
        rank = adalora_rank(config, path)
        if rank is not None and a.shape[0] != rank:
            raise InvalidArtifact(f"module {path}: tensors have rank {a.shape[0]} but the config says {rank}")


# LoHa and LoKr factors whose first dimension is the rank, whatever the layer kind (linear or conv, effective or not).
LYCORIS_RANK_FIRST = ("hada_w1_b", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1_b", "lokr_w2_b", "lokr_t2")


def _validate_lycoris(config: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]]) -> None:
    for path, params in modules.items():
        rank = pattern_value(config.get("rank_pattern"), path, config.get("r"))
        for name in LYCORIS_RANK_FIRST:
            tensor = params.get(name)
            if tensor is not None and rank is not None and (tensor.dim() < 2 or tensor.shape[0] != rank):
                raise InvalidArtifact(
                    f"module {path}: {name} has shape {tuple(tensor.shape)}, not rank {rank} as the config says"
                )


BOTTLENECK_PLACEMENTS = ("houlsby", "pfeiffer")
BOTTLENECK_NON_LINEARITIES = ("relu", "gelu", "silu")


def _validate_bottleneck(config: dict[str, Any], modules: dict[str, dict[str, torch.Tensor]]) -> None:
    """The hub's BOTTLENECK format (docs/formats.md): four tensors per site that chain, sized as the config says."""
    for key, known in (("placement", BOTTLENECK_PLACEMENTS), ("non_linearity", BOTTLENECK_NON_LINEARITIES)):
        if config.get(key) not in known:
            raise InvalidArtifact(f"bottleneck {key} must be one of {', '.join(known)}, not {config.get(key)!r}")
    size = config.get("bottleneck_size")
    for path, params in modules.items():
        missing = sorted(set(MODULE_PARAMS["bottleneck"]) - set(params))
        if missing:
            raise InvalidArtifact(f"module {path} lacks bottleneck tensors {', '.join(missing)}")
        down, up = params["adapter_down.weight"], params["adapter_up.weight"]
        if down.dim() != 2 or up.dim() != 2 or tuple(up.shape) != (down.shape[1], down.shape[0]):
            raise InvalidArtifact(
                f"module {path}: adapter_down {tuple(down.shape)} and adapter_up {tuple(up.shape)} do not chain"
            )
        if params["adapter_down.bias"].shape != down.shape[:1] or params["adapter_up.bias"].shape != up.shape[:1]:
            raise InvalidArtifact(f"module {path}: bottleneck biases do not match their weights")
        if size is not None and down.shape[0] != size:
            raise InvalidArtifact(f"module {path}: bottleneck size {down.shape[0]} but the config says {size}")


def _validate_prompt(adapter: Adapter) -> None:
    embeddings = adapter.tensors.get("prompt_embeddings")
    if embeddings is None:
        raise InvalidArtifact(f"{adapter.method} adapter has no prompt_embeddings tensor")
    tokens = adapter.config.get("num_virtual_tokens")
    submodules = adapter.config.get("num_transformer_submodules") or 1
    if tokens is not None and embeddings.shape[0] not in (tokens, tokens * submodules):
        raise InvalidArtifact(
            f"prompt_embeddings has {embeddings.shape[0]} rows but num_virtual_tokens={tokens}"
        )


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
    from safetensors.torch import load_file  # torch loads only when tensors are read (fast registry commands)

    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidArtifact(f"{weights} is not a readable safetensors file ({exc})") from None
    adapter = Adapter(config=config, tensors=tensors)
    validate(adapter)
    return adapter


def read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise InvalidArtifact(f"{path.parent} has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArtifact(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise InvalidArtifact(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise InvalidArtifact(f"{path} must hold a JSON object")
    method_of(config)
    return config


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
