"""Composition artifacts: a stack or a gated mixture of other adapters, stored like an adapter.

A composition is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` like any other artifact, so
the store, the digest, the registry and push/pull handle it unchanged. Its config names its members by digest (name
and number say which registered versions they were, for people and lineage):

    {"peft_type": "HUB_STACK", "members": [{"name": "math", "number": 2, "digest": "…", "weight": 0.7}, …]}
    {"peft_type": "HUB_MIXTURE", "experts": [...], "router": {"kind": "layerwise", "layers": [...], …}}

A stack holds no tensors; a mixture holds its gate's (``router.*``, shapes from ``gate_shapes``).
docs/formats.md describes both.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import TYPE_CHECKING, Any

from hub.errors import InvalidArtifact

if TYPE_CHECKING:
    import torch

STACK_TYPE = "HUB_STACK"
MIXTURE_TYPE = "HUB_MIXTURE"
ROUTER_KINDS = ("layerwise", "two_pass")
ROUTINGS = ("token", "sequence")
ROUTER_PREFIX = "router."
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def member_key(method: str) -> str:
    """Where a composition's config lists its members: ``members`` (stack) or ``experts`` (mixture)."""
    return "experts" if method == "mixture" else "members"


def member_entry(*, name: str | None, number: int | None, digest: str, weight: float) -> dict[str, Any]:
    return {"name": name, "number": number, "digest": digest, "weight": weight}


def gate_shapes(router: dict[str, Any], experts: int) -> dict[str, tuple[int, ...]]:
    """The tensors a mixture's gate holds, by file key, for its router config and number of experts.

    ``layerwise``: per decoder layer ℓ, logits = W[ℓ] · h + b[ℓ] from that layer's input h.
    ``two_pass``: an MLP (``depth`` linear layers, ReLU between, ``width`` wide) from the last hidden state to
    logits for every (layer, expert) pair.
    """
    layers, hidden = len(router["layers"]), router["hidden_size"]
    if router["kind"] == "layerwise":
        return {f"{ROUTER_PREFIX}weight": (layers, experts, hidden), f"{ROUTER_PREFIX}bias": (layers, experts)}
    dims = [hidden] + [router["width"]] * (router["depth"] - 1) + [layers * experts]
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(router["depth"]):
        shapes[f"{ROUTER_PREFIX}linears.{i}.weight"] = (dims[i + 1], dims[i])
        shapes[f"{ROUTER_PREFIX}linears.{i}.bias"] = (dims[i + 1],)
    return shapes


def validate_composition(method: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a stack or mixture whose member list, router config or gate tensors are malformed."""
    key = member_key(method)
    members = config.get(key)
    if not isinstance(members, list) or not members:
        raise InvalidArtifact(f"a {method} artifact needs a non-empty list '{key}' in its config")
    for index, entry in enumerate(members):
        _check_member(entry, f"{key}[{index}]")
    if method == "stack":
        if tensors:
            raise InvalidArtifact(f"a stack holds no tensors, but this one has {', '.join(sorted(tensors))}")
        return
    router = config.get("router")
    _check_router(router, len(members))
    expected = gate_shapes(router, len(members))
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        detail = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"
        raise InvalidArtifact(f"mixture gate tensors do not match its router config: {detail}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise InvalidArtifact(f"mixture gate tensor {name} has shape {tuple(tensors[name].shape)}, not {shape}")


def _check_member(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or set(entry) != {"name", "number", "digest", "weight"}:
        raise InvalidArtifact(f"{where} must be an object with exactly name, number, digest and weight")
    if not isinstance(entry["digest"], str) or not DIGEST.match(entry["digest"]):
        raise InvalidArtifact(f"{where}: digest {entry['digest']!r} is not a lowercase sha256 hex string")
    if entry["name"] is not None and not isinstance(entry["name"], str):
        raise InvalidArtifact(f"{where}: name must be a string or null")
    number = entry["number"]
    if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 1):
        raise InvalidArtifact(f"{where}: number must be a version number >= 1 or null")
    if not _finite(entry["weight"]):
        raise InvalidArtifact(f"{where}: weight {entry['weight']!r} is not a finite number")


def _check_router(router: Any, experts: int) -> None:
    if not isinstance(router, dict):
        raise InvalidArtifact("a mixture needs a 'router' object in its config")
    if router.get("kind") not in ROUTER_KINDS:
        raise InvalidArtifact(f"router kind must be one of {', '.join(ROUTER_KINDS)}, not {router.get('kind')!r}")
    layers = router.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(p, str) for p in layers):
        raise InvalidArtifact("router 'layers' must be a non-empty list of decoder layer paths")
    if len(set(layers)) != len(layers):
        raise InvalidArtifact("router 'layers' repeats a layer")
    for key in ("hidden_size", "depth"):
        if not _positive_int(router.get(key)):
            raise InvalidArtifact(f"router {key} must be a positive integer, not {router.get(key)!r}")
    if router["kind"] == "layerwise" and router["depth"] != 1:
        raise InvalidArtifact("a layerwise router is one linear map per layer: depth must be 1")
    if router["depth"] > 1 and not _positive_int(router.get("width")):
        raise InvalidArtifact(f"router width must be a positive integer when depth > 1, not {router.get('width')!r}")
    temperature = router.get("temperature")
    if not _finite(temperature) or temperature <= 0:
        raise InvalidArtifact(f"router temperature must be a positive number, not {temperature!r}")
    if router.get("routing", "token") not in ROUTINGS:  # absent in mixtures saved before sequence routing
        raise InvalidArtifact(f"router routing must be one of {', '.join(ROUTINGS)}, not {router.get('routing')!r}")
    top_k = router.get("top_k")
    if top_k is not None and (not _positive_int(top_k) or top_k > experts):
        raise InvalidArtifact(f"router top_k must be null or an integer from 1 to {experts}, not {top_k!r}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
