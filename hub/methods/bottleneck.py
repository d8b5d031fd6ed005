"""Bottleneck adapters (Houlsby / Pfeiffer), the hub's own format (docs/formats.md).

At each site, the output h of a transformer sub-layer (before it joins the residual stream) becomes

    h + w · up(act(down(h)))

with ``down`` [bottleneck_size, hidden] and ``up`` [hidden, bottleneck_size] linear layers (with biases),
``act`` relu/gelu/silu and w the attach weight. ``up`` starts at zero, so a fresh adapter is the identity.
Placement ``houlsby`` puts one after the attention block and one after the feed-forward block of every layer;
``pfeiffer`` only after the feed-forward block. The sites per model family (module paths, so the artifact
records exactly where each adapter sits):

======  =====================================  ==============================
family  after attention                        after feed-forward
======  =====================================  ==============================
Llama   ``…layers.N.self_attn``                ``…layers.N.mlp``
GPT-2   ``…h.N.attn``                          ``…h.N.mlp``
BERT    ``…layer.N.attention.output.dropout``  ``…layer.N.output.dropout``
======  =====================================  ==============================

(BERT adds the residual inside its output blocks, after the dropout, so the adapter sits on the dropout's output.)
A forward hook applies the adapter to the site's output (the first element when the site returns a tuple);
several adapters at one site apply in attach order, each to the previous one's output (a stack).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.methods.base import Method
from hub.methods.config import Int, Modules, Text
from hub.sites import find_module
from hub.sites.hooks import HookHandle, check_weight

NAME = "bottleneck"
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
PLACEMENTS = ("houlsby", "pfeiffer")
# Per family: (after-attention, after-feed-forward) site patterns; group 1 is the layer index.
SITE_PATTERNS: dict[str, tuple[str, str]] = {
    "llama": (r"(?:^|\.)layers\.(\d+)\.self_attn$", r"(?:^|\.)layers\.(\d+)\.mlp$"),
    "gpt2": (r"(?:^|\.)h\.(\d+)\.attn$", r"(?:^|\.)h\.(\d+)\.mlp$"),
    "bert": (r"(?:^|\.)layer\.(\d+)\.attention\.output\.dropout$", r"(?:^|\.)layer\.(\d+)\.output\.dropout$"),
}


class Bottleneck(nn.Module):
    """down → activation → up, added to its input by the site hook."""

    def __init__(self, hidden: int, size: int, non_linearity: str):
        super().__init__()
        self.adapter_down = nn.Linear(hidden, size)
        self.adapter_up = nn.Linear(size, hidden)
        self.act = ACTIVATIONS[non_linearity]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.adapter_down.weight.dtype
        return self.adapter_up(self.act(self.adapter_down(h.to(dtype)))).to(h.dtype)


class BottleneckHandle(HookHandle):
    """A bottleneck adapter attached to a model: a hook after each site adding ``weight · up(act(down(h)))``."""

    method = NAME

    def __init__(self, name: str, config: dict[str, Any], weight: float):
        super().__init__(name, config, weight)
        self.adapters = nn.ModuleDict()  # keyed by site path with dots replaced (ModuleDict keys cannot hold dots)
        self._paths: dict[str, str] = {}

    def _add(self, path: str, site: nn.Module, adapter: Bottleneck) -> None:
        key = path.replace(".", "/")
        self.adapters[key] = adapter
        self._paths[key] = path

        def adapt(_module: nn.Module, _args: tuple, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            delta = adapter(h)
            h = h + (delta if self._weight == 1.0 else self._weight * delta)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        self.hook(site, adapt)

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.adapters.parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def to_adapter(self) -> Adapter:
        """The adapter as it is now (after training, with the trained weights)."""
        tensors = {
            f"base_model.model.{self._paths[key]}.{pname}": p.detach().cpu().clone()
            for key, module in self.adapters.items()
            for pname, p in module.state_dict().items()
        }
        return Adapter(config=dict(self._config), tensors=tensors)


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise Incompatible(f"{type(model).__name__} has no config.hidden_size: cannot size a bottleneck adapter")
    return hidden


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> BottleneckHandle:
    """Hook ``adapter``'s bottleneck layers onto its sites in ``model``."""
    check_weight(name, weight)
    non_linearity = adapter.config.get("non_linearity", "relu")
    if non_linearity not in ACTIVATIONS:
        raise Incompatible(f"bottleneck adapter {name!r}: unknown non_linearity {non_linearity!r}")
    hidden = hidden_size(model)
    plan = []
    for path, params in adapter.modules().items():
        site = find_module(model, path)
        if site is None:
            raise Incompatible(f"bottleneck adapter {name!r}: the model has no module {path}")
        _check_shapes(name, path, params, hidden)
        plan.append((path, site, params))
    device = next(model.parameters()).device
    handle = BottleneckHandle(name, dict(adapter.config), weight)
    for path, site, params in plan:
        down = params["adapter_down.weight"]
        module = Bottleneck(hidden, down.shape[0], non_linearity)
        module.load_state_dict({k: v.detach().float() for k, v in params.items()})
        handle._add(path, site, module.to(device))
    return handle


