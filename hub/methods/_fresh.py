"""Fresh adapters: PEFT's initializations, reproducible from a seed, and the config fields they all carry."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(w, a=√5)`` on a [rows, cols] tensor, as PEFT initializes its factors: uniform in
    ±1/√cols, drawn from ``generator`` so the same seed gives the same adapter."""
    bound = 1 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for ``model``: CAUSAL_LM for language models that generate, else none (a bare encoder)."""
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def base_config(model: nn.Module, peft_type: str, **fields: Any) -> dict[str, Any]:
    """A config as PEFT saves it: the method's fields plus what every saved PEFT config says."""
    return {
        "peft_type": peft_type,
        "task_type": task_type(model),
        "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        **fields,
    }
