"""Gated mixtures, X-LoRA style: experts attached once, and a small trained gate that weights them per token and
per decoder layer.

Attached (``Mixture.attach``), the experts are ordinary attached adapters; hooks set their gates through the
model's ``gate_context`` before each decoder layer runs (see ``hub.composition.router`` for the two router designs).
Gates are tensors, so ``Mixture.fit`` trains the gate by backpropagating the task loss through the frozen base
(quantized or not) and the frozen experts; nothing else changes. With ``top_k``, an expert that no token of the
batch selected at a layer is not computed there at all (a decoding step of one sequence runs exactly k experts).

Generation with the KV cache: the layerwise router needs nothing (a token's gates come from its own hidden states).
The two-pass router keeps a second KV cache for its gate pass, paired with the model's and reordered with it
(beam search); strategies that crop the model's cache (assisted decoding) are refused with a clear error.

Limits: experts must adapt modules inside the decoder layers (methods with ``mixture_expert`` in the method
table; stack anything else beside the mixture); one mixture per model at a time, and while its forward runs it
owns the gate context.
"""

from __future__ import annotations

import inspect
import random
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hub.composition.members import Member, check_distinct, common_base, default_hub, load_members, register_composition
from hub.composition.router import RouterConfig, build_gate, gate, gate_tensors, load_gate
from hub.errors import Conflict, Incompatible, InvalidArtifact
from hub.formats import Adapter
from hub.formats.composition import MIXTURE_TYPE
from hub.methods import all_methods
from hub.registry import Metric, Registered

if TYPE_CHECKING:
    from hub.client import Hub
    from hub.data import Example
    from hub.fingerprint import Fingerprint
    from hub.runtime import StackHandle

MIXTURE_ATTR = "hub_mixture"


@dataclass(frozen=True)
class FitResult:
    """The gate's training: one loss per step."""

    losses: list[float]


