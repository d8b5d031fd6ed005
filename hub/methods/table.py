"""The method table: every adapter type the hub knows, keyed by PEFT type (``peft_type`` in adapter_config.json).

* ``RUNNABLE``: the methods the hub can attach (most also merge, sum and train), each one object in its own module
  (``hub.methods.<name>.METHOD``), imported the first time an adapter of that type is read;
* ``STORED``: every other type PEFT 0.21.2 defines. Their adapters are registered, digested, listed, pushed, pulled
  and exported byte for byte; attaching one says it cannot be done yet;
* third-party methods: any installed distribution's entry point in the group ``adapter_hub.methods`` naming a
  ``hub.methods.base.Method`` instance (or class), e.g. ``[project.entry-points."adapter_hub.methods"]
  vera = "my_package.vera:METHOD"``. A plugin adds a type or makes a stored one runnable; it cannot replace one of
  ``RUNNABLE``.

Importing this module costs nothing (no torch): the registry commands use the names only.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from hub.errors import InvalidArtifact
from hub.methods.base import Method

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "adapter_hub.methods"

# PEFT type → the module holding its Method object (``METHOD``). BITFIT, BOTTLENECK and DENSELORA are the hub's own
# formats (docs/formats.md).
RUNNABLE: dict[str, str] = {
    "LORA": "hub.methods.lora",
    "ADALORA": "hub.methods.adalora",
    "LOHA": "hub.methods.loha",
    "LOKR": "hub.methods.lokr",
    "IA3": "hub.methods.ia3",
    "OFT": "hub.methods.oft",
    "BOFT": "hub.methods.boft",
    "LN_TUNING": "hub.methods.ln_tuning",
    "PROMPT_TUNING": "hub.methods.prompt_tuning",
    "P_TUNING": "hub.methods.p_tuning",
    "PREFIX_TUNING": "hub.methods.prefix_tuning",
    "BITFIT": "hub.methods.bitfit",
    "BOTTLENECK": "hub.methods.bottleneck",
    "DENSELORA": "hub.methods.denselora",
}

# The rest of PEFT 0.21.2's types (PEFT_TYPE_TO_CONFIG_MAPPING), with what each is, for docs/methods.md.
STORED: dict[str, str] = {
    "ADAMSS": "adaptive multi-subspace adaptation",
    "ADAPTION_PROMPT": "LLaMA-Adapter: gated prompts in the top layers",
    "BEFT": "bias-only fine-tuning of value projections",
    "C3A": "circular-convolution adapter",
    "CARTRIDGE": "a parameterized prefix KV cache",
    "CPT": "context-aware prompt tuning",
    "DEFT": "decompositional efficient fine-tuning",
    "DELORA": "decoupled LoRA with a bounded-norm update",
    "FOURIERFT": "spectral coefficients turned into ΔW by an inverse DFT",
    "FROD": "FRoD",
    "GLORA": "generalized LoRA",
    "GRALORA": "granular block-partitioned LoRA",
    "HIRA": "Hadamard high-rank adaptation (W0 ⊙ BA)",
    "HRA": "products of Householder reflections",
    "LILY": "low-rank interconnected adaptation across layers",
    "MISS": "block-sharded shared-parameter update",
    "MULTITASK_PROMPT_TUNING": "a shared prompt with task-specific low-rank factors",
    "OSF": "orthogonal subspace fine-tuning",
    "PEANUT": "weight-aware non-linear adapter",
    "POLY": "Polytropon: a skill-routed LoRA inventory",
    "PSOFT": "orthogonal fine-tuning in the principal subspace",
    "PVERA": "probabilistic VeRA",
    "RANDLORA": "a sum of scaled random low-rank bases",
    "ROAD": "2D rotation adaptation",
    "SHADOW": "ShadowPEFT",
    "SHIRA": "a sparse high-rank update on a fixed mask",
    "SUPERTUNING": "Super-Tuning",
    "TINYLORA": "a very-low-parameter LoRA",
    "TRAINABLE_TOKENS": "new values for selected embedding rows",
    "UNILORA": "one parameter space shared by every LoRA matrix",
    "VBLORA": "LoRA factors assembled from a shared vector bank",
    "VERA": "frozen shared random A/B with trained scaling vectors",
    "WAVEFT": "wavelet coefficients",
    "XLORA": "a learned token-level mixture of LoRA experts (the hub's own mixture: HUB_MIXTURE)",
}

# Artifacts that name other adapters by digest instead of adapting modules (hub.formats.composition).
COMPOSITIONS: dict[str, str] = {"HUB_STACK": "stack", "HUB_MIXTURE": "mixture"}

_loaded: dict[str, Method] = {}
_plugins: dict[str, Method] | None = None


def _load_plugins() -> dict[str, Method]:
    global _plugins
    if _plugins is None:
        found: dict[str, Method] = {}
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                method = entry.load()
                method = method() if isinstance(method, type) else method
            except Exception as exc:  # a broken plugin costs its own method, not the hub
                log.warning("method plugin %s could not be loaded: %s", entry.value, exc)
                continue
            if not isinstance(method, Method) or method.peft_type.upper() in (*RUNNABLE, *COMPOSITIONS):
                log.warning("method plugin %s is not a new hub.methods.base.Method; ignored", entry.value)
                continue
            found[method.peft_type.upper()] = method
        _plugins = found
    return _plugins


def peft_types() -> list[str]:
    """Every PEFT type the table knows, sorted."""
    return sorted({*RUNNABLE, *STORED, *_load_plugins()})


def lookup(peft_type: object) -> Method:
    """The method of ``peft_type`` (case-insensitive). Raises InvalidArtifact for a type nobody defines."""
    if not isinstance(peft_type, str) or not peft_type:
        raise InvalidArtifact("adapter_config.json has no peft_type")
    key = peft_type.upper()
    method = _loaded.get(key)
    if method is not None:
        return method
    if key in RUNNABLE:
        method = importlib.import_module(RUNNABLE[key]).METHOD
    elif key in _load_plugins():
        method = _load_plugins()[key]
    elif key in COMPOSITIONS:
        from hub.methods.compositions import CompositionArtifact

        method = CompositionArtifact(key, COMPOSITIONS[key])
    elif key in STORED:
        method = Method(key, key.lower(), STORED[key])
    else:
        shown = peft_type if len(peft_type) <= 40 else peft_type[:37] + "..."
        raise InvalidArtifact(f"unknown adapter method {shown!r}: not a PEFT 0.21.2 type nor the hub's own")
    _loaded[key] = method
    return method


def all_methods() -> list[Method]:
    """Every adaptation method (compositions are not), in PEFT type order; imports the runnable ones."""
    return [lookup(peft_type) for peft_type in peft_types()]


def trainer(name: str) -> tuple[Method, dict[str, object]]:
    """The method a training recipe names (``lora``, ``dora``...) and the options the name implies."""
    for method in all_methods():
        if name in method.recipes:
            return method, dict(method.recipes[name])
    raise InvalidArtifact(f"cannot train method {name!r} (trainable: {', '.join(trainable_names())})")


def trainable_names() -> list[str]:
    return [recipe for method in all_methods() for recipe in method.recipes]
