"""bitsandbytes layers: recognise them and read their weights only through bitsandbytes' own current-format calls."""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _bnb() -> Any | None:
    # A model holds bitsandbytes layers only once bitsandbytes is imported; importing it just to ask would cost
    # a full-precision base seconds (it imports torch's compiler). None also when it is not installed.
    return sys.modules.get("bitsandbytes")


def is_bnb_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return is_bnb_4bit(module) or is_bnb_8bit(module)


def quantization_of(model: nn.Module) -> str | None:
    """"nf4"/"fp4" or "int8" when the model holds bitsandbytes layers, else None."""
    for module in model.modules():
        if is_bnb_4bit(module):
            return str(module.weight.quant_type)
        if is_bnb_8bit(module):
            return "int8"
    return None


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, None for anything else."""
    if isinstance(module, nn.Linear):  # bitsandbytes' layers are nn.Linear subclasses
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as [out, in], dequantized for bitsandbytes layers.

    Full-precision layers return their parameter (a transposed view for Conv1D); quantized ones a new tensor.
    """
    if is_bnb_4bit(module):
        import bitsandbytes.functional as bnbf

        weight = module.weight
        state = weight.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacked this layer for its AVX512-BF16 kernel; dequantize_4bit would read that layout
            # as the standard one and return garbage. Undo the packing with its own inverse, on copies, so the
            # live layer keeps working in whatever format it is in.
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)
    if is_bnb_8bit(module):
        import bitsandbytes.functional as bnbf

        weight = module.weight
        if module.state.has_fp16_weights:
            return weight.data
        cb = module.state.CB if module.state.CB is not None else weight.data
        scb = module.state.SCB if module.state.SCB is not None else weight.SCB
        return bnbf.int8_vectorwise_dequant(cb, scb)
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def base_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep every bitsandbytes Linear4bit on its differentiable dequantize+matmul path on CPU.

    With AVX512-BF16, bitsandbytes switches a Linear4bit to a packed kernel the first time it runs in eval mode
    without grad, and keeps it; that kernel has no autograd (training after any evaluation would lose the
    gradient through the frozen base) and computes in bf16. A layer already packed (a model the user ran before
    handing it over) is unpacked with bitsandbytes' own inverse. Returns the number of layers changed.
    """
    count = 0
    for module in model.modules():
        if is_bnb_4bit(module):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                         weight.quant_state)
            count += 1
    return count
