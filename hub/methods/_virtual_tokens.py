"""Virtual tokens: soft prompts prepended to the input (prompt tuning, P-tuning) and key/value prefixes put in
front of the attention cache (prefix tuning).

One forward pre-hook per model (a ``VirtualTokens`` controller) serves every prompt-style adapter attached to it,
so several compose: their virtual tokens are concatenated in attach order, prefixes first (they live in the
cache), then soft prompts, then the real tokens. Numerics follow PEFT 0.21.2's ``PeftModelForCausalLM``:

* virtual tokens are injected only when the cache is empty (the first forward, or generate()'s prefill); later
  decoding steps find them in the cache;
* the 2-D attention mask gets ones for every virtual token on every step;
* ``labels`` get -100 for the soft-prompt positions (and ``token_type_ids`` zeros);
* ``position_ids`` are dropped when a soft prompt is attached (the model numbers positions from the cache length,
  as PEFT does) and shifted by the prefix length when only prefixes are.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache

from hub.errors import Incompatible, InvalidArtifact, NotFound
from hub.formats import Adapter
from hub.formats.spec import METHOD_TO_PEFT_TYPE
from hub.methods._fresh import base_config
from hub.methods.base import Method, common_dtype, common_value
from hub.methods.config import Int, Text


@dataclass
class _Entry:
    name: str
    method: str
    embeddings: nn.Parameter  # prompt: [T, hidden]; prefix: [T, num_layers * 2 * kv_dim]
    config: dict[str, Any]
    heads: int = 0  # prefix only: key/value heads and their size
    head_dim: int = 0

    @property
    def tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def is_prefix(self) -> bool:
        return self.method == "prefix_tuning"


# One controller per model; weak keys, so a model that is dropped takes its controller with it.
_CONTROLLERS: weakref.WeakKeyDictionary[nn.Module, VirtualTokens] = weakref.WeakKeyDictionary()


class VirtualTokens:
    """The virtual tokens attached to one model, and the forward pre-hook that injects them."""

    def __init__(self, model: nn.Module):
        self.entries: dict[str, _Entry] = {}
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def close(self) -> None:
        self._hook.remove()

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = _as_kwargs(module, args, kwargs)
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        reference = embeds if embeds is not None else input_ids
        if reference is None:
            return (), kwargs
        batch = reference.shape[0]
        prefixes = [e for e in self.entries.values() if e.is_prefix]
        prompts = [e for e in self.entries.values() if not e.is_prefix]
        cache_key = _cache_kwarg(module)
        cache = _pop_cache(kwargs)
        if kwargs.get("use_cache") is False:
            # Without caching, a cache that comes back in is the prefix cache this hook made for the previous call
            # (generate() feeds outputs back): every call starts afresh.
            cache = None
        if cache is not None and not isinstance(cache, Cache):
            raise Incompatible(f"virtual tokens need a transformers Cache, not {type(cache).__name__}")
        first = cache is None or cache.get_seq_length() == 0
        if first and prefixes:
            cache = _fill_cache(cache, prefixes, batch, _dtype(module))
        if cache is not None:
            kwargs[cache_key] = cache
        if first and prompts:
            if embeds is None:
                embeds = module.get_input_embeddings()(input_ids)
            prompt = torch.cat([e.embeddings for e in prompts], dim=0).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat((prompt.expand(batch, -1, -1), embeds), dim=1)
            kwargs["input_ids"] = None
            added = prompt.shape[0]
            if (labels := kwargs.get("labels")) is not None:
                kwargs["labels"] = torch.cat((labels.new_full((batch, added), -100), labels), dim=1)
            if (token_types := kwargs.get("token_type_ids")) is not None:
                kwargs["token_type_ids"] = torch.cat((token_types.new_zeros((batch, added)), token_types), dim=1)
        virtual = sum(e.tokens for e in self.entries.values())
        if (mask := kwargs.get("attention_mask")) is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise Incompatible("virtual tokens need a 2-D attention mask [batch, sequence]")
            kwargs["attention_mask"] = torch.cat((mask.new_ones((mask.shape[0], virtual)), mask), dim=1)
        if (positions := kwargs.get("position_ids")) is not None:
            kwargs["position_ids"] = None if prompts else positions + sum(e.tokens for e in prefixes)
        return (), kwargs


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name positional arguments (``model(ids)``) so the hook can rewrite them like keywords."""
    merged = dict(kwargs)
    if args:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in kinds]
        merged.update(zip(names, args, strict=False))  # forward(*args) beyond them would fail anyway
    return merged


# What a model calls its KV cache argument: ``cache`` since transformers renamed it (``past_key_values`` is then a
# deprecated alias that is silently dropped when both are given, as generate() always passes ``cache``),
# ``past_key_values`` before.
_CACHE_KWARGS = ("cache", "past_key_values")


