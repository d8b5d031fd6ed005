"""Gates of a mixture: small modules that turn hidden states into per-token, per-layer expert weights.

Two designs (``RouterConfig.kind``):

* ``layerwise`` (the default, one pass): before decoder layer ℓ runs, its input hidden state h gives that layer's
  gates, ``softmax(W[ℓ] · rms(h) + b[ℓ])``. A token's gates depend only on its own hidden state, so generation with
  the KV cache computes exactly what a full re-run would.
* ``two_pass`` (X-LoRA, arXiv 2402.07148): a first pass of the base with the experts off gives the last hidden
  state; an MLP maps it to gates for every layer at once; the real pass runs with them. Costs a second forward.

Both start from zero logits (every expert weighted equally) and share the gate function: softmax over experts at
``temperature``, optionally keeping each token's ``top_k`` largest and renormalising them to sum to 1.

``RouterConfig.routing`` says what the gate is computed for:

* ``token`` (the default, X-LoRA's): every token its own gates, from its own hidden state;
* ``sequence`` (task-level routing, Kudugunta et al., arXiv 2110.03742): one gate per sequence and layer, the mean
  of the per-token logits over the prompt (for the linear layerwise gate: the gate of the prompt's mean normalised
  hidden state), kept for every later token. The prompt is the first forward of a sequence (the one that starts
  its KV cache; ``Mixture.fit`` marks the prompt tokens of its examples), so a gate learnt from a few examples per
  task cannot switch expert mid-answer on a token that looks like another task's (digits in a date and a record).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hub.errors import Incompatible
from hub.formats.composition import ROUTER_KINDS, ROUTER_PREFIX, ROUTINGS, gate_shapes


@dataclass(frozen=True)
class RouterConfig:
    """How a mixture's gate is built and applied. ``routing``: ``token`` or ``sequence`` (see the module doc;
    artifacts saved before it existed route per token). ``depth`` and ``width`` shape the two-pass classifier (an
    MLP with ``depth`` linear layers, ``width`` wide between them); ``seed`` initializes its hidden layers."""

    kind: str = "layerwise"
    temperature: float = 1.0
    top_k: int | None = None
    depth: int = 1
    width: int = 256
    seed: int = 0
    routing: str = "token"

    def check(self, experts: int) -> None:
        if self.kind not in ROUTER_KINDS:
            raise Incompatible(f"router kind must be one of {', '.join(ROUTER_KINDS)}, not {self.kind!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
                math.isfinite(self.temperature) and self.temperature > 0):
            raise Incompatible(f"router temperature must be a positive number, not {self.temperature!r}")
        if self.top_k is not None and (not _whole(self.top_k) or not 1 <= self.top_k <= experts):
            raise Incompatible(f"top_k must be from 1 to the number of experts ({experts}), not {self.top_k!r}")
        if not _whole(self.depth) or self.depth < 1 or not _whole(self.width) or self.width < 1:
            raise Incompatible(f"router depth and width must be positive integers, not {self.depth!r}/{self.width!r}")
        if self.routing not in ROUTINGS:
            raise Incompatible(f"router routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}")
        if self.kind == "layerwise" and self.depth != 1:
            raise Incompatible("a layerwise router is one linear map per layer: depth must be 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def gate(logits: torch.Tensor, *, temperature: float, top_k: int | None) -> torch.Tensor:
    """Expert weights from logits [..., N]: softmax at ``temperature``; with ``top_k``, the k largest renormalised
    (the others exactly 0, so the adapted layers skip those experts)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kept = logits.topk(top_k, dim=-1).indices
        mask = torch.full_like(logits, float("-inf")).scatter(-1, kept, 0.0)
        logits = logits + mask
    return torch.softmax(logits / temperature, dim=-1)


def rms_normalize(hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states at unit root-mean-square: the residual stream's scale grows with depth, the gate's should not."""
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)


class LayerwiseGate(nn.Module):
    """Per decoder layer ℓ: logits = weight[ℓ] · rms(h) + bias[ℓ], from that layer's input h [B, S, hidden]."""

    def __init__(self, layers: int, experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(layers, experts, hidden))
        self.bias = nn.Parameter(torch.zeros(layers, experts))

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return F.linear(rms_normalize(hidden.to(self.weight.dtype)), self.weight[layer], self.bias[layer])


class TwoPassGate(nn.Module):
    """X-LoRA's classifier: an MLP from the last hidden state h [B, S, hidden] to logits [B, S, layers, experts]."""

    def __init__(self, layers: int, experts: int, hidden: int, *, depth: int, width: int, seed: int):
        super().__init__()
        self.layers, self.experts = layers, experts
        dims = [hidden] + [width] * (depth - 1) + [layers * experts]
        generator = torch.Generator().manual_seed(seed)
        self.linears = nn.ModuleList()
        for i in range(depth):
            linear = nn.Linear(dims[i], dims[i + 1])
            with torch.no_grad():
                if i == depth - 1:
                    # The last layer starts at zero: equal gates until the classifier has learned something.
                    linear.weight.zero_()
                    linear.bias.zero_()
                else:
                    bound = 1 / math.sqrt(dims[i])  # nn.Linear's own initialization, drawn from the seed
                    linear.weight.uniform_(-bound, bound, generator=generator)
                    linear.bias.uniform_(-bound, bound, generator=generator)
            self.linears.append(linear)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = rms_normalize(hidden.to(self.linears[0].weight.dtype))
        for i, linear in enumerate(self.linears):
            x = linear(x) if i == 0 else linear(F.relu(x))
        return x.reshape(*x.shape[:-1], self.layers, self.experts)


def build_gate(router: dict[str, Any], experts: int, *, seed: int = 0) -> nn.Module:
    """A fresh gate module for a router config (the artifact's ``router`` object)."""
    layers, hidden = len(router["layers"]), router["hidden_size"]
    if router["kind"] == "layerwise":
        return LayerwiseGate(layers, experts, hidden)
    return TwoPassGate(layers, experts, hidden, depth=router["depth"], width=router["width"], seed=seed)


def gate_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The gate's tensors by artifact key (``router.*``), copied to the CPU."""
    return {ROUTER_PREFIX + key: value.detach().to("cpu", copy=True).contiguous()
            for key, value in module.state_dict().items()}


def load_gate(router: dict[str, Any], experts: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A gate module holding an artifact's tensors (their keys and shapes were checked by read_adapter)."""
    module = build_gate(router, experts)
    expected = gate_shapes(router, experts)
    state = {key.removeprefix(ROUTER_PREFIX): tensors[key].to(torch.float32) for key in expected}
    module.load_state_dict(state, strict=True)
    module.requires_grad_(False)
    return module
