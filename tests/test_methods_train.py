"""BitFit and bottleneck adapters (the hub's own formats): fresh adapters are the identity, training moves only the
adapter, the trained adapter survives the files, and bad adapters are refused before anything changes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn

from hub.errors import Incompatible, InvalidArtifact
from hub.formats import Adapter, read_adapter, write_adapter
from hub.methods import bitfit, bottleneck, ln_tuning, prompt_tuning

# Weights ten times larger than transformers' default init: with the default, a tiny random model's logits are
# too flat (its final norm caps them) for any adapter to learn the training task below.
INIT_RANGE = 0.2


def tiny_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(initializer_range=INIT_RANGE)).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0, initializer_range=INIT_RANGE)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {path: (len(m._forward_pre_hooks), len(m._forward_hooks)) for path, m in model.named_modules()}


def task() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed prompt that must be continued by a fixed answer; the loss counts the answer only."""
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(1, 128, (4, 6), generator=generator)
    answer = torch.randint(1, 128, (1, 5), generator=generator).expand(4, -1)
    ids = torch.cat((prompt, answer), dim=1)
    labels = ids.clone()
    labels[:, : prompt.shape[1]] = -100
    return ids, labels


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def new(method: str, model: nn.Module, **options) -> Adapter:
    if method == "bitfit":
        return bitfit.new_adapter(model, **options)
    return bottleneck.new_adapter(model, placement=method.split("-")[1], bottleneck_size=8, **options)


def attach(model: nn.Module, adapter: Adapter, *, name: str = "a", weight: float = 1.0):
    module = bitfit if adapter.method == "bitfit" else bottleneck
    return module.attach(model, adapter, name=name, weight=weight)


# ---------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize(
    ("family", "method"),
    [("llama", "bottleneck-houlsby"), ("llama", "bottleneck-pfeiffer"), ("llama", "bitfit"),
     ("gpt2", "bottleneck-houlsby"), ("gpt2", "bitfit")],
)
def test_training_moves_only_the_adapter_and_round_trips(family: str, method: str, tmp_path: Path) -> None:
    model = FAMILIES[family]().requires_grad_(False)
    ids, labels = task()
    base_hash, base_out = state_hash(model), output(model, ids)
    handle = attach(model, new(method, model))
    assert torch.equal(output(model, ids), base_out)  # a fresh adapter is the identity

    params = handle.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=3e-2)
    model.train()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert state_hash(model) == base_hash

    trained_out = output(model, ids)
    written = read_adapter(write_adapter(handle.to_adapter(), tmp_path / "trained"))
    handle.detach()
    assert torch.equal(output(model, ids), base_out)
    again = attach(model, written, name="again")
    assert torch.equal(output(model, ids), trained_out)
    again.detach()
    fresh = FAMILIES[family]()
    attach(fresh, written)
    assert torch.equal(output(fresh, ids), trained_out)


def test_artifacts_describe_themselves(tmp_path: Path) -> None:
    model = tiny_llama()
    folder = write_adapter(bottleneck.new_adapter(model, placement="houlsby", bottleneck_size=6, layers=[1],
                                                  non_linearity="silu"), tmp_path / "bn")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK"
    assert config["target_modules"] == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    spec = read_adapter(folder).spec
    assert (spec.method, spec.rank, spec.targets) == ("bottleneck", 6, ("mlp", "self_attn"))
    assert spec.options["placement"] == "houlsby"

    bias = read_adapter(write_adapter(bitfit.new_adapter(model, targets=["q_proj", "lm_head"]),
                                      tmp_path / "bf"))
    assert bias.spec.method == "bitfit"
    assert set(bias.modules()) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"}
    assert bias.tensors["base_model.model.lm_head.bias"].shape == (128,)


