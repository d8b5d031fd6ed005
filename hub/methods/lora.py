"""LoRA as PEFT saves it: plain, rsLoRA, DoRA, per-module rank/alpha patterns, lora_bias, embedding LoRA.

Per adapted module (PEFT 0.21.2, tuners/lora/layer.py): ``Δ(x) = s · (B (A x) + b)`` with ``s = α / r`` (rsLoRA:
``α / √r``), α and r from ``alpha_pattern`` / ``rank_pattern`` when a key matches the module path. DoRA
(tuners/lora/dora.py) adds, on the base output without its bias, ``(m / ‖W + s·B A‖_row − 1) · W x`` and scales the
LoRA term by ``m / ‖W + s·B A‖_row``; the norm is treated as a constant (detached), as in the paper §4.3 and PEFT.
On a bitsandbytes base W is read with bitsandbytes' own dequantization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter, pattern_value
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config, kaiming_uniform
from hub.runtime.layers import (
    AdditiveDelta,
    BaseView,
    LowRankDelta,
    SiteHandle,
    Target,
    attach_deltas,
    base_weight,
    expect_linear,
    expect_shape,
    linear_dims,
    parameter,
    resolve_targets,
    site_device,
    target_modules,
    version_key,
)

# What a fresh adapter adapts unless told otherwise: every attention projection of a Llama-style model.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# LoRA config keys selecting variants whose forward is not plain/rs/DoRA LoRA, and inits that rewrite the base
# weights (the adapter then only works on the residual base it was trained with).
REFUSED: dict[str, str] = {
    "alora_invocation_tokens": "aLoRA activates on invocation tokens",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_qalora": "QALoRA pools the input",
    "layer_replication": "layer replication changes the model's layers",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron layers",
}
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoraDelta(LowRankDelta):
    """Plain LoRA (and rsLoRA: only the scaling differs): s · (B (A x) + b)."""

    file_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_bias": "lora_B.bias"}

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, bias: torch.Tensor | None, dropout: float):
        super().__init__()
        self.lora_A = parameter(a)
        self.lora_B = parameter(b)
        self.lora_bias = None if bias is None else parameter(bias)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bias = None if self.lora_bias is None else self.lora_bias * self.scale
        return self.lora_A, self.lora_B * self.scale, bias

    def forward(self, x: torch.Tensor, base: BaseView | None = None) -> torch.Tensor:
        if self.dropout_active:
            x = self.dropout(x)
        # The same operations in the same order as PEFT (scale after B), so rounding matches it too.
        return F.linear(F.linear(x, self.lora_A), self.lora_B, self.lora_bias) * self.scale


class DoraDelta(AdditiveDelta):
    """DoRA at a linear site (see the module docstring)."""

    reads_base = True
    file_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout: float):
        super().__init__()
        self.lora_A = parameter(a)
        self.lora_B = parameter(b)
        self.lora_magnitude_vector = parameter(magnitude)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._norm: tuple[Any, torch.Tensor] | None = None

    def weight_norm(self, base: BaseView) -> torch.Tensor:
        """‖W + s·B A‖ per output row, detached; recomputed only when A, B or the base weight change."""
        layer_weight = base.layer.weight
        key = (version_key([self.lora_A, self.lora_B, layer_weight]), id(getattr(layer_weight, "quant_state", None)))
        if self._norm is None or self._norm[0] != key:
            with torch.no_grad():
                weight = base.weight().to(self.lora_A.dtype)
                self._norm = (key, torch.linalg.norm(weight + self.scale * (self.lora_B @ self.lora_A), dim=1))
        return self._norm[1]

    def forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor:
        factor = self.lora_magnitude_vector / self.weight_norm(base)
        if self.training and self.dropout is not None:
            x = self.dropout(x)
            base_out = F.linear(x, base.weight().to(x.dtype))
        else:
            base_out = base.output_without_bias().to(x.dtype)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return (factor - 1) * base_out + factor * lora * self.scale

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.scale * (self.lora_B @ self.lora_A)
        factor = (self.lora_magnitude_vector / torch.linalg.norm(weight + delta, dim=1))[:, None]
        return (factor - 1) * weight + factor * delta


class LoraEmbeddingDelta(AdditiveDelta):
    """LoRA at an embedding: s · B^T-projected rows of A^T, times the layer's embed_scale when it has one."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.lora_embedding_A = parameter(a)  # [r, num_embeddings]
        self.lora_embedding_B = parameter(b)  # [embedding_dim, r]
        self.scale = scale

    def forward(self, ids: torch.Tensor, base: BaseView) -> torch.Tensor:
        layer = base.layer
        rows = F.embedding(
            ids,
            self.lora_embedding_A.t(),
            padding_idx=layer.padding_idx,
            max_norm=layer.max_norm,
            norm_type=layer.norm_type,
            scale_grad_by_freq=layer.scale_grad_by_freq,
            sparse=layer.sparse,
        )
        out = (rows @ self.lora_embedding_B.t()) * self.scale
        embed_scale = getattr(layer, "embed_scale", None)
        if embed_scale is not None:
            out = out * torch.as_tensor(embed_scale, dtype=out.dtype, device=out.device)
        return out

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scale


