"""DenseLoRA (Mu et al., "DenseLoRA: Dense Low-Rank Adaptation of Large Language Models", ACL 2025,
arXiv 2505.23808), the hub's own format (docs/formats.md): PEFT 0.21.2 has no such type.

One encoder ``E_g`` [r, in] and one decoder ``D_g`` [out, r] are shared by every adapted module of a group ``g``;
each adapted module ``l`` has its own small dense matrix ``M_l`` [r, r]:

    y = W x + s · σ(D_g · M_l · σ(E_g · x)),   s = lora_alpha / r,   σ = GELU (exact, erf form)

The sharing and the activations are the authors' code (github.com/mulin-ahu/DenseLoRA,
``commonsense_reasoning/peft/src/peft/tuners/lora.py``): one encoder/decoder pair per projection type (q, k, v, up,
down), shared by all layers; GELU after the encoder and after the decoder; dropout (``lora_dropout``) on the
input, on the encoded representation and on the output. Here a group is the module's leaf name (``q_proj``), so
every module of a group must have the same (in, out) features: true of every transformer's projections; with
grouped-query attention ``k_proj``/``v_proj`` are narrower than ``q_proj``, which is why the grouping is per
projection type and not one pair for the whole model. A fresh adapter is the identity: ``D_g`` starts at zero
(σ(0) = 0), ``E_g`` and ``M_l`` Kaiming-uniform as nn.Linear initializes them.

Because of the GELUs the update is not a weight update ΔW (not even linear in x): DenseLoRA adapters are attached
and stacked, gated in mixtures, but never merged into base weights nor summed into one adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config, kaiming_uniform
from hub.methods.base import PEFT_DEFAULT_ALPHA, Method, Need, linear_need
from hub.methods.config import Bool, Int, Number
from hub.sites import (
    AdditiveDelta,
    BaseView,
    SiteHandle,
    attach_deltas,
    expect_linear,
    linear_dims,
    parameter,
    require_grad,
    resolve_targets,
    site_device,
    target_modules,
)

NAME = "denselora"
# The authors' targets (their llama*_denselora.sh scripts) and a rank whose scaling is 1 at the recipe's alpha 16.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
DEFAULT_RANK = 16
# The shared tensors' keys: base_model.model.lora_encoder.<group> [r, in], base_model.model.lora_decoder.<group>
# [out, r]. Neither ends in .weight/.bias, so they are never read as modules_to_save copies.
SHARED = ("lora_encoder", "lora_decoder")
_SHARED_KEY = re.compile(rf"^{re.escape(KEY_PREFIX)}({'|'.join(SHARED)})\.([^.]+)$")


def group_of(path: str) -> str:
    """The group whose encoder/decoder a module shares: its leaf name (``model.layers.3.self_attn.q_proj`` →
    ``q_proj``)."""
    return path.rsplit(".", 1)[-1]


def shared_key(kind: str, group: str) -> str:
    return f"{KEY_PREFIX}{kind}.{group}"


def shared_tensors(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The shared tensors (or shapes) by group and kind: ``{"q_proj": {"lora_encoder": E, "lora_decoder": D}}``."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = _SHARED_KEY.match(key)
        if match is not None:
            found.setdefault(match.group(2), {})[match.group(1)] = value
    return found


class SharedPair(nn.Module):
    """One group's encoder E [r, in] and decoder D [out, r], held once and used by every module of the group."""

    def __init__(self, encoder: torch.Tensor, decoder: torch.Tensor):
        super().__init__()
        self.lora_encoder = parameter(encoder)
        self.lora_decoder = parameter(decoder)


class DenseLoraDelta(AdditiveDelta):
    """s · σ(D · M · σ(E x)) at one linear site, E and D from its group's ``SharedPair``."""

    def __init__(self, m: torch.Tensor, shared: SharedPair, scale: float, dropout: float):
        super().__init__()
        self.lora_M = parameter(m)
        self.shared = shared  # a submodule of every delta of the group: model.to() and parameters() see it once
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def file_parameters(self) -> dict[str, nn.Parameter]:
        # Only M is this module's; the shared pair is written once per group by the handle.
        return {"lora_M": self.lora_M}

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.training and self.dropout is not None else x

    def forward(self, x: torch.Tensor, base: BaseView | None = None) -> torch.Tensor:
        # .to() is a no-op on the shared pair's own device, and keeps the gradient when a device map puts layers
        # of one group on different devices.
        encoder = self.shared.lora_encoder.to(x.device)
        decoder = self.shared.lora_decoder.to(x.device)
        hidden = self._drop(F.gelu(F.linear(self._drop(x), encoder)))
        return self._drop(F.gelu(F.linear(F.linear(hidden, self.lora_M), decoder))) * self.scale


