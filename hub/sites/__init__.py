"""What every method builds on: a model's own module, untouched, plus the adapters' deltas attached to it.

One wrapper per kind of site:

* ``AdaptedLinear`` wraps ``nn.Linear``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` and transformers'
  ``Conv1D`` (GPT-2)::

      y = T_out( base( T_in(x) ) ) + Σ_k g_k · Δ_k(x)

  ``T_in`` / ``T_out`` are the multiplicative methods (IA3, OFT, BOFT); they act on the frozen base only, as if
  they rescaled or rotated its weight. ``Δ_k`` are the additive ones (LoRA, AdaLoRA, DoRA, LoHa, LoKr); every
  one reads the unmodified input ``x``. A gated transform is ``x + g·(T(x) − x)``: exact for g ∈ {0, 1}, an
  interpolation between (IA3: the scale ``1 + g·(l − 1)``).
* ``AdaptedEmbedding`` wraps ``nn.Embedding``: ``y = base(ids) + Σ_k g_k · Δ_k(ids)``.

Gates. Every delta has a static weight (``attach(weight=...)``, ``SiteHandle.set_weight``). On top of that, a
``GateContext`` shared by every site of a model (``gate_context(model)``, stored as ``model.hub_gates``) routes
adapters per forward: ``ctx.set(names, weights)`` with ``weights`` of shape

* ``[N]``: one weight per adapter (a runtime weighted sum / stack);
* ``[B, N]``: one weight per batch row (a mixed batch is one-hot rows: ``ctx.rows(["a", "b", None, ...])``);
* ``[B, S, N]``: one weight per token (a mixture: the router sets them before each forward);

and ``per_site={module_path: tensor}`` overrides them for single sites (layer-wise mixtures). A routed adapter's
gate is ``static weight × routed weight``; attached adapters that are not among ``names`` keep their static
weight, unless the route is ``exclusive`` (``rows()`` is: each row runs its adapter alone); an adapter whose routed
weight is zero everywhere is skipped (top-k mixtures cost only the experts they use). Rows of the gate are repeated
to the batch when generation expands it (beam search). Gates are tensors, so a router trained through them gets
gradients. The context is per model and not thread-safe: one routed forward at a time.

Sites are found by the module paths in the adapter file; a site (or any other wrapper that keeps the module it
wraps as ``base_layer``) is walked through transparently, so adapters keep addressing modules by their original
names whatever is attached around them.

Low-rank deltas (LoRA, AdaLoRA) are computed together: one adapter directly; several with static or per-token
gates as one matmul pair over their concatenated factors; one-hot rows with a batched matmul over the factors
gathered per row. No Python loop over adapters per layer on those paths.
"""

from hub.sites.adapted import (
    AdaptedEmbedding,
    AdaptedLinear,
    AdaptedSite,
    find_module,
    own_modules,
    sites,
    unwrap,
)
from hub.sites.deltas import (
    AdditiveDelta,
    BaseView,
    Delta,
    InputTransform,
    LowRankDelta,
    OutputTransform,
    needs_live,
    version_key,
)
from hub.sites.gates import GateContext, Route, gate_context
from hub.sites.handle import FileLayout, SiteHandle, attach_deltas, require_grad
from hub.sites.quant import (
    base_bias,
    base_weight,
    disable_cpu_repacking,
    is_bnb_4bit,
    is_bnb_8bit,
    is_quantized,
    linear_dims,
    quantization_of,
)
from hub.sites.targets import (
    Target,
    expect_linear,
    expect_shape,
    parameter,
    peft_targets,
    resolve_targets,
    site_device,
    target_modules,
)

__all__ = [
    "AdaptedEmbedding", "AdaptedLinear", "AdaptedSite", "AdditiveDelta", "BaseView", "Delta", "FileLayout",
    "GateContext", "InputTransform", "LowRankDelta", "OutputTransform", "Route", "SiteHandle", "Target",
    "attach_deltas", "base_bias", "base_weight", "disable_cpu_repacking", "expect_linear", "expect_shape",
    "find_module", "gate_context", "is_bnb_4bit", "is_bnb_8bit", "is_quantized", "linear_dims", "own_modules",
    "parameter", "peft_targets", "quantization_of", "require_grad", "resolve_targets", "site_device", "sites",
    "target_modules",
    "needs_live", "unwrap", "version_key",
]