def scaling(config: dict[str, Any], path: str, rank: int) -> float:
    alpha = float(pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_rank(config: dict[str, Any], target: Target, a: torch.Tensor, b: torch.Tensor, default_r: Any) -> int:
    """The module's rank, read from the tensors and checked against the config's r / rank_pattern."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise InvalidArtifact(f"module {target.path}: A {tuple(a.shape)} and B {tuple(b.shape)} do not chain")
    rank = int(a.shape[0])
    expected = pattern_value(config.get("rank_pattern"), target.path, default_r)
    if expected is not None and rank != int(expected):
        raise InvalidArtifact(f"module {target.path}: tensors have rank {rank} but the config says r={expected}")
    if rank == 0:
        raise InvalidArtifact(f"module {target.path}: rank 0")
    return rank


def build(model: nn.Module, adapter: Adapter) -> dict[str, AdditiveDelta]:
    """Validate ``adapter`` against ``model`` and build its deltas per module path; the model is not touched."""
    config = adapter.config
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise Incompatible(
            f"LoRA adapter was initialised with init_lora_weights={init!r}, which rewrites the base weights it was"
            " trained on; convert it to a plain LoRA with PEFT (path_initial_model_for_weight_conversion) first"
        )
    use_dora = bool(config.get("use_dora"))
    if use_dora and config.get("lora_bias"):
        raise InvalidArtifact("LoRA adapter sets both use_dora and lora_bias, which PEFT does not allow")
    dropout = float(config.get("lora_dropout") or 0.0)
    deltas: dict[str, AdditiveDelta] = {}
    for target in resolve_targets(model, adapter, refuse=REFUSED):
        params, path = target.params, target.path
        device = site_device(target.module)
        if "lora_embedding_A" in params:
            if not isinstance(target.module, nn.Embedding):
                raise Incompatible(f"embedding LoRA at {path}, but the model has a {type(target.module).__name__}")
            if use_dora:
                raise Incompatible(f"DoRA on the embedding {path} is not supported by the hub runtime")
            a, b = params["lora_embedding_A"], params["lora_embedding_B"]
            rank = check_rank(config, target, a, b, config.get("r"))
            expect_shape(path, "lora_embedding_A", a, (rank, target.module.num_embeddings))
            expect_shape(path, "lora_embedding_B", b, (target.module.embedding_dim, rank))
            deltas[path] = LoraEmbeddingDelta(a.to(device), b.to(device), scaling(config, path, rank))
            continue
        in_features, out_features = expect_linear(target, "LoRA")
        a, b = params.get("lora_A.weight"), params.get("lora_B.weight")
        if a is None or b is None:
            raise InvalidArtifact(f"module {path} has only one of lora_A / lora_B")
        rank = check_rank(config, target, a, b, config.get("r"))
        expect_shape(path, "lora_A", a, (rank, in_features))
        expect_shape(path, "lora_B", b, (out_features, rank))
        scale = scaling(config, path, rank)
        magnitude = params.get("lora_magnitude_vector")
        if use_dora != (magnitude is not None):
            raise InvalidArtifact(
                f"module {path}: use_dora={use_dora} but lora_magnitude_vector is"
                f" {'missing' if use_dora else 'present'}"
            )
        if magnitude is not None:
            expect_shape(path, "lora_magnitude_vector", magnitude, (out_features,))
            deltas[path] = DoraDelta(a.to(device), b.to(device), magnitude.to(device), scale, dropout)
            continue
        bias = params.get("lora_B.bias")
        if bias is not None:
            expect_shape(path, "lora_B.bias", bias, (out_features,))
            bias = bias.to(device)
        deltas[path] = LoraDelta(a.to(device), b.to(device), scale, bias, dropout)
    return deltas


def attach(model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> SiteHandle:
    """Attach a PEFT LoRA adapter to ``model`` (the model's modules are wrapped, never modified)."""
    return attach_deltas(model, build(model, adapter), adapter=adapter, name=name, method="lora", weight=weight)


def new_adapter(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    use_dora: bool = False,
    use_rslora: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
) -> Adapter:
    """A fresh LoRA (rsLoRA, DoRA) for ``model``, initialized as PEFT does: A Kaiming-uniform and B zero at linear
    layers, A zero and B standard normal at embeddings, so it starts as a no-op; DoRA's magnitude is the row norm of
    the base weight (read through bitsandbytes' own dequantization on a quantized base)."""
    if rank < 1:
        raise InvalidArtifact(f"LoRA rank must be at least 1, not {rank}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    conv1d = False
    for path, module in target_modules(model, targets, method="LoRA").items():
        prefix = f"{KEY_PREFIX}{path}"
        if isinstance(module, nn.Embedding):
            if use_dora:
                raise Incompatible(f"DoRA on the embedding {path} is not supported by the hub runtime")
            tensors[f"{prefix}.lora_embedding_A"] = torch.zeros(rank, module.num_embeddings)
            tensors[f"{prefix}.lora_embedding_B"] = torch.randn(module.embedding_dim, rank, generator=generator)
            continue
        dims = linear_dims(module)
        if dims is None:
            raise Incompatible(f"LoRA target {path} is a {type(module).__name__}, not a linear layer or embedding")
        in_features, out_features = dims
        conv1d = conv1d or isinstance(module, Conv1D)
        tensors[f"{prefix}.lora_A.weight"] = kaiming_uniform(rank, in_features, generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(out_features, rank)
        if use_dora:
            with torch.no_grad():
                weight = base_weight(module).to(device="cpu", dtype=torch.float32)
                tensors[f"{prefix}.lora_magnitude_vector"] = torch.linalg.norm(weight, dim=1)
    config = base_config(
        model, "LORA", r=rank, lora_alpha=alpha, target_modules=sorted(set(targets)), lora_dropout=dropout,
        bias="none", use_rslora=use_rslora, use_dora=use_dora, fan_in_fan_out=conv1d, init_lora_weights=True,
    )
    return Adapter(config=config, tensors=tensors)
