"""Shared by the runtime tests: tiny models, and adapters made and saved by PEFT (the oracle) with non-zero weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    get_peft_model,
)
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hub.formats import Adapter, read_adapter

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = [*LLAMA_ATTN, "gate_proj", "up_proj", "down_proj"]

# One PEFT config per case: (method name as the hub knows it, config). Every weight is random, never an identity.
LLAMA_CASES = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False),
    "rslora": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_ATTN,
                                 init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                               init_lora_weights=False),
    "lora_bias": lambda: LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False),
    "lora_patterns": lambda: LoraConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
                                        target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                        layers_pattern="layers", init_lora_weights=False),
    "lora_embedding": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                         init_lora_weights=False),
    "adalora": lambda: AdaLoraConfig(init_r=6, target_r=3, total_step=10, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "lokr_decomposed": lambda: LoKrConfig(r=2, alpha=8, decompose_both=True, target_modules=["q_proj", "down_proj"],
                                          init_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "oft": lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "oft_cayley": lambda: OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False,
                                    target_modules=["q_proj", "down_proj"], init_weights=False),
    "oft_coft_shared": lambda: OFTConfig(r=0, oft_block_size=8, coft=True, eps=0.5, block_share=True,
                                         target_modules=["q_proj"], init_weights=False),
    "boft": lambda: BOFTConfig(boft_block_size=4, target_modules=["q_proj", "down_proj"], init_weights=False),
}


def tiny_llama(hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def randomize(peft_model: nn.Module, seed: int = 1) -> None:
    """Move the parameters PEFT initialises to an identity (DoRA magnitudes, OFT/BOFT, IA3 near 1) off it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                param.add_(0.1 * noise * param.abs().mean())
            elif "oft_R" in name or "boft_R" in name:
                param.copy_(0.1 * noise)
            elif "boft_s" in name or "ia3_l" in name:
                param.copy_(1 + 0.2 * noise)


def peft_adapter(model: nn.Module, config, folder: Path, *, seed: int = 1) -> tuple[PeftModel, Adapter]:
    """Wrap a copy of ``model`` with PEFT, randomize, save to ``folder``; returns the PEFT model and the hub's read."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    randomize(peft_model, seed)
    peft_model.eval()
    peft_model.save_pretrained(folder)
    return peft_model, read_adapter(folder)


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