# ---------------------------------------------------------------------------------------------------------------
# Sites per family, weights, stacking


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_bottleneck_sites_per_family(family: str, placement: str) -> None:
    model = FAMILIES[family]()
    adapter = bottleneck.new_adapter(model, placement=placement, bottleneck_size=4)
    per_layer = 2 if placement == "houlsby" else 1
    assert len(adapter.modules()) == 2 * per_layer  # two layers in every tiny model
    ids = task()[0]
    base_out = output(model, ids)
    handle = attach(model, adapter)
    assert torch.equal(output(model, ids), base_out)
    with torch.no_grad():
        for param in handle.parameters():
            param.add_(0.2 * torch.randn_like(param))
    changed = output(model, ids)
    assert not torch.allclose(changed, base_out, atol=1e-3)
    handle.set_weight(0.0)
    assert torch.equal(output(model, ids), base_out)
    handle.detach()
    assert torch.equal(output(model, ids), base_out)


def test_bitfit_weight_scales_the_bias_delta() -> None:
    model = tiny_llama()
    ids = task()[0]
    adapter = bitfit.new_adapter(model, targets=["lm_head"])
    delta = torch.randn(128, generator=torch.Generator().manual_seed(8))
    adapter.tensors["base_model.model.lm_head.bias"] = delta
    base_out = output(model, ids)
    handle = attach(model, adapter, weight=0.5)
    # lm_head is the last layer: the logits move by exactly weight · Δb.
    assert torch.allclose(output(model, ids) - base_out, 0.5 * delta.expand_as(base_out), atol=1e-6)
    handle.detach()


