"""What a method is to the hub: one ``Method`` object per PEFT type (the table is ``hub.methods.table``).

A method owns everything the hub knows about its adapters:

* reading: its typed config (``fields``, checked by ``hub.methods.config``), the parameter names under an adapted
  module (``params``), validation of the tensors against the config (``validate``), what the registry indexes
  (``label``, ``variants``, ``rank``, ``alpha``), and what the adapter needs of a base (``needs``: shapes);
* running: ``attach`` (build the deltas and put them on a model), ``merge_terms`` (the exact factor pairs of its
  deltas, for weighted sums) or ``weighted_sum`` (for methods that sum their own tensors);
* making: ``new_adapter`` (a fresh adapter initialized as PEFT does) and ``default_lr``/``default_steps``/
  ``default_warmup`` (the training recipe), ``training_loss``/``after_step`` (hooks into the training loop).

A method the hub stores but cannot run (most of PEFT's 45 types) is a ``Method`` with the defaults below: its
adapters are registered, listed, pushed, pulled and exported as they are; ``attach`` says so in one line. Nothing
above this package asks which method it holds: it asks the method. Torch is never imported here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from hub.errors import Incompatible, InvalidArtifact
from hub.methods.config import Kind, check_config

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hub.formats import Adapter

KEY_PREFIX = "base_model.model."
# PEFT's defaults for r and alpha (LoraConfig, LoHaConfig, LoKrConfig) when a config omits them.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8


class Handle(Protocol):
    """One adapter attached to a model. ``detach()`` restores the model exactly as it was before ``attach``."""

    name: str
    method: str

    def detach(self) -> None: ...


@dataclass(frozen=True)
class Need:
    """A shape an adapter needs of its base: the base tensor ``key`` (``model.embed_tokens.weight``) must have
    ``shape``, where a ``None`` dimension is not constrained. ``what`` names it for the error message."""

    key: str
    shape: tuple[int | None, ...]
    what: str = "weight"

    def problem(self, have: Sequence[int]) -> str | None:
        """Why a base tensor of shape ``have`` does not fit, or None."""
        if len(have) == len(self.shape) and all(n is None or n == h for n, h in zip(self.shape, have, strict=True)):
            return None
        if self.what == "embedding" and len(have) == 2 and self.shape[0] is not None and self.shape[0] != have[0]:
            return (f"needs a {self.shape[0]}-row embedding at {self.key.removesuffix('.weight')}, the base has "
                    f"{have[0]}: resized vocabulary?")
        wanted = "×".join("?" if n is None else str(n) for n in self.shape)
        return f"needs {self.key} of shape {wanted}, the base has {'×'.join(map(str, have))}"


def linear_need(path: str, in_features: int, out_features: int, fan_in_fan_out: bool = False) -> Need:
    """A linear module's weight: [out, in], or [in, out] for transformers' Conv1D (PEFT's fan_in_fan_out)."""
    shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    return Need(f"{path}.weight", shape)


def refuse_sum(config: Mapping[str, Any], reasons: Mapping[str, str]) -> None:
    """Refuse a weighted sum of an adapter whose config selects one of ``reasons``' variants."""
    for option, reason in reasons.items():
        if config.get(option) not in (None, False, [], {}, ""):
            raise Incompatible(f"the adapter uses {option} ({reason}): its delta is not B·A·scaling, so it cannot be"
                               " summed; stack it instead")


def only_module_tensors(adapter: Adapter, index: int, *, allow_base_copies: bool = False) -> None:
    """Refuse, in a weighted sum, an adapter carrying tensors that are not its method's deltas: modules_to_save
    copies, trainable tokens and bias="all" biases replace base tensors, and replacements do not add up."""
    for key in adapter.tensors:
        if adapter.kind.split_key(key) is None and not (allow_base_copies and ".base_layer." in key):
            raise Incompatible(
                f"adapter #{index} carries {key}, which is not a {adapter.method} delta (modules_to_save, trainable "
                "tokens or biases replace base weights and cannot be summed); stack it instead"
            )


def common_value(adapters: Sequence[Adapter], key: str) -> Any:
    """The one value the adapters' configs give ``key`` (None when none does). Raises Incompatible."""
    values = {adapter.config.get(key) for adapter in adapters} - {None}
    if len(values) > 1:
        raise Incompatible(f"the adapters disagree on {key} ({', '.join(sorted(map(str, values)))})")
    return values.pop() if values else None


def common_dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    """The floating dtype all the adapters' tensors promote to (float32 when they hold none)."""
    import torch

    dtype = None
    for adapter in adapters:
        for tensor in adapter.tensors.values():
            if tensor.is_floating_point():
                dtype = tensor.dtype if dtype is None else torch.promote_types(dtype, tensor.dtype)
    return dtype or torch.float32


@dataclass
class Term:
    """One module's delta as a factor pair, for weighted sums: ΔW = b @ a with the scaling folded into ``a``
    (b: [out, r], a: [r, in]; at an embedding ΔW is [num_embeddings, dim] transposed), plus a LoRA bias."""

    b: torch.Tensor
    a: torch.Tensor
    bias: torch.Tensor | None
    embedding: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])


