"""Shared by the client and CLI tests: tiny Llama bases saved with save_pretrained, adapters saved by PEFT."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from conftest import tiny_llama_config
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import LlamaForCausalLM


def save_base(folder: Path, seed: int, **overrides) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(folder)
    return folder


def save_peft(base: Path | torch.nn.Module, config, folder: Path, seed: int) -> Path:
    """A PEFT adapter on ``base`` (a model or its folder), saved by PEFT with every trainable weight moved off its
    initial value (LoRA B, AdaLoRA E and IA3 start as zeros or ones)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = base if isinstance(base, torch.nn.Module) else LlamaForCausalLM.from_pretrained(base)
        model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(folder)
    return folder


def save_folders(root: Path) -> dict[str, Path]:
    """Three bases (the base, a sibling with the same shapes and other values, another shape) and three adapters:
    two LoRAs on the base, an IA3 on the sibling."""
    base = save_base(root / "base", seed=0)
    sibling = save_base(root / "sibling", seed=1)
    other = save_base(root / "other", seed=0, hidden_size=48)
    return {
        "base": base, "sibling": sibling, "other": other,
        "lora4": save_peft(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           root / "lora4", seed=1),
        "lora8": save_peft(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]),
                           root / "lora8", seed=2),
        "ia3": save_peft(sibling, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"]), root / "ia3", seed=3),
    }


def peft_loaded_tensors(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors PEFT holds after PeftModel.from_pretrained(base, folder), keyed as in its files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder)
    return get_peft_model_state_dict(model)


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key