def test_methods_stack_and_detach_in_any_order() -> None:
    model = tiny_llama()
    ids = task()[0]
    base_hash, base_hooks, base_out = state_hash(model), hook_counts(model), output(model, ids)
    handles = [attach(model, new("bottleneck-pfeiffer", model), name="p"),
               attach(model, new("bottleneck-houlsby", model), name="h", weight=0.5),
               attach(model, new("bitfit", model), name="b")]
    prompt = Adapter(config={"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
                     tensors={"prompt_embeddings": torch.randn(2, 32)})
    handles.append(prompt_tuning.attach(model, prompt, name="prompt"))
    for handle in handles[:3]:
        with torch.no_grad():
            for param in handle.parameters():
                param.add_(0.1)
    assert output(model, ids).shape[1] == ids.shape[1] + 2
    for index in (1, 3, 0, 2):
        handles[index].detach()
    assert torch.equal(output(model, ids), base_out)
    assert state_hash(model) == base_hash
    assert hook_counts(model) == base_hooks


def test_stacked_bottlenecks_apply_in_attach_order() -> None:
    model = tiny_llama()
    ids = task()[0]
    first, second = new("bottleneck-pfeiffer", model), new("bottleneck-pfeiffer", model, seed=1)
    for adapter, seed in ((first, 10), (second, 11)):
        generator = torch.Generator().manual_seed(seed)
        for key, tensor in adapter.tensors.items():
            adapter.tensors[key] = tensor + 0.3 * torch.randn(tensor.shape, generator=generator)
    attach(model, first, name="first")
    attach(model, second, name="second")
    stacked = output(model, ids)
    # By hand: each site's output h → h + f1(h) → (that) + f2(that).
    reference = tiny_llama()
    sites = {}
    for adapter in (first, second):
        for path, params in adapter.modules().items():
            layer = bottleneck.Bottleneck(32, 8, "relu")
            layer.load_state_dict(params)
            sites.setdefault(path, []).append(layer)
    for path, layers in sites.items():
        def hook(_m, _a, out, layers=layers):
            for layer in layers:
                out = out + layer(out)
            return out
        reference.get_submodule(path).register_forward_hook(hook)
    assert torch.allclose(stacked, output(reference, ids), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def _bottleneck(path: str, hidden: int = 32, size: int = 4, **config) -> Adapter:
    tensors = {f"base_model.model.{path}.adapter_down.weight": torch.zeros(size, hidden),
               f"base_model.model.{path}.adapter_down.bias": torch.zeros(size),
               f"base_model.model.{path}.adapter_up.weight": torch.zeros(hidden, size),
               f"base_model.model.{path}.adapter_up.bias": torch.zeros(hidden)}
    values = {"peft_type": "BOTTLENECK", "placement": "pfeiffer", "non_linearity": "relu", "bottleneck_size": size}
    return Adapter(config={**values, **config}, tensors=tensors)


def _bitfit(path: str, size: int) -> Adapter:
    return Adapter(config={"peft_type": "BITFIT"}, tensors={f"base_model.model.{path}.bias": torch.zeros(size)})


@pytest.mark.parametrize(
    ("adapter", "weight", "message"),
    [
        (_bottleneck("model.layers.0.mlp", hidden=48), 1.0,
         "adapter_down.weight has shape (4, 48), expected (4, 32) for the model's hidden size 32"),
        (_bottleneck("model.layers.5.mlp"), 1.0, "the model has no module model.layers.5.mlp"),
        (_bottleneck("model.layers.0.mlp", non_linearity="tanh"), 1.0, "unknown non_linearity 'tanh'"),
        (_bottleneck("model.layers.0.mlp"), float("nan"), "weight must be a finite number"),
        (_bitfit("model.layers.0.self_attn.q_proj", 16), 1.0, "q_proj.bias has shape (16,), the module outputs 32"),
        (_bitfit("model.layers.0.self_attn.q_prj", 32), 1.0, "the model has no module model.layers.0.self_attn.q_prj"),
        (_bitfit("model.rotary_emb", 32), 1.0, "model.rotary_emb is a LlamaRotaryEmbedding, not a linear or norm"),
    ],
)
def test_adapters_that_do_not_fit_are_refused(adapter: Adapter, weight: float, message: str) -> None:
    model = tiny_llama()
    ids = task()[0]
    before, hooks = output(model, ids), hook_counts(model)
    with pytest.raises(Incompatible, match=re.escape(message)) as error:
        attach(model, adapter, weight=weight)
    assert "\n" not in str(error.value)
    assert torch.equal(output(model, ids), before)
    assert hook_counts(model) == hooks


def test_a_partly_fitting_adapter_changes_nothing() -> None:
    model = tiny_llama()
    adapter = _bottleneck("model.layers.0.mlp")
    adapter.tensors.update(_bottleneck("model.layers.1.mlp", hidden=16).tensors)
    hooks = hook_counts(model)
    with pytest.raises(Incompatible, match="model.layers.1.mlp"):
        attach(model, adapter)
    assert hook_counts(model) == hooks


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.config.update(non_linearity="tanh"), "non_linearity must be one of relu, gelu, silu"),
        (lambda a: a.config.update(placement="parallel"), "placement must be one of houlsby, pfeiffer"),
        (lambda a: a.config.update(bottleneck_size=8), "bottleneck size 4 but the config says 8"),
        (lambda a: a.tensors.pop("base_model.model.model.layers.0.mlp.adapter_up.bias"), "lacks bottleneck tensors"),
        (lambda a: a.tensors.update({"base_model.model.model.layers.0.mlp.adapter_up.weight": torch.zeros(32, 5)}),
         "do not chain"),
    ],
)
def test_malformed_bottleneck_files_are_refused(change, message: str, tmp_path: Path) -> None:
    adapter = _bottleneck("model.layers.0.mlp")
    change(adapter)
    folder = write_adapter(adapter, tmp_path / "bad")
    with pytest.raises(InvalidArtifact, match=re.escape(message)):
        read_adapter(folder)


def test_unknown_options_for_new_adapters_are_refused() -> None:
    model = tiny_llama()
    with pytest.raises(InvalidArtifact, match="unknown bottleneck placement 'parallel'"):
        bottleneck.new_adapter(model, placement="parallel")
    with pytest.raises(Incompatible, match="no bottleneck sites found in LlamaForCausalLM .* for layers \\[7\\]"):
        bottleneck.new_adapter(model, layers=[7])
    with pytest.raises(Incompatible, match="no linear or norm layer named c_attn"):
        bitfit.new_adapter(model, targets=["c_attn"])


