"""Export a registered version as the plain LoRA that vLLM (and SGLang, LoRAX, mistral.rs) serve.

What vLLM 0.33 accepts (vllm/lora/peft_helper.py, vllm/config/lora.py): ``peft_type`` LORA with ``r``,
``lora_alpha`` and ``target_modules``; one scaling α/r for the whole adapter (no per-module ``rank_pattern`` or
``alpha_pattern``); no DoRA, no LoRA bias, no ``modules_to_save``; a rank the server's ``--max-lora-rank`` covers,
one of ``VLLM_RANKS``. Its filesystem resolver also wants ``base_model_name_or_path`` to equal the served model.

So every LoRA-family version (LoRA, rsLoRA, AdaLoRA, LoHa, LoKr, merged sums, stacks of those at their weights)
is first rewritten exactly as one LoRA whose scaling is 1 in every module (``hub.composition``'s exact weighted
sum), then each module's factors are padded with zero rows/columns to one rank from ``VLLM_RANKS``, and
``lora_alpha`` = r. Padding with zeros changes nothing: the export's delta equals the source's up to float
rounding. Only a rank above 512 (LoHa/LoKr products, large sums) is reduced, by the optimal truncated SVD of the
factors, and the relative error that costs is reported. DoRA, mixtures and non-LoRA methods are refused with why.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hub.errors import HubError, Incompatible
from hub.formats import Adapter, export_adapter

if TYPE_CHECKING:
    from hub.client import Hub
    from hub.registry import VersionInfo

# vLLM's allowed --max-lora-rank values (``MaxLoRARanks`` in vllm/config/lora.py, 0.33).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Config keys of adapters that have a ΔW the hub can read, but that vLLM does not serve.
REFUSED = {
    "use_dora": "vLLM does not serve DoRA: its magnitude vector renormalizes by the base weight's column norms, "
                "which a plain LoRA cannot express",
    "lora_bias": "vLLM does not serve LoRA biases",
    "modules_to_save": "vLLM does not serve modules_to_save (full copies of base modules)",
}
# PEFT's prefix of every module key in adapter_model.safetensors (part of the file format).
KEY_PREFIX = "base_model.model."
_FACTORS = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class VllmExport:
    """What ``export_for_vllm`` wrote: the folder, the rank (the ``--max-lora-rank`` vLLM needs), the source's
    largest module rank, whether it was reduced by SVD, and the relative error ‖ΔW_export − ΔW‖_F / ‖ΔW‖_F over
    all modules (float rounding only, unless reduced)."""

    ref: str
    path: Path
    base_model: str
    rank: int
    source_rank: int
    modules: int
    reduced: bool
    relative_error: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def export_for_vllm(hub: Hub, ref: str, directory: str | os.PathLike[str], *,
                    base_model: str | None = None) -> VllmExport:
    """Write ``ref`` into ``directory`` (new or empty) as a vLLM-servable LoRA. ``base_model``: the model id vLLM
    serves (default: the version's base, when it is a Hub id). Raises Incompatible (with the reason) for what vLLM
    cannot serve, Conflict for a non-empty folder."""
    version = hub.get(ref)
    base_model = base_model or _hub_id(version)
    lora, source = plain_lora(hub, version)
    reduced = False
    source_rank = max(a.shape[0] for a, _ in source.values())
    if source_rank > VLLM_RANKS[-1]:
        lora, reduced = _reduce(lora, VLLM_RANKS[-1]), True
    rank = next(r for r in VLLM_RANKS if r >= max(a.shape[0] for a, _ in _factors(lora).values()))
    padded = _padded(lora, rank, base_model)
    error = relative_error(source, _factors(padded))
    target = Path(directory)
    export_adapter(padded, target)
    return VllmExport(ref=version.ref, path=target, base_model=base_model, rank=rank, source_rank=source_rank,
                      modules=len(source), reduced=reduced, relative_error=error)


def plain_lora(hub: Hub, version: VersionInfo) -> tuple[Adapter, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The version as one LoRA with scaling 1 in every module (exact), and its factors per module (A, B)."""
    from hub.composition import Stack, compose

    artifact = hub.load(version)
    if version.method == "stack":
        stack = Stack.from_adapter(artifact, hub=hub, base=version.base, base_name=version.base_name)
        members = [(m.adapter, m.weight) for m in stack.members]
    else:
        members = [(artifact, 1.0)]
    for adapter, _ in members:
        _check_servable(version.ref, adapter)
    try:
        merged = compose([a for a, _ in members], [w for _, w in members], strategy="exact").adapter
    except Incompatible as exc:
        raise Incompatible(f"{version.ref} cannot become a plain LoRA for vLLM: {exc}") from None
    return merged, _factors(merged)


def relative_error(source: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   export: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """‖Σ (B'A' − BA)‖_F / ‖BA‖_F over all modules, computed from the factors (no dense matrix): for X = [B', −B]
    and Y = [A'; A], ‖XY‖²_F = tr((XᵀX)(YYᵀ)), in float64."""
    if set(source) != set(export):
        raise HubError(f"the export's modules differ from the source's: {sorted(set(source) ^ set(export))[:5]}")
    diff = norm = 0.0
    for path, (a, b) in source.items():
        a2, b2 = export[path]
        x, y = torch.cat([b2, -b], dim=1).double(), torch.cat([a2, a]).double()
        diff += float(torch.trace((x.T @ x) @ (y @ y.T)))
        norm += float(torch.trace((b.double().T @ b.double()) @ (a.double() @ a.double().T)))
    return (max(diff, 0.0) / norm) ** 0.5 if norm > 0 else 0.0


def _check_servable(ref: str, adapter: Adapter) -> None:
    for key, why in REFUSED.items():
        if adapter.config.get(key):
            raise Incompatible(f"{ref} cannot be served by vLLM: {why}")
    why = adapter.kind.delta_refusal(adapter.config)
    if why is not None:  # vLLM applies one low-rank ΔW per module
        raise Incompatible(f"{ref} cannot be served by vLLM: {why}. Exportable: LoRA, rsLoRA, AdaLoRA, LoHa, LoKr, "
                           "their weighted sums and stacks")


def _hub_id(version: VersionInfo) -> str:
    from hub.remote.paths import is_hub_model_id

    if version.base_name and is_hub_model_id(version.base_name):
        return version.base_name
    raise Incompatible(f"{version.ref} records no Hub id of its base ({version.base_name or 'none'}): give the model "
                       "id vLLM serves (--base-model), which vLLM checks against base_model_name_or_path")


def _factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module path: (A [r, in], B [out, r]); an embedding's A is [r, vocab], its B [dim, r] (PEFT's layout)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        match = _FACTORS.match(key.removeprefix(KEY_PREFIX))
        if match is None:
            raise Incompatible(f"unexpected tensor {key} in a LoRA export")
        parts.setdefault(match["path"], {})[match["kind"].split(".")[0][-1]] = tensor
    return {path: (p["A"], p["B"]) for path, p in parts.items()}


def _reduce(lora: Adapter, rank: int) -> Adapter:
    from hub.composition import compose

    return compose([lora], [1.0], strategy="svd", rank=rank).adapter


def _padded(lora: Adapter, rank: int, base_model: str) -> Adapter:
    """Every module's factors padded with zeros to ``rank``; one scaling α/r = 1 for all."""
    tensors = {}
    for key, tensor in lora.tensors.items():
        kind = _FACTORS.match(key.removeprefix(KEY_PREFIX))["kind"]
        missing = rank - (tensor.shape[0] if kind.startswith(("lora_A", "lora_embedding_A")) else tensor.shape[1])
        pad = (0, 0, 0, missing) if kind.startswith(("lora_A", "lora_embedding_A")) else (0, missing)
        tensors[key] = torch.nn.functional.pad(tensor, pad).contiguous()
    config = {key: value for key, value in lora.config.items() if key not in ("rank_pattern", "alpha_pattern")}
    config.update({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False,
                   "lora_bias": False, "modules_to_save": None, "base_model_name_or_path": base_model,
                   "task_type": config.get("task_type") or "CAUSAL_LM"})
    return Adapter(config=config, tensors=tensors)