@dataclass
class DenseLoraHandle:
    """A DenseLoRA adapter attached to a model: its per-module deltas (``sites``) and its shared pairs.

    ``trainable_parameters()`` lists every tensor once (a shared pair is not repeated per module); ``to_adapter()``
    writes the shared pairs back under their keys and dtypes. There is no ``merge_into_base``: merges are refused.
    """

    sites: SiteHandle
    shared: dict[str, SharedPair]
    dtypes: dict[str, torch.dtype]  # shared key -> the dtype it was read in

    method = NAME

    @property
    def name(self) -> str:
        return self.sites.name

    def parameters(self) -> Iterator[nn.Parameter]:
        for pair in self.shared.values():
            yield from pair.parameters()
        for delta in self.sites.deltas():
            if isinstance(delta, DenseLoraDelta):
                yield delta.lora_M
            else:  # a modules_to_save copy the adapter carries
                yield from delta.parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """This adapter's own tensors, each once, switched to require gradients."""
        return require_grad(self.parameters())

    def to_adapter(self) -> Adapter:
        """The adapter as it is now (after training, with the trained tensors), in its file's keys and dtypes."""
        adapter = self.sites.to_adapter()
        tensors = dict(adapter.tensors)
        for group, pair in self.shared.items():
            for kind in SHARED:
                key = shared_key(kind, group)
                tensors[key] = getattr(pair, kind).detach().to(device="cpu", dtype=self.dtypes[key], copy=True)
        return Adapter(config=adapter.config, tensors=tensors)

    def set_weight(self, weight: float) -> None:
        self.sites.set_weight(weight)

    def detach(self) -> None:
        self.sites.detach()


def scaling(config: Mapping[str, Any]) -> float:
    """s = lora_alpha / r (lora_alpha defaults to PEFT's 8, as for LoRA)."""
    return float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)) / int(config["r"])


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> DenseLoraHandle:
    """Check ``adapter`` against ``model`` and attach it (the model is untouched when a check fails).
    Raises Incompatible (shapes, module kinds), InvalidArtifact (the file contradicts itself)."""
    config = adapter.config
    METHOD.check_config(config)
    METHOD.validate(config, adapter.tensors)
    scale = scaling(config)
    dropout = float(config.get("lora_dropout") or 0.0)
    groups = shared_tensors(adapter.tensors)
    pairs: dict[str, SharedPair] = {}
    deltas: dict[str, DenseLoraDelta] = {}
    for target in resolve_targets(model, adapter):
        in_features, out_features = expect_linear(target, "DenseLoRA")
        group = group_of(target.path)
        encoder, decoder = groups[group]["lora_encoder"], groups[group]["lora_decoder"]
        if (encoder.shape[1], decoder.shape[0]) != (in_features, out_features):
            raise Incompatible(
                f"DenseLoRA group {group} maps {encoder.shape[1]} to {decoder.shape[0]} features, but {target.path} is"
                f" {in_features} to {out_features}"
            )
        device = site_device(target.module)
        if group not in pairs:
            pairs[group] = SharedPair(encoder, decoder).to(device)
        deltas[target.path] = DenseLoraDelta(target.params["lora_M"].to(device), pairs[group], scale, dropout)
    dtypes = {shared_key(kind, group): tensors[kind].dtype for group, tensors in groups.items() for kind in SHARED}
    sites = attach_deltas(model, dict(deltas), adapter=adapter, name=name, weight=weight)
    return DenseLoraHandle(sites=sites, shared=pairs, dtypes=dtypes)