# ---------------------------------------------------------------------------------------------------------------
# Through hub.runtime.attach, alongside the linear-layer methods


def _lora(model: nn.Module, targets: tuple[str, ...], seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator)
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": list(targets)}
    return Adapter(config=config, tensors=tensors)


def _ia3(model: nn.Module) -> Adapter:
    generator = torch.Generator().manual_seed(12)
    tensors = {}
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        # PEFT's IA3 shapes: [out, 1] scales an attention output, [1, in] a feed-forward input.
        shape = {"v_proj": (getattr(module, "out_features", 0), 1), "down_proj": (1, getattr(module, "in_features", 0))}
        if leaf in shape:
            tensors[f"base_model.model.{path}.ia3_l"] = 1 + 0.3 * torch.randn(shape[leaf], generator=generator)
    config = {"peft_type": "IA3", "target_modules": ["v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    return Adapter(config=config, tensors=tensors)


def _trained(adapter: Adapter, seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.2 * torch.randn(v.shape, generator=generator) for k, v in adapter.tensors.items()}
    return Adapter(config=adapter.config, tensors=tensors)


def test_runtime_attach_stacks_every_kind_and_restores_the_base() -> None:
    from hub.runtime.attach import attach as runtime_attach
    from hub.runtime.attach import attached

    model = tiny_llama()
    ids = task()[0]
    base_hash, base_out = state_hash(model), output(model, ids)
    virtual = [Adapter(config={"peft_type": kind, "num_virtual_tokens": 2}, tensors={"prompt_embeddings": rows})
               for kind, rows in (("PROMPT_TUNING", 0.5 * torch.randn(2, 32)), ("P_TUNING", 0.5 * torch.randn(2, 32)))]
    prefix = Adapter(config={"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "num_layers": 2, "token_dim": 16,
                             "num_attention_heads": 2}, tensors={"prompt_embeddings": torch.randn(3, 64)})
    stack = [_lora(model, ("q_proj", "v_proj"), 1), _ia3(model), *virtual, prefix,
             _trained(ln_tuning.new_adapter(model), 6), _trained(bitfit.new_adapter(model), 2),
             _trained(new("bottleneck-houlsby", model), 3)]
    handle = runtime_attach(model, stack, name="all", weight=[1.0] * 6 + [0.5, 1.0])
    assert sorted(h.method for h in attached(model).values()) == [
        "bitfit", "bottleneck", "ia3", "ln_tuning", "lora", "p_tuning", "prefix_tuning", "prompt_tuning"]
    stacked = output(model, ids)
    assert stacked.shape[1] == ids.shape[1] + 4
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(tokens, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                                  use_cache=False))
    handle.detach()
    assert not attached(model)
    assert torch.equal(output(model, ids), base_out)
    assert state_hash(model) == base_hash


def test_bitfit_composes_with_lora_on_the_same_layer_in_any_order() -> None:
    from hub.runtime.attach import attach as runtime_attach

    ids = task()[0]
    lora = _lora(tiny_llama(), ("q_proj", "o_proj"), 4)
    bias = _trained(bitfit.new_adapter(tiny_llama(), targets=["q_proj", "o_proj"]), 5)

    lora_first = tiny_llama()
    runtime_attach(lora_first, lora, name="lora")
    bias_handle = runtime_attach(lora_first, bias, name="bias")
    bias_first = tiny_llama()
    runtime_attach(bias_first, bias, name="bias")
    lora_handle = runtime_attach(bias_first, lora, name="lora")
    assert torch.allclose(output(lora_first, ids), output(bias_first, ids), atol=1e-6)

    # Removing the LoRA (which unwraps q_proj/o_proj) keeps the bias deltas in place.
    lora_handle.detach()
    only_bias = tiny_llama()
    runtime_attach(only_bias, bias, name="bias")
    assert torch.equal(output(bias_first, ids), output(only_bias, ids))
    bias_handle.detach()
