"""LoRA as PEFT saves it: plain, rsLoRA, DoRA, per-module rank/alpha patterns, lora_bias, embedding LoRA.

Per adapted module (PEFT 0.21.2, tuners/lora/layer.py): ``Δ(x) = s · (B (A x) + b)`` with ``s = α / r`` (rsLoRA:
``α / √r``), α and r from ``alpha_pattern`` / ``rank_pattern`` when a key matches the module path. DoRA
(tuners/lora/dora.py) adds, on the base output without its bias, ``(m / ‖W + s·B A‖_row − 1) · W x`` and scales the
LoRA term by ``m / ‖W + s·B A‖_row``; the norm is treated as a constant (detached), as in the paper §4.3 and PEFT.
On a bitsandbytes base W is read with bitsandbytes' own dequantization.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter, pattern_value
from hub.formats.peft import KEY_PREFIX
from hub.methods._fresh import base_config, kaiming_uniform
from hub.methods._site import SiteMethod
from hub.methods.base import PEFT_DEFAULT_ALPHA, Need, Term, linear_need, refuse_sum
from hub.methods.config import Bool, Either, Int, Number, Pattern, Text
from hub.methods.loftq import LoftQConfig
from hub.methods.loftq import initialise as loftq_initialise
from hub.sites import (
    AdditiveDelta,
    BaseView,
    LowRankDelta,
    Target,
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

# What a fresh adapter adapts unless told otherwise: every attention projection of a Llama-style model, at rank 8.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_RANK = 8

# LoRA config keys that select a variant, with why it is not plain/rs/DoRA LoRA: the runtime cannot attach these
# and sums refuse them. (DoRA attaches, but a sum of DoRA deltas is not a LoRA: see SUMS_REFUSE.)
VARIANTS: dict[str, str] = {
    "alora_invocation_tokens": "aLoRA activates on invocation tokens",
    "arrow_config": "Arrow routes between LoRA experts per token",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA depends on the base weight's singular values",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA samples its factors",
    "use_qalora": "QALoRA pools its inputs by groups",
    "layer_replication": "layer replication changes the model's layers",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron layers",
    "target_parameters": "it targets nn.Parameters rather than modules",
}
SUMS_REFUSE = {**VARIANTS,
               "use_dora": "DoRA renormalizes by the base weight's norms, so a sum of DoRA deltas is not a LoRA"}
# init_lora_weights values that rewrite the base weights: an unconverted adapter is a delta from that other base.
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


def scaling(config: Mapping[str, Any], path: str, rank: int) -> float:
    """PEFT's scaling of a module of ``rank``: α / r (rsLoRA: α / √r), α and r per module through the patterns."""
    alpha = float(pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", PEFT_DEFAULT_ALPHA)))
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
    if config.get("bias") not in (None, "none"):
        raise Incompatible(f"LoRA adapter has bias={config['bias']!r}: it trains the base's biases, which the hub"
                           " runtime does not run")
    for target in resolve_targets(model, adapter, refuse=VARIANTS):
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


def new_adapter(
    model: nn.Module,
    *,
    rank: int | None = None,
    alpha: float = 16.0,
    targets: Sequence[str] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    init_lora_weights: bool | str = True,
    loftq_config: Mapping[str, Any] | None = None,
) -> Adapter:
    """A fresh LoRA (rsLoRA, DoRA) for ``model``, initialized as PEFT does: A Kaiming-uniform and B zero at linear
    layers, A zero and B standard normal at embeddings, so it starts as a no-op; DoRA's magnitude is the row norm of
    the base weight (read through bitsandbytes' own dequantization on a quantized base).

    ``init_lora_weights="loftq"`` (with PEFT's ``loftq_config``, ``{"loftq_bits": 4, "loftq_iter": 1}`` by
    default) initializes A and B by LoftQ instead (``hub.methods.loftq``, Li et al. 2023) on an nf4 (4 bits) or
    int8 (8 bits) base: it rewrites the targeted base layers in place and writes the derived base they now hold;
    the adapter's config names that folder (``base_model_name_or_path``) and says ``init_lora_weights: true``,
    as PEFT's LoftQ example saves it, so loading it does not run LoftQ again.

    ``rank`` None: ``DEFAULT_RANK``, lowered (``rank_pattern``) at modules too small to hold it; an explicit rank
    a module cannot hold (above min(in, out)) is refused. ``targets`` None: those of ``DEFAULT_TARGETS`` the model
    has. Raises InvalidArtifact, Incompatible.
    """
    loftq = check_init(init_lora_weights, loftq_config)
    if loftq is not None and use_dora:
        raise Incompatible("init_lora_weights='loftq' does not apply to DoRA (use_dora)")
    explicit = rank is not None
    rank = DEFAULT_RANK if rank is None else rank
    if rank < 1:
        raise InvalidArtifact(f"LoRA rank must be at least 1, not {rank}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d = False
    chosen = target_modules(model, targets or DEFAULT_TARGETS, method="LoRA", all_required=targets is not None)
    for path, module in chosen.items():
        prefix = f"{KEY_PREFIX}{path}"
        if isinstance(module, nn.Embedding):
            if use_dora:
                raise Incompatible(f"DoRA on the embedding {path} is not supported by the hub runtime")
            if loftq is not None:
                raise Incompatible(f"init_lora_weights='loftq' applies to linear layers, not the embedding {path}")
            tensors[f"{prefix}.lora_embedding_A"] = torch.zeros(rank, module.num_embeddings)
            tensors[f"{prefix}.lora_embedding_B"] = torch.randn(module.embedding_dim, rank, generator=generator)
            continue
        dims = linear_dims(module)
        if dims is None:
            raise Incompatible(f"LoRA target {path} is a {type(module).__name__}, not a linear layer or embedding")
        in_features, out_features = dims
        held = min(rank, in_features, out_features)
        if held < rank:
            if explicit:
                raise Incompatible(f"LoRA rank {rank} does not fit {path} ({out_features}×{in_features}): its update"
                                   f" has rank at most {min(in_features, out_features)}")
            ranks[path] = held
        conv1d = conv1d or isinstance(module, Conv1D)
        tensors[f"{prefix}.lora_A.weight"] = kaiming_uniform(held, in_features, generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(out_features, held)
        if use_dora:
            with torch.no_grad():
                weight = base_weight(module).to(device="cpu", dtype=torch.float32)
                tensors[f"{prefix}.lora_magnitude_vector"] = torch.linalg.norm(weight, dim=1)
    # Lowered modules keep the scaling alpha / r of the others (alpha_pattern), as if the missing ranks were zero.
    pattern = {re.escape(path): r for path, r in sorted(ranks.items())}
    alphas = {key: alpha * r / rank if not use_rslora else alpha * math.sqrt(r / rank) for key, r in pattern.items()}
    config = base_config(
        model, "LORA", r=rank, lora_alpha=alpha, target_modules=sorted({p.rsplit(".", 1)[-1] for p in chosen}),
        lora_dropout=dropout, bias="none", use_rslora=use_rslora, use_dora=use_dora, fan_in_fan_out=conv1d,
        init_lora_weights=True, rank_pattern=pattern, alpha_pattern=alphas,
    )
    if loftq is not None:
        layers = {}
        for path, module in chosen.items():
            held = tensors[f"{KEY_PREFIX}{path}.lora_A.weight"].shape[0]
            layers[path] = (module, held, scaling(config, path, held))
        fitted, derived = loftq_initialise(model, layers, loftq)
        for path, factors in fitted.items():
            tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = factors.a.cpu()
            tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = factors.b.cpu()
        config["base_model_name_or_path"] = str(derived)
    return Adapter(config=config, tensors=tensors)


def check_init(init_lora_weights: Any, loftq_config: Any) -> LoftQConfig | None:
    """The LoftQ config when ``init_lora_weights`` is ``"loftq"``, None for PEFT's default (True); refuses other
    values, and a ``loftq_config`` without LoftQ, in one line (InvalidArtifact)."""
    if init_lora_weights == "loftq":
        return LoftQConfig.parse(loftq_config)
    if init_lora_weights is not True:
        raise InvalidArtifact(f"init_lora_weights must be true or 'loftq' for a new LoRA, not {init_lora_weights!r}")
    if loftq_config:
        raise InvalidArtifact("loftq_config is given but init_lora_weights is not 'loftq'")
    return None


class Lora(SiteMethod):
    """PEFT's LORA type: plain LoRA, rsLoRA, DoRA, lora_bias, rank/alpha patterns, embeddings (module docstring)."""

    peft_type = "LORA"
    name = "lora"
    params = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
              "lora_embedding_A", "lora_embedding_B")
    fields = {
        "r": Int(1), "lora_alpha": Number(), "lora_dropout": Number(), "use_rslora": Bool(), "use_dora": Bool(),
        "lora_bias": Bool(), "fan_in_fan_out": Bool(), "bias": Text(("none", "all", "lora_only")),
        "init_lora_weights": Either((Bool(), Text())), "rank_pattern": Pattern(Int(1)),
        "alpha_pattern": Pattern(Number()),
    }
    summable = True
    low_rank = True
    mixture_expert = True
    recipes = {"lora": {}, "dora": {"use_dora": True}}
    default_lr = 5e-3
    make = staticmethod(new_adapter)
    notes = "rsLoRA, DoRA, lora_bias, rank/alpha patterns, embeddings; " + ", ".join(sorted(VARIANTS)) + " stored only"

    def check_options(self, options: Mapping[str, Any]) -> None:
        check_init(options.get("init_lora_weights", True), options.get("loftq_config"))

    def label(self, config: Mapping[str, Any]) -> str:
        return "dora" if config.get("use_dora") is True else "lora"

    def variants(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        found = ["rslora"] if config.get("use_rslora") is True else []
        init = config.get("init_lora_weights")
        # PEFT's named initializations ("pissa_niter_16" is PiSSA with 16 subspace iterations): the name only.
        if isinstance(init, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,31}", init.lower()) and init.lower() != "gaussian":
            found.append(init.lower().split("_niter")[0])
        found += [key for key in VARIANTS if config.get(key) not in (None, False, [], {}, "")]
        return tuple(found)

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> int | None:
        ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
        ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
        return max(ranks) if ranks else None

    def alpha(self, config: Mapping[str, Any]) -> float | None:
        alpha = config.get("lora_alpha")
        return alpha if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        modules = self.require_modules(tensors)
        for path, params in modules.items():
            a = params.get("lora_A.weight", params.get("lora_embedding_A"))
            b = params.get("lora_B.weight", params.get("lora_embedding_B"))
            if a is None or b is None:
                raise InvalidArtifact(f"module {path} has only one of lora_A / lora_B")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InvalidArtifact(f"module {path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not"
                                      " chain")
            rank = pattern_value(config.get("rank_pattern"), path, config.get("r"))
            if rank is not None and a.shape[0] != rank:
                kind = "embedding" if "lora_embedding_A" in params else "linear"
                raise InvalidArtifact(f"module {path} ({kind}): tensors have rank {a.shape[0]} but the config says"
                                      f" r={rank}")

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        needs = super().needs(config, shapes)
        for path, params in self.modules(shapes).items():
            if "lora_embedding_A" in params and "lora_embedding_B" in params:
                rows, dim = params["lora_embedding_A"][-1], params["lora_embedding_B"][0]
                needs.append(Need(f"{path}.weight", (rows, dim), "embedding"))
            elif "lora_A.weight" in params and "lora_B.weight" in params:
                needs.append(linear_need(path, params["lora_A.weight"][-1], params["lora_B.weight"][0],
                                         bool(config.get("fan_in_fan_out"))))
        return needs

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, AdditiveDelta]:
        return build(model, adapter)

    def delta_refusal(self, config: Mapping[str, Any]) -> str | None:
        return next((why for key, why in SUMS_REFUSE.items() if config.get(key) not in (None, False, [], {}, "")),
                    None)

    def merge_terms(self, adapter: Adapter, work: torch.dtype) -> dict[str, Term]:
        config = adapter.config
        refuse_sum(config, SUMS_REFUSE)
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            raise Incompatible(
                f"{adapter.method} adapter was initialized with {init!r}, which rewrites the base weights, and was"
                " saved without converting it back (path_initial_model_for_weight_conversion): its delta is not"
                " from the shared base"
            )
        terms = {}
        for path, params in adapter.modules().items():
            params = {name: tensor.to(work) for name, tensor in params.items()}
            embedding = "lora_embedding_A" in params
            a = params["lora_embedding_A" if embedding else "lora_A.weight"]
            b = params["lora_embedding_B" if embedding else "lora_B.weight"]
            scale = scaling(config, path, a.shape[0])
            bias = params.get("lora_B.bias")
            # PEFT scales lora_B's bias along with its output: lora_B(lora_A(x)) * scaling.
            terms[path] = Term(b=b, a=a * scale, bias=None if bias is None else bias * scale, embedding=embedding)
        return terms



METHOD = Lora()