def new_adapter(
    model: nn.Module,
    *,
    rank: int = DEFAULT_RANK,
    alpha: float = 16.0,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> Adapter:
    """A fresh DenseLoRA for ``model``: per group (module leaf name) E [rank, in] Kaiming-uniform and D [out, rank]
    zero; per module M [rank, rank] Kaiming-uniform; so it starts as the base. ``targets`` None: those of
    ``DEFAULT_TARGETS`` the model has. Raises InvalidArtifact (rank < 1), Incompatible (a target that is not a
    linear layer, or a group whose modules differ in shape)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArtifact(f"DenseLoRA rank must be an integer of at least 1, not {rank!r}")
    chosen = target_modules(model, targets or DEFAULT_TARGETS, method="DenseLoRA", all_required=targets is not None)
    dims: dict[str, tuple[str, tuple[int, int]]] = {}
    conv1d = False
    for path, module in chosen.items():
        found = linear_dims(module)
        if found is None:
            raise Incompatible(f"DenseLoRA target {path} is a {type(module).__name__}, not a linear layer")
        first = dims.setdefault(group_of(path), (path, found))
        if first[1] != found:
            raise Incompatible(
                f"DenseLoRA shares one encoder/decoder per module name, but {first[0]} ({first[1][0]}→{first[1][1]})"
                f" and {path} ({found[0]}→{found[1]}) differ in shape"
            )
        conv1d = conv1d or isinstance(module, Conv1D)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for group, (_, (in_features, out_features)) in sorted(dims.items()):
        tensors[shared_key("lora_encoder", group)] = kaiming_uniform(rank, in_features, generator)
        tensors[shared_key("lora_decoder", group)] = torch.zeros(out_features, rank)
    for path in chosen:
        tensors[f"{KEY_PREFIX}{path}.lora_M"] = kaiming_uniform(rank, rank, generator)
    config = base_config(model, "DENSELORA", r=rank, lora_alpha=alpha, lora_dropout=dropout,
                         target_modules=sorted(dims), fan_in_fan_out=conv1d)
    return Adapter(config=config, tensors=tensors)


class DenseLora(Method):
    """The hub's own DENSELORA format (module docstring; docs/formats.md)."""

    peft_type = "DENSELORA"
    name = NAME
    params = ("lora_M",)
    fields = {"r": Int(1), "lora_alpha": Number(), "lora_dropout": Number(), "fan_in_fan_out": Bool()}
    attachable = True
    stackable = True
    mixture_expert = True
    peft_loadable = False
    # Not mergeable nor summable: σ(D M σ(E x)) is no weight update, and a sum of two is not a DenseLoRA.
    not_additive = "DenseLoRA passes inputs through activations (Dec(M·Enc(x))): its update is not an added ΔW"
    recipes = {NAME: {}}
    # bench/bench_train_tasks.py --methods denselora --sweep: 12 steps reach 0.94 exact match on the date task at
    # 2e-2 (0.10 at 5e-2), 24 steps 1.00.
    default_lr = 2e-2
    default_steps = 24
    make = staticmethod(new_adapter)
    notes = ("the hub's own format (PEFT has none); an encoder/decoder shared per module name, a dense r×r matrix per"
             " module; GELUs make its update no ΔW, so it is never merged or summed")

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> int | None:
        r = config.get("r")
        return r if isinstance(r, int) and not isinstance(r, bool) else None

    def alpha(self, config: Mapping[str, Any]) -> float | None:
        alpha = config.get("lora_alpha")
        return alpha if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Every module's M is [r, r]; every module's group has its encoder [r, in] and decoder [out, r]; every
        shared pair serves a module; nothing else but modules_to_save copies. Raises InvalidArtifact."""
        rank = config.get("r")
        if rank is None:
            raise InvalidArtifact("DenseLoRA adapter_config.json has no r (the rank)")
        modules = self.require_modules(tensors)
        groups = shared_tensors(tensors)
        for key in tensors:
            if (self.split_key(key) is None and _SHARED_KEY.match(key) is None
                    and not key.endswith((".weight", ".bias"))):
                raise InvalidArtifact(f"unexpected tensor {key} in a DenseLoRA adapter")
        for group, pair in sorted(groups.items()):
            for kind in SHARED:
                if kind not in pair:
                    raise InvalidArtifact(f"DenseLoRA group {group} lacks its shared tensor {shared_key(kind, group)}")
            encoder, decoder = pair["lora_encoder"], pair["lora_decoder"]
            if encoder.dim() != 2 or encoder.shape[0] != rank:
                raise InvalidArtifact(f"DenseLoRA {shared_key('lora_encoder', group)} has shape"
                                      f" {tuple(encoder.shape)}, not [r={rank}, in]")
            if decoder.dim() != 2 or decoder.shape[1] != rank:
                raise InvalidArtifact(f"DenseLoRA {shared_key('lora_decoder', group)} has shape"
                                      f" {tuple(decoder.shape)}, not [out, r={rank}]")
        for path, params in modules.items():
            shape = tuple(params["lora_M"].shape)
            if shape != (rank, rank):
                raise InvalidArtifact(f"module {path}: lora_M has shape {shape}, not (r, r) = ({rank}, {rank})")
            if group_of(path) not in groups:
                raise InvalidArtifact(f"module {path} has no shared tensors: missing"
                                      f" {shared_key('lora_encoder', group_of(path))} and its decoder")
        unused = sorted(set(groups) - {group_of(path) for path in modules})
        if unused:
            raise InvalidArtifact(f"DenseLoRA group {unused[0]} has shared tensors but adapts no module")

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        needs = super().needs(config, shapes)
        groups = shared_tensors(shapes)
        for path in self.modules(shapes):
            pair = groups.get(group_of(path), {})
            if "lora_encoder" in pair and "lora_decoder" in pair:
                needs.append(linear_need(path, pair["lora_encoder"][-1], pair["lora_decoder"][0],
                                         bool(config.get("fan_in_fan_out"))))
        return needs

    def attach(self, model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> DenseLoraHandle:
        return attach(model, adapter, name=name, weight=weight)


METHOD = DenseLora()