class Method:
    """One PEFT type. Subclasses set the class attributes and override what their method can do."""

    peft_type: ClassVar[str]
    name: ClassVar[str]
    params: ClassVar[tuple[str, ...]] = ()
    fields: ClassVar[Mapping[str, Kind]] = {}
    # What the method table documents (docs/methods.md) and what the layers above may ask.
    attachable: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False  # into base weights (merge_into_base / dequantize_merged)
    summable: ClassVar[bool] = False  # weighted sums into one new adapter (hub.composition.merge)
    low_rank: ClassVar[bool] = False  # summed through merge_terms, with any other low-rank method
    stackable: ClassVar[bool] = False
    mixture_expert: ClassVar[bool] = False  # gated per token at linear/embedding sites
    peft_loadable: ClassVar[bool] = True  # False for the hub's own formats (docs/formats.md): PEFT cannot load them
    # Why the update is not an added ΔW (``delta_refusal``), for a method that is not low-rank.
    not_additive: ClassVar[str] = ""
    # Training: recipe names (``hub train --method``) → the new_adapter options each implies, and the default
    # recipe (peak learning rate, optimizer steps, warm-up steps) that teaches SmolLM2-135M-nf4 the built-in date
    # task (bench/bench_train_tasks.py).
    recipes: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    default_lr: ClassVar[float | None] = None
    default_steps: ClassVar[int] = 12
    default_warmup: ClassVar[int] = 2
    notes: ClassVar[str] = ""

    def __init__(self, peft_type: str | None = None, name: str | None = None, notes: str | None = None):
        # Stored-only methods are plain instances named here; the runnable ones are subclasses.
        if peft_type is not None:
            self.peft_type = peft_type
        if name is not None:
            self.name = name
        if notes is not None:
            self.notes = notes

    @property
    def trainable(self) -> bool:
        return bool(self.recipes)

    def __repr__(self) -> str:
        return f"<method {self.name} ({self.peft_type})>"

    # -- reading -----------------------------------------------------------------------------------------------
    def check_config(self, config: Mapping[str, Any]) -> None:
        """Refuse a malformed field (one line, naming it): see ``hub.methods.config``."""
        check_config(config, self.fields)

    def label(self, config: Mapping[str, Any]) -> str:
        """The method name the registry records (LoRA with use_dora is "dora", as ``hub train --method dora``)."""
        return self.name

    def variants(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        """Variants and initializations worth finding an adapter by (rslora, pissa...), beside ``label``."""
        return ()

    def delta_refusal(self, config: Mapping[str, Any]) -> str | None:
        """Why this adapter has no added ΔW (``merge_terms``) for ``hub diff`` and the vLLM export to read, or None
        when it has one."""
        if self.low_rank:
            return None
        return self.not_additive or f"the hub computes no weight update for {self.name} adapters"

    def kronecker_factors(self, adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Modules whose ΔW = scale · W₁ ⊗ W₂, as (W₁, W₂, scale) in float64 (``hub diff`` compares those in
        O(size of the factors)); {} for a method whose updates are not Kronecker products."""
        return {}

    def split_key(self, key: str) -> tuple[str, str] | None:
        """``base_model.model.<module>.<param>`` → (module, param), or None for a key outside the method's params."""
        name = key.removeprefix(KEY_PREFIX)
        for param in self.params:
            if name.endswith("." + param):
                return name[: -len(param) - 1], param
        return None

    def modules(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors grouped by adapted module path and parameter name (keys outside ``params`` are left out)."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            parts = self.split_key(key)
            if parts is not None:
                grouped.setdefault(parts[0], {})[parts[1]] = tensor
        return grouped

    def saved_modules(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Whole modules the adapter carries (PEFT's modules_to_save: "<module>.weight"/".bias" replacing the
        model's), by module path; copies of an adapted embedding's base layer are not among them."""
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if self.split_key(key) is not None or ".base_layer." in key:
                continue
            name = key.removeprefix(KEY_PREFIX).replace(".modules_to_save.", ".")
            path, _, param = name.rpartition(".")
            if path and param in ("weight", "bias"):
                saved.setdefault(path, {})[param] = tensor
        return saved

    def require_modules(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """``modules(tensors)``, refusing a file without any of the method's tensors."""
        if not tensors:
            raise InvalidArtifact("adapter_model.safetensors holds no tensors")
        modules = self.modules(tensors)
        if not modules:
            raise InvalidArtifact(f"no {self.name} tensors found in adapter_model.safetensors (keys like"
                                  f" {next(iter(tensors))})")
        return modules

    def rank(self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, torch.Tensor]]) -> int | None:
        return None

    def alpha(self, config: Mapping[str, Any]) -> float | None:
        return None

    def targets(self, config: Mapping[str, Any], modules: Mapping[str, Any]) -> tuple[str, ...]:
        """Leaf names of the adapted modules: from the tensors, else (a method whose keys the hub does not parse)
        from the config's list."""
        if modules:
            return tuple(sorted({path.rsplit(".", 1)[-1] for path in modules}))
        listed = config.get("target_modules")
        return tuple(sorted({str(t) for t in listed})) if isinstance(listed, list) else ()

    def validate(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse tensors that contradict the config. A stored-only method checks nothing it cannot read."""
        if not tensors:
            raise InvalidArtifact("adapter_model.safetensors holds no tensors")

    def needs(self, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Need]:
        """The base shapes an adapter with tensors of ``shapes`` (by file key) needs: its modules_to_save copies and
        saved base layers exactly (they replace the model's); methods add their modules' sizes."""
        needs = []
        for key, shape in shapes.items():
            name = key.removeprefix(KEY_PREFIX)
            if ".base_layer." in name:
                base_key = name.replace(".base_layer.", ".")
            elif self.split_key(key) is None and name.rpartition(".")[2] in ("weight", "bias"):
                base_key = name.replace(".modules_to_save.", ".")
            else:
                continue
            embedding = len(shape) == 2 and "embed" in base_key
            needs.append(Need(base_key, tuple(shape), "embedding" if embedding else "weight"))
        return needs

    # -- running -----------------------------------------------------------------------------------------------
    def cannot(self, what: str) -> Incompatible:
        return Incompatible(f"{self.name} adapters are stored and shared here but cannot be {what} yet")

    def attach(self, model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> Handle:
        raise self.cannot("attached")

    def merge_terms(self, adapter: Adapter, work: torch.dtype) -> dict[str, Term]:
        """Every module's delta as an exact factor pair (the low-rank methods), for ``hub.composition.merge``."""
        raise Incompatible(f"{self.name} adapters have no low-rank form to sum")

    def weighted_sum(self, adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
        """Σ weights[i] · adapters[i] as one adapter of this method (methods whose tensors add up directly)."""
        raise Incompatible(f"{self.name} adapters have no weighted sum")

    # -- making ------------------------------------------------------------------------------------------------
    # The method module's ``new_adapter(model, *, ...)`` (as ``staticmethod``): a fresh adapter as PEFT makes it.
    make: ClassVar[Callable[..., Adapter] | None] = None

    def new_adapter(self, model: nn.Module, **options: Any) -> Adapter:
        if self.make is None:
            raise InvalidArtifact(f"the hub cannot make new {self.name} adapters")
        return self.make(model, **options)

    def option_names(self) -> list[str]:
        """The keyword options ``new_adapter`` takes (a recipe's ``options`` are checked against them)."""
        return [] if self.make is None else [p for p in inspect.signature(self.make).parameters if p != "model"]

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse a bad ``new_adapter`` option value in one line before any model loads (a recipe calls it)."""

    # Training hooks (``hub.train``), for methods whose training is more than the loss on their tensors (AdaLoRA).
    def training_loss(self, handle: Handle) -> torch.Tensor | None:
        """A term added to each optimizer step's loss (a regularizer on the adapter's tensors), or None."""
        return None

    def after_step(self, handle: Handle, step: int) -> None:
        """Called after optimizer step ``step`` (counted from 1), before the gradients are cleared."""