@dataclass
class Mixture:
    """Experts (LoRA-family adapters of one base) and a gate that weights them per token and layer.

    The gate takes its shape from the model it is first attached to (``layers``: the decoder layers the experts
    adapt; ``hidden_size``) and starts at equal weights; ``fit`` trains it. A member's weight scales that expert's
    output on top of its gate.
    """

    experts: list[Member]
    router: RouterConfig = field(default_factory=RouterConfig)
    layers: list[str] | None = None
    hidden_size: int | None = None
    module: nn.Module | None = field(default=None, repr=False)  # the gate, once bound to a model's shape
    fitted: dict[str, Any] | None = None  # how the gate was trained, for the registered recipe

    def __post_init__(self) -> None:
        check_distinct(self.experts, "mixture")
        common_base(self.experts)
        for expert in self.experts:
            if not expert.adapter.kind.mixture_expert:
                experts = ", ".join(sorted(m.name for m in all_methods() if m.mixture_expert))
                raise Incompatible(
                    f"{expert.label} is a {expert.adapter.method} adapter; mixture experts must be one of "
                    f"{experts} (gated per token at their layers): stack it instead"
                )
        self.router.check(len(self.experts))

    @property
    def base(self) -> Fingerprint | None:
        return common_base(self.experts)

    def router_dict(self) -> dict[str, Any]:
        """The router as the artifact records it: kind, shape (layers, hidden_size) and gate function."""
        if self.layers is None or self.hidden_size is None:
            raise Incompatible("the mixture's gate has no shape yet: attach it to a model (or fit it) first")
        return {"kind": self.router.kind, "routing": self.router.routing, "layers": list(self.layers),
                "hidden_size": self.hidden_size, "temperature": self.router.temperature, "top_k": self.router.top_k,
                "depth": self.router.depth, "width": self.router.width}

    def to_dict(self) -> dict[str, Any]:
        """The mixture's description (experts, router, shape once bound); its gate tensors are in ``to_adapter``."""
        return {"kind": "mixture", "experts": [m.to_dict() for m in self.experts], "router": self.router.to_dict(),
                "layers": self.layers, "hidden_size": self.hidden_size, "fit": self.fitted}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, hub: Hub | None = None) -> Mixture:
        """An untrained mixture from ``to_dict()`` (experts read from ``hub``'s store by digest)."""
        experts = load_members(data["experts"], hub=default_hub(hub))
        return cls(experts, RouterConfig(**data["router"]), layers=data["layers"], hidden_size=data["hidden_size"])

    def to_adapter(self) -> Adapter:
        """The mixture as an artifact (``HUB_MIXTURE``): experts by digest, the router config, the gate tensors."""
        router = self.router_dict()
        if self.module is None:
            self.module = build_gate(router, len(self.experts), seed=self.router.seed)
        config = {"peft_type": MIXTURE_TYPE, "experts": [m.to_dict() for m in self.experts], "router": router}
        return Adapter(config=config, tensors=gate_tensors(self.module))

    @classmethod
    def from_adapter(cls, artifact: Adapter, *, hub: Hub | None = None, base: Fingerprint | None = None,
                     base_name: str | None = None) -> Mixture:
        if artifact.method != "mixture":
            raise Incompatible(f"a {artifact.method} artifact is not a mixture")
        router = artifact.config["router"]
        experts = load_members(artifact.config["experts"], hub=default_hub(hub), base=base, base_name=base_name)
        # Artifacts from before sequence routing existed have no "routing": they route per token.
        config = RouterConfig(kind=router["kind"], routing=router.get("routing", "token"),
                              temperature=router["temperature"], top_k=router["top_k"], depth=router["depth"],
                              width=router["width"])
        module = load_gate(router, len(experts), artifact.tensors)
        return cls(experts, config, layers=list(router["layers"]), hidden_size=router["hidden_size"], module=module)

    # -- on a model ----------------------------------------------------------------------------------------------

    def bind(self, model: nn.Module) -> None:
        """Fix the gate's shape from ``model`` (first time), or check that ``model`` has the shape it was made for."""
        paths = [path for expert in self.experts for path in expert.adapter.modules()]
        layers = decoder_layers(model, paths)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise Incompatible(f"cannot tell the hidden size of a {type(model).__name__} (no config.hidden_size)")
        if self.layers is None:
            self.layers, self.hidden_size = layers, hidden
        elif not set(layers) <= set(self.layers) or hidden != self.hidden_size:
            raise Incompatible(
                f"this mixture's gate was made for {len(self.layers)} layers of width {self.hidden_size}; the experts "
                f"on this {type(model).__name__} need layers {layers[0]}…{layers[-1]} of width {hidden}"
            )
        if self.module is None:
            self.module = build_gate(self.router_dict(), len(self.experts), seed=self.router.seed)

    def attach(self, model: nn.Module, *, name: str = "mixture", allow_structural: bool = False) -> MixtureHandle:
        """Attach the experts to ``model`` and install the gate; ``detach()`` on the handle undoes both.
        ``allow_structural``: accept a base that matches the experts' in shapes only (see ``hub.runtime.attach``).
        """
        from hub.runtime import attach

        if model.__dict__.get(MIXTURE_ATTR) is not None:
            raise Conflict("a mixture is already attached to this model: detach it first")
        self.bind(model)
        experts = attach(model, [m.adapter for m in self.experts], name=[m.label for m in self.experts],
                         weight=[m.weight for m in self.experts], base_fingerprint=self.base,
                         allow_structural=allow_structural)
        try:
            return MixtureHandle(model, self, name, experts)
        except BaseException:
            experts.detach()
            raise

    def fit(
        self,
        model: nn.Module,
        tokenizer: Any,
        examples: Sequence[Example],
        *,
        steps: int = 40,
        lr: float = 1e-2,
        batch_size: int = 8,
        seed: int = 0,
        device: str | torch.device | None = None,
        allow_structural: bool = False,
        progress: bool = True,
    ) -> FitResult:
        """Train only the gate on prompt/completion ``examples`` (loss on completions), with the base and the
        experts frozen: a quantized base stays quantized. Uses the mixture already attached to ``model`` if there
        is one, else attaches it for the duration.

        The gate trains dense (every expert weighted, as X-LoRA's classifier does): a top-1 gate renormalised to 1
        would have no gradient. ``top_k`` applies when the mixture runs. AdamW at ``lr`` with a cosine schedule,
        ``steps`` batches of ``batch_size`` drawn in shuffled passes over the examples.

        A sequence-routed gate (``RouterConfig.routing``) pools each example's prompt tokens, as it does when
        generating.

        From 50 distinct examples per task of the built-in tasks, these defaults fit a sequence-routed gate to
        0.98 of the oracle's exact match (each task answered by its own expert; 0.977 to 1.00 over three seeds), a
        per-token gate to 0.96 (0.953 to 0.977: it hands a few record answers to the other experts);
        ``bench/bench_mixture.py --fit``, tests/test_mixture_smollm2.py.

        ``model``: any causal LM (see ``hub.train.train``); ``device``: move it there first (None: where it is);
        ``allow_structural`` as in ``attach``. Raises InvalidArtifact (no examples, fewer than 1 step or example
        per batch), Conflict (another mixture attached to ``model``)."""
        from tqdm.auto import tqdm

        from hub.data import collate, encode_all
        from hub.runtime import place
        from hub.sites import disable_cpu_repacking

        if not examples:
            raise InvalidArtifact("the training set is empty")
        if steps < 1 or batch_size < 1:
            raise InvalidArtifact(f"steps and batch_size must be at least 1, not {steps} and {batch_size}")
        current = model.__dict__.get(MIXTURE_ATTR)
        if current is not None and current.mixture is not self:
            raise Conflict("another mixture is attached to this model: detach it first")
        encoded, pad = encode_all(model, tokenizer, examples)
        device = place(model, device)
        # bitsandbytes' packed CPU kernel has no autograd: the gate's gradient must pass through the frozen base.
        disable_cpu_repacking(model)
        handle = current or self.attach(model, allow_structural=allow_structural)
        params = list(self.module.parameters())
        for param in params:
            param.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        rng, pending = random.Random(seed), []
        was_training = model.training
        # Eval mode: the frozen experts and base behave exactly as they will at inference (no dropout).
        model.eval()
        handle.dense = True
        losses: list[float] = []
        try:
            bar = tqdm(range(steps), desc="fit mixture gate", unit="step", disable=not progress)
            for _ in bar:
                while len(pending) < batch_size:  # shuffled passes: every example once per pass
                    pending += rng.sample(encoded, len(encoded))
                batch, pending = pending[:batch_size], pending[batch_size:]
                ids, labels, mask = (t.to(device) for t in collate(batch, pad_id=pad))
                handle.prompt_mask = torch.zeros_like(mask)
                for row, item in enumerate(batch):
                    handle.prompt_mask[row, :item.prompt_length] = 1
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finally:
            handle.dense, handle.prompt_mask = False, None
            for param in params:
                param.requires_grad_(False)
            model.train(was_training)
            if current is None:
                handle.detach()
        self.fitted = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                       "examples": len(examples), "final_loss": losses[-1]}
        return FitResult(losses=losses)

    def register(
        self,
        hub: Hub | None = None,
        *,
        name: str,
        base: Fingerprint | Any | None = None,
        metrics: Mapping[str, float] | Iterable[Metric] = (),
        tags: Iterable[str] = (),
        description: str | None = None,
    ) -> Registered:
        """Register the mixture (experts by digest + gate tensors) as a version of ``name`` (method ``mixture``);
        experts given in memory are stored too, the registered ones become its lineage parents."""
        recipe = {**self.to_dict(), "router": self.router.to_dict()}
        return register_composition(hub, self.to_adapter(), self.experts, name=name, strategy="mixture",
                                    params={"router": self.router.kind}, recipe=recipe, store_members=True,
                                    base=base, metrics=metrics, tags=tags, description=description)