def _check_shapes(name: str, path: str, params: dict[str, torch.Tensor], hidden: int) -> None:
    missing = [p for p in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
               if p not in params]
    if missing:
        raise Incompatible(f"bottleneck adapter {name!r}: {path} lacks {', '.join(missing)}")
    size = params["adapter_down.weight"].shape[0]
    expected = {"adapter_down.weight": (size, hidden), "adapter_down.bias": (size,),
                "adapter_up.weight": (hidden, size), "adapter_up.bias": (hidden,)}
    for pname, shape in expected.items():
        if tuple(params[pname].shape) != shape:
            raise Incompatible(
                f"bottleneck adapter {name!r}: {path}.{pname} has shape {tuple(params[pname].shape)}, expected "
                f"{shape} for the model's hidden size {hidden}"
            )


def sites(model: nn.Module, *, placement: str, layers: Sequence[int] | None = None) -> list[str]:
    """The module paths a ``placement`` adapter sits on in ``model`` (optionally only in ``layers``)."""
    if placement not in PLACEMENTS:
        raise InvalidArtifact(f"unknown bottleneck placement {placement!r} (known: {', '.join(PLACEMENTS)})")
    paths = [path for path, _ in model.named_modules()]
    for attention, feed_forward in SITE_PATTERNS.values():
        patterns = [feed_forward] if placement == "pfeiffer" else [attention, feed_forward]
        found = [
            (int(m.group(1)), path)
            for path in paths
            for pattern in patterns
            if (m := re.search(pattern, path)) and (layers is None or int(m.group(1)) in layers)
        ]
        if found:
            return [path for _, path in sorted(found)]
    raise Incompatible(
        f"no bottleneck sites found in {type(model).__name__} (known families: {', '.join(SITE_PATTERNS)})"
        + (f" for layers {list(layers)}" if layers is not None else "")
    )


def new_adapter(
    model: nn.Module,
    *,
    placement: str = "pfeiffer",
    bottleneck_size: int = 16,
    non_linearity: str = "relu",
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> Adapter:
    """A fresh bottleneck adapter for ``model``: ``down`` initialized as nn.Linear does, ``up`` zero (identity)."""
    if non_linearity not in ACTIVATIONS:
        raise InvalidArtifact(f"unknown non_linearity {non_linearity!r} (known: {', '.join(ACTIVATIONS)})")
    if bottleneck_size < 1:
        raise InvalidArtifact(f"bottleneck_size must be at least 1, not {bottleneck_size}")
    hidden = hidden_size(model)
    paths = sites(model, placement=placement, layers=layers)
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(hidden)  # nn.Linear's default init range for the down projection
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        prefix = f"base_model.model.{path}"
        down = torch.empty(bottleneck_size, hidden + 1).uniform_(-bound, bound, generator=generator)
        tensors[f"{prefix}.adapter_down.weight"] = down[:, :hidden].contiguous()
        tensors[f"{prefix}.adapter_down.bias"] = down[:, hidden].contiguous()
        tensors[f"{prefix}.adapter_up.weight"] = torch.zeros(hidden, bottleneck_size)
        tensors[f"{prefix}.adapter_up.bias"] = torch.zeros(hidden)
    config = {
        "peft_type": "BOTTLENECK",
        "placement": placement,
        "bottleneck_size": bottleneck_size,
        "non_linearity": non_linearity,
        "target_modules": paths,
        "base_model_name_or_path": getattr(model, "name_or_path", None),
    }
    if layers is not None:
        config["layers_to_transform"] = sorted(set(layers))
    return Adapter(config=config, tensors=tensors)


class BottleneckMethod(Method):
    """The hub's own BOTTLENECK format (docs/formats.md): Houlsby / Pfeiffer adapters hooked after sub-layers."""

    peft_type = "BOTTLENECK"
    name = NAME
    peft_loadable = False
    not_additive = "bottleneck adapters add a nonlinear block, not a weight update"
    params = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    fields = {"placement": Text(PLACEMENTS), "non_linearity": Text(tuple(ACTIVATIONS)), "bottleneck_size": Int(1),
              "target_modules": Modules(regex=False)}
    attachable = True
    stackable = True
    recipes = {"bottleneck": {}}
    default_lr = 2e-3
    make = staticmethod(new_adapter)
    notes = "the hub's own format (PEFT has none)"

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> int | None:
        size = config.get("bottleneck_size")
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Four tensors per site that chain, sized as the config says."""
        for key, known in (("placement", PLACEMENTS), ("non_linearity", tuple(ACTIVATIONS))):
            if config.get(key) not in known:
                raise InvalidArtifact(f"bottleneck {key} must be one of {', '.join(known)}, not {config.get(key)!r}")
        size = config.get("bottleneck_size")
        for path, params in self.require_modules(tensors).items():
            missing = sorted(set(self.params) - set(params))
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

    def attach(self, model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> BottleneckHandle:
        return attach(model, adapter, name=name, weight=weight)


METHOD = BottleneckMethod()