def _cache_kwarg(module: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _pop_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call brings under either name (``cache`` first), both names removed from ``kwargs``."""
    found = [kwargs.pop(key) for key in _CACHE_KWARGS if key in kwargs]
    return next((c for c in found if c is not None), None)


def _dtype(module: nn.Module) -> torch.dtype:
    return module.get_input_embeddings().weight.dtype


def _fill_cache(cache: Cache | None, prefixes: list[_Entry], batch: int, dtype: torch.dtype) -> Cache:
    """Per layer, the prefixes' keys and values (PEFT's layout: a row is [layer0 K, layer0 V, layer1 K, ...])."""
    per_adapter = []
    for entry in prefixes:
        rows = entry.embeddings.to(dtype).view(entry.tokens, -1, entry.heads, entry.head_dim)
        per_adapter.append(rows.permute(1, 2, 0, 3))  # [layers * 2, heads, T, head_dim]
    stacked = torch.cat(per_adapter, dim=2).unsqueeze(1).expand(-1, batch, -1, -1, -1)
    layers = [(stacked[2 * i], stacked[2 * i + 1]) for i in range(stacked.shape[0] // 2)]
    if cache is None:
        return DynamicCache(layers)
    if not isinstance(cache, DynamicCache):
        raise Incompatible(f"prefix tuning needs a DynamicCache, not {type(cache).__name__}")
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


class VirtualTokenHandle:
    """A prompt, P-tuning or prefix adapter attached to a model (see ``attach_virtual_tokens``)."""

    def __init__(self, model: nn.Module, entry: _Entry):
        self._model = weakref.ref(model)
        self._entry = entry
        self.name = entry.name
        self.method = entry.method
        self.attached = True

    def parameters(self) -> Iterator[nn.Parameter]:
        yield self._entry.embeddings

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self._entry.embeddings]

    def set_weight(self, weight: float) -> None:
        check_weight(self.method, self.name, weight)

    def to_adapter(self) -> Adapter:
        """The adapter as it is now (after training, with the trained virtual tokens)."""
        tensors = {"prompt_embeddings": self._entry.embeddings.detach().cpu().clone()}
        return Adapter(config=dict(self._entry.config), tensors=tensors)

    def detach(self) -> None:
        if not self.attached:
            raise NotFound(f"adapter {self.name!r} is not attached")
        model = self._model()
        controller = _CONTROLLERS.get(model) if model is not None else None
        if controller is not None:
            controller.entries.pop(self.name, None)
            if not controller.entries:
                controller.close()
                del _CONTROLLERS[model]
        self.attached = False


def check_weight(method: str, name: str, weight: float) -> None:
    if weight != 1.0:
        raise Incompatible(
            f"{method} adapter {name!r}: weight must be 1.0, got {weight} (virtual tokens cannot be scaled)"
        )


def text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise Incompatible(f"{type(model).__name__} has no transformers config: virtual tokens need one")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attach_virtual_tokens(
    model: nn.Module, adapter: Adapter, *, method: str, name: str, weight: float
) -> VirtualTokenHandle:
    """Validate ``adapter`` against ``model`` and add its virtual tokens to the model's controller."""
    check_weight(method, name, weight)
    config = text_config(model)
    if getattr(config, "is_encoder_decoder", False) or (adapter.config.get("num_transformer_submodules") or 1) != 1:
        raise Incompatible(f"{method} adapter {name!r}: encoder-decoder models are not supported")
    embeddings = adapter.tensors.get("prompt_embeddings")
    if embeddings is None or embeddings.dim() != 2:
        raise Incompatible(f"{method} adapter {name!r} has no 2-D prompt_embeddings tensor")
    tokens = adapter.config.get("num_virtual_tokens")
    if tokens is not None and embeddings.shape[0] != tokens:
        raise Incompatible(f"{method} adapter {name!r}: {embeddings.shape[0]} virtual tokens, config says {tokens}")
    heads = head_dim = 0
    if method == "prefix_tuning":
        heads, head_dim = _check_prefix(config, adapter.config, embeddings, name)
    else:
        hidden = model.get_input_embeddings().weight.shape[-1]
        if embeddings.shape[1] != hidden:
            raise Incompatible(
                f"{method} adapter {name!r}: prompt_embeddings have dimension {embeddings.shape[1]}, "
                f"the model's input embeddings {hidden}"
            )
    controller = _CONTROLLERS.get(model)
    if controller is not None and name in controller.entries:
        raise Incompatible(f"an adapter named {name!r} is already attached as virtual tokens")
    device = model.get_input_embeddings().weight.device
    parameter = nn.Parameter(embeddings.detach().to(device=device, dtype=torch.float32).clone())
    entry = _Entry(name=name, method=method, embeddings=parameter, config=dict(adapter.config),
                   heads=heads, head_dim=head_dim)
    if controller is None:
        controller = _CONTROLLERS[model] = VirtualTokens(model)
    controller.entries[name] = entry
    return VirtualTokenHandle(model, entry)