def decoder_layers(model: nn.Module, paths: Iterable[str]) -> list[str]:
    """The decoder layers (``model.layers.3``: an item of the outermost ModuleList on the way) that hold ``paths``,
    in layer order. Every path must be inside one, and all in the same stack of layers."""
    from hub.sites import find_module

    found: dict[str, tuple[str, int]] = {}
    for path in paths:
        parts = path.split(".")
        for i in range(1, len(parts)):
            stack = ".".join(parts[:i])
            if parts[i].isdigit() and isinstance(find_module(model, stack), nn.ModuleList):
                found[f"{stack}.{parts[i]}"] = (stack, int(parts[i]))
                break
        else:
            raise Incompatible(
                f"mixture experts must adapt modules inside the decoder layers, but one adapts {path}: attach that "
                "adapter beside the mixture (a stack) instead"
            )
    stacks = sorted({stack for stack, _ in found.values()})
    if len(stacks) > 1:
        raise Incompatible(f"the experts adapt layers of {' and '.join(stacks)}: a mixture routes one stack of layers")
    return sorted(found, key=lambda layer: found[layer][1])


class MixtureHandle:
    """A mixture attached to a model: the experts (a StackHandle) and the hooks that set their gates.

    ``last_gates`` holds, per decoder layer path, the gates [batch, tokens, experts] of the latest forward
    (detached): which expert each token used where.
    """

    method = "mixture"

    def __init__(self, model: nn.Module, mixture: Mixture, name: str, experts: StackHandle):
        from hub.sites import find_module, gate_context

        self.model, self.mixture, self.name, self.experts = model, mixture, name, experts
        self.base_check = experts.base_check  # which base check the experts passed
        self.names = tuple(handle.name for handle in experts.handles)
        self.context = gate_context(model)
        self.last_gates: dict[str, torch.Tensor] = {}
        self.dense = False  # True while fitting: every expert weighted, top_k ignored
        # While fitting: which tokens [B, S] are the prompt (a sequence-routed gate pools those only, as it does
        # at generation, where the prompt runs alone first).
        self.prompt_mask: torch.Tensor | None = None
        # Sequence routing: whether this forward is a prompt's (pooled over ``_pool`` [B, S], None: every token)
        # or a later step's (reusing the prompt's logits per layer).
        self._prefill = False
        self._pool: torch.Tensor | None = None
        self._sequence_logits: dict[int, torch.Tensor] = {}  # sequence routing: the prompt's logits per layer
        self._hooks: list[Any] = []
        self._saved: tuple[Any, Any] | None = None
        self._pending: torch.Tensor | None = None  # two-pass: this forward's logits for every layer
        self._in_gate_pass = False
        # Two-pass: the gate pass's own KV cache, per model cache it runs beside.
        self._caches: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._unpaired: Any = None
        device = next(model.parameters()).device
        mixture.module.to(device)
        stack = mixture.layers[0].rpartition(".")[0]
        decoder = find_module(model, stack.rpartition(".")[0]) if "." in stack else model
        self._decoder = decoder
        self._hooks.append(decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True))
        self._hooks.append(decoder.register_forward_hook(self._after_decoder, with_kwargs=True))
        for index, path in enumerate(mixture.layers):
            layer = find_module(model, path)
            if layer is None:
                self._remove_hooks()
                raise Incompatible(f"the mixture's gate routes layer {path}, which this model does not have")
            self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(index, path), with_kwargs=True))
        model.__dict__[MIXTURE_ATTR] = self

    def parameters(self) -> Iterable[nn.Parameter]:
        """The gate's parameters (the experts and base are not trained by a mixture)."""
        return self.mixture.module.parameters()

    def detach(self) -> None:
        if self.model.__dict__.get(MIXTURE_ATTR) is not self:
            raise Conflict(f"mixture {self.name!r} is not attached")
        self._remove_hooks()
        route = self.context.route
        if route is not None and route.names == self.names:
            self.context.clear()
        self.experts.detach()
        del self.model.__dict__[MIXTURE_ATTR]

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _before_decoder(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._in_gate_pass:
            return
        kwargs = _named(module, args, kwargs)
        # The mixture owns the gate context during its forward; whatever route was set before comes back after.
        self._saved = (self.context.route, self.context.per_site)
        if self.mixture.router.routing == "sequence":
            cache = _input_cache(kwargs)
            if cache is not None and cache.get_seq_length() > 0:
                if not self._sequence_logits:
                    raise Incompatible("a sequence-routed mixture decodes from the gates of its prompt: run the "
                                       "prompt through the model with the mixture attached first")
                self._prefill = False
                return  # every later token keeps the prompt's gates: no gate pass needed
            self._prefill = True
            self._pool = self.prompt_mask if self.prompt_mask is not None else kwargs.get("attention_mask")
            self._sequence_logits = {}
        if self.mixture.router.kind == "two_pass":
            self._pending = self.mixture.module(self._gate_pass(module, kwargs))

    def _after_decoder(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._in_gate_pass:
            return
        if self._unpaired is not None:
            cache = _output_cache(output)
            if cache is not None:
                self._pair(cache, self._unpaired)
            self._unpaired = None
        self._pending = None
        if self._saved is not None:
            self.context.route, self.context.per_site = self._saved
            self._saved = None

    def _layer_hook(self, index: int, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self._in_gate_pass:
                return
            router = self.mixture.router
            hidden = args[0] if args else kwargs["hidden_states"]
            if router.routing == "sequence" and not self._prefill:
                prompt = self._sequence_logits[index]
                if prompt.shape[0] != hidden.shape[0]:
                    raise Incompatible(f"this step decodes {hidden.shape[0]} sequences, but the prompt that set the "
                                       f"sequence-routed gates had {prompt.shape[0]}: run the prompt again")
                logits = prompt.unsqueeze(1).expand(-1, hidden.shape[1], -1)
            elif self._pending is not None:
                logits = self._pending[..., index, :]
            else:
                logits = self.mixture.module(hidden, index)
            if router.routing == "sequence" and self._prefill:
                logits = _pooled(logits, self._pool)
                self._sequence_logits[index] = logits[:, 0].detach()
            weights = gate(logits, temperature=router.temperature, top_k=None if self.dense else router.top_k)
            self.last_gates[path] = weights.detach()
            self.context.set(self.names, weights)

        return hook

    def _gate_pass(self, decoder: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        """X-LoRA's first pass: the decoder with the experts off, for the last hidden state (no gradient)."""
        # A sequence-routed gate needs the pass for the prompt only: no cache to keep in step.
        cache = None if self.mixture.router.routing == "sequence" else self._gate_cache(decoder, kwargs)
        # The model's cache must not reach the gate pass under either name: the decoder would use (and extend) it.
        kwargs = {key: value for key, value in kwargs.items() if key not in CACHE_KWARGS}
        kwargs.update({_cache_kwarg(decoder): cache, "use_cache": cache is not None})
        self._in_gate_pass = True
        try:
            with torch.no_grad(), self.context.routed(self.names, torch.zeros(len(self.names))):
                output = decoder(**kwargs)
        finally:
            self._in_gate_pass = False
        return output[0]

    def _gate_cache(self, decoder: nn.Module, kwargs: dict[str, Any]) -> Any:
        """The gate pass's KV cache, in step with the model's: new when the model's starts, else its partner."""
        from transformers import DynamicCache

        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(getattr(decoder, "config", None), "use_cache", False)
        if not use_cache:
            return None
        main = _input_cache(kwargs)
        if main is None or main.get_seq_length() == 0:
            cache = DynamicCache(config=decoder.config)
            if main is None:
                self._unpaired = cache  # the decoder makes its cache in this forward: pair them afterwards
            else:
                self._pair(main, cache)
            return cache
        cache = self._caches.get(main)
        if cache is None or cache.get_seq_length() != main.get_seq_length():
            raise Incompatible(
                "the two-pass mixture's gate cache is out of step with the model's KV cache (a cache made before "
                "the mixture was attached, or cropped by the decoding strategy): use the layerwise router for that"
            )
        return cache

    def _pair(self, main: Any, cache: Any) -> None:
        """Keep the gate pass's cache beside the model's: found from it on the next step, and reordered with it
        when beam search reorders the model's (generate calls ``reorder_cache`` on the model's cache only)."""
        self._caches[main] = cache
        reorder = main.reorder_cache

        def reorder_both(beam_idx: torch.Tensor) -> None:
            reorder(beam_idx)
            cache.reorder_cache(beam_idx)

        main.reorder_cache = reorder_both


def _named(decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A decoder call's arguments by name (positional ones named from ``decoder.forward``'s signature)."""
    if not args:
        return kwargs
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(decoder.forward).parameters.values() if p.kind in kinds]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _pooled(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token gate logits [B, S, N] replaced by their mean over the tokens ``mask`` [B, >=S] marks (its last S
    columns: the attention mask of a first forward covers exactly its tokens), for every token."""
    if mask is None or mask.dim() != 2:
        pooled = logits.mean(1, keepdim=True)
    else:
        weights = mask[:, -logits.shape[1]:].to(logits.dtype).unsqueeze(-1)
        pooled = (logits * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    return pooled.expand_as(logits)


# What a decoder calls its KV cache: ``cache`` since transformers 5.x renamed it (``past_key_values`` is then a
# deprecated alias, dropped when both are given), ``past_key_values`` before. The same names key its output.
CACHE_KWARGS = ("cache", "past_key_values")


def _cache_kwarg(decoder: nn.Module) -> str:
    """The name ``decoder.forward`` takes its KV cache under (its signature, through transformers' decorators)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _input_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a decoder call was given, under either name (``cache`` first: it wins when both are set)."""
    return next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)


def _output_cache(output: Any) -> Any:
    """The KV cache a decoder returned (None for a tuple output or no cache)."""
    if not isinstance(output, Mapping):
        return None
    return next((output[name] for name in CACHE_KWARGS if output.get(name) is not None), None)