def attention_layout(config: Any, what: str) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a model's text config."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        raise Incompatible(f"{what}: cannot read layers/heads/hidden size from the model")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def prompt_config(model: nn.Module, method: str, num_virtual_tokens: int, **fields: Any) -> dict[str, Any]:
    """The config PEFT saves for a fresh prompt-style adapter on ``model`` (decoder-only: one submodule)."""
    if num_virtual_tokens < 1:
        raise InvalidArtifact(f"{method} needs at least one virtual token, not {num_virtual_tokens}")
    config = text_config(model)
    layers, kv_heads, head_dim = attention_layout(config, method)
    if method == "prefix_tuning":
        # PEFT records the key/value layout (grouped-query models have fewer key/value heads than query heads).
        heads, token_dim = kv_heads, kv_heads * head_dim
    else:
        heads, token_dim = config.num_attention_heads, model.get_input_embeddings().weight.shape[-1]
    return base_config(
        model, METHOD_TO_PEFT_TYPE[method], num_virtual_tokens=num_virtual_tokens, token_dim=token_dim,
        num_transformer_submodules=1, num_attention_heads=heads, num_layers=layers, **fields,
    )


def _check_prefix(config: Any, adapter_config: dict[str, Any], embeddings: torch.Tensor, name: str) -> tuple[int, int]:
    """(key/value heads, head size) of the model, after checking the prefix fits its layers and heads."""
    layers, kv_heads, head_dim = attention_layout(config, f"prefix_tuning adapter {name!r}")
    saved_layers = adapter_config.get("num_layers", layers)
    if saved_layers != layers:
        raise Incompatible(f"prefix_tuning adapter {name!r} has {saved_layers} layers, the model {layers}")
    saved_dim = adapter_config.get("token_dim", kv_heads * head_dim)
    saved_heads = adapter_config.get("num_attention_heads", kv_heads)
    if saved_dim != kv_heads * head_dim or saved_heads != kv_heads:
        raise Incompatible(
            f"prefix_tuning adapter {name!r}: key/value dimension {saved_dim} in {saved_heads} heads, the model's is "
            f"{kv_heads * head_dim} in {kv_heads} heads"
        )
    if embeddings.shape[1] != layers * 2 * kv_heads * head_dim:
        raise Incompatible(
            f"prefix_tuning adapter {name!r}: prompt_embeddings have {embeddings.shape[1]} columns, the model needs "
            f"{layers} layers x 2 x {kv_heads * head_dim}"
        )
    return kv_heads, head_dim


class VirtualTokenMethod(Method):
    """Prompt tuning, P-tuning and prefix tuning: one ``prompt_embeddings`` tensor, acting on the input sequence
    (or the attention cache) rather than on modules; attached by this module's hooks, at weight 1 only."""

    attachable = True
    stackable = True
    fields = {"num_virtual_tokens": Int(1), "token_dim": Int(1), "num_transformer_submodules": Int(1),
              "num_attention_heads": Int(1), "num_layers": Int(1), "tokenizer_name_or_path": Text()}

    def targets(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> tuple[str, ...]:
        return ()

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        embeddings = tensors.get("prompt_embeddings")
        if embeddings is None:
            raise InvalidArtifact(f"{self.name} adapter has no prompt_embeddings tensor")
        tokens = config.get("num_virtual_tokens")
        submodules = config.get("num_transformer_submodules") or 1
        if tokens is not None and embeddings.shape[0] not in (tokens, tokens * submodules):
            raise InvalidArtifact(f"prompt_embeddings has {embeddings.shape[0]} rows but num_virtual_tokens={tokens}")

    def attach(self, model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> VirtualTokenHandle:
        return attach_virtual_tokens(model, adapter, method=self.name, name=name, weight=weight)


def sum_prompts(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Σ weights[i] · prompt_embeddings[i] for prompts of one length and width (prompt tuning, P-tuning)."""
    first = adapters[0]
    shape = tuple(first.tensors["prompt_embeddings"].shape)
    for index, adapter in enumerate(adapters[1:], start=1):
        other = tuple(adapter.tensors["prompt_embeddings"].shape)
        if other != shape:
            raise Incompatible(
                f"prompt embeddings of adapter #0 are {shape[0]}×{shape[1]} but #{index}'s are {other[0]}×{other[1]}: "
                "only prompts of the same length and width can be summed; stack them instead"
            )
    common_value(adapters, "task_type")
    dtype = common_dtype(adapters)
    work = torch.promote_types(dtype, torch.float32)
    total = sum(w * adapter.tensors["prompt_embeddings"].to(work) for w, adapter in zip(weights, adapters, strict=True))
    return Adapter(config={**first.config, "inference_mode": True}, tensors={"prompt_embeddings": total.to(dtype)})
