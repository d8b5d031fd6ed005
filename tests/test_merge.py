"""Weighted-sum merges (hub.composition.merge) checked against PEFT as the oracle on a tiny random Llama.

Input adapters are made by PEFT (random non-zero factors), saved, and read with hub.formats.read_adapter. Each
adapter's delta per module comes from PEFT's own ``get_delta_weight``, so the scaling rules (rank_pattern,
alpha_pattern, rsLoRA, LoHa, LoKr) are PEFT's, not re-derived here.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import merge_utils
from transformers import LlamaForCausalLM

from hub.composition.lowrank import factor_dense, range_test_matrix
from hub.composition.merge import merge
from hub.errors import Incompatible
from hub.formats import Adapter, adapter_digest, read_adapter, write_adapter

PREFIX = "base_model.model."


def base_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture
def make(tmp_path: Path):
    """make(name, peft_config, seed) → (folder, Adapter): a PEFT adapter with random factors, saved and read back."""

    def _make(name: str, config, seed: int, **model_overrides):
        model = base_model(**model_overrides)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        folder = tmp_path / name
        peft_model.save_pretrained(folder)
        return folder, read_adapter(folder)

    return _make


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Every adapted module's ΔW as PEFT computes it (scaling included), keyed by module path."""
    model = PeftModel.from_pretrained(base_model(), folder)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, BaseTunerLayer) and "default" in getattr(module, "scaling", {}):
            deltas[name] = module.get_delta_weight("default").detach()
    return deltas


def merged_deltas(adapter) -> dict[str, torch.Tensor]:
    """B·A per module of a merged LoRA (its scaling is 1 everywhere)."""
    out = {}
    for path, params in adapter.modules().items():
        if "lora_embedding_A" in params:
            out[path] = (params["lora_embedding_B"] @ params["lora_embedding_A"]).T
        else:
            out[path] = params["lora_B.weight"] @ params["lora_A.weight"]
    return out


def weighted_sum(folders: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for folder, weight in zip(folders, weights, strict=True):
        for path, delta in peft_deltas(folder).items():
            total[path] = total.get(path, 0) + weight * delta
    return total


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, atol=rtol * scale, rtol=0)


@pytest.fixture
def lora_trio(make):
    """Three LoRAs with different ranks, patterns, rsLoRA, layers and target sets (one on the embedding)."""
    a = make("a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                             init_lora_weights=False, task_type="CAUSAL_LM"), seed=1)
    b = make("b", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                             rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3}, init_lora_weights=False,
                             task_type="CAUSAL_LM"), seed=2)
    c = make("c", LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "up_proj", "embed_tokens"],
                             init_lora_weights=False, task_type="CAUSAL_LM"), seed=3)
    return [a, b, c]


def test_exact_is_the_weighted_sum_of_deltas(lora_trio):
    folders, adapters = zip(*lora_trio, strict=True)
    weights = [0.7, -0.3, 1.5]
    result = merge(adapters, weights)
    expected = weighted_sum(list(folders), weights)
    got = merged_deltas(result.adapter)
    assert set(got) == set(expected)
    for path in expected:
        assert_close(got[path], expected[path])
    # Ranks add up where modules are shared: layer 0's q_proj is in all three (4 + 8 + 4), layer 1's in b and c.
    modules = result.adapter.modules()
    assert modules["model.layers.0.self_attn.q_proj"]["lora_A.weight"].shape[0] == 16
    assert modules["model.layers.1.self_attn.q_proj"]["lora_A.weight"].shape[0] == 12
    assert modules["model.layers.0.self_attn.k_proj"]["lora_A.weight"].shape[0] == 2
    assert result.recipe["strategy"] == "exact"
    assert result.recipe["weights"] == weights
    assert result.recipe["parents"] == [adapter_digest(adapter) for adapter in adapters]


def test_exact_merge_loads_in_peft_and_runs_like_the_stacked_adapters(lora_trio, tmp_path):
    folders, adapters = zip(*lora_trio, strict=True)
    weights = [0.7, -0.3, 1.5]
    merged_dir = write_adapter(merge(adapters, weights).adapter, tmp_path / "merged")
    assert read_adapter(merged_dir).spec.method == "lora"
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

    merged_model = PeftModel.from_pretrained(base_model(), merged_dir)
    lora_layers = {name: module for name, module in merged_model.base_model.model.named_modules()
                   if isinstance(module, BaseTunerLayer) and "default" in module.scaling}
    # Exactly the modules in the tensors (no zero-weight extras in other layers), each with scaling exactly 1.
    assert set(lora_layers) == set(merge(adapters, weights).adapter.modules())
    assert {module.scaling["default"] for module in lora_layers.values()} == {1.0}

    stacked = PeftModel.from_pretrained(base_model(), folders[0], adapter_name="a")
    stacked.load_adapter(folders[1], adapter_name="b")
    stacked.load_adapter(folders[2], adapter_name="c")
    for module in stacked.modules():
        if isinstance(module, BaseTunerLayer):
            for name, weight in zip("abc", weights, strict=True):
                module.set_scale(name, weight)
    stacked.base_model.set_adapter(["a", "b", "c"])
    with torch.no_grad():
        expected = stacked(ids).logits
        got = merged_model(ids).logits
        plain = base_model()(ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_bias_is_summed_exactly(make, tmp_path):
    biased = make("biased", LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False), 1)
    plain = make("plain", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 2)
    torch.nn.init.normal_(biased[1].tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.bias"])
    write_adapter(biased[1], biased[0])  # a non-zero bias (PEFT initializes it to zero)
    weights = [0.5, 2.0]
    merged_dir = write_adapter(merge([biased[1], plain[1]], weights).adapter, tmp_path / "merged")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    stacked = PeftModel.from_pretrained(base_model(), biased[0], adapter_name="x")
    stacked.load_adapter(plain[0], adapter_name="y")
    for module in stacked.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale("x", weights[0])
            module.set_scale("y", weights[1])
    stacked.base_model.set_adapter(["x", "y"])
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base_model(), merged_dir)(ids).logits,
                                   stacked(ids).logits, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_give_a_bfloat16_merge_computed_in_float32(lora_trio):
    folders, adapters = zip(*lora_trio, strict=True)
    halves = [Adapter(config=a.config, tensors={k: v.bfloat16() for k, v in a.tensors.items()}) for a in adapters]
    weights = [0.7, -0.3, 1.5]
    result = merge(halves, weights)
    assert {tensor.dtype for tensor in result.adapter.tensors.values()} == {torch.bfloat16}
    expected = weighted_sum(list(folders), weights)
    for path, delta in merged_deltas(result.adapter).items():
        assert_close(delta.float(), expected[path], rtol=3e-2)


def test_svd_is_the_best_rank_r_truncation(lora_trio):
    folders, adapters = zip(*lora_trio, strict=True)
    weights = [1.0, 0.5, -0.8]
    rank = 6
    result = merge(adapters, weights, strategy="svd", rank=rank)
    exact = weighted_sum(list(folders), weights)
    got = merged_deltas(result.adapter)
    assert set(got) == set(exact)
    for path, total in exact.items():
        u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
        kept = min(rank, int((s > s[0] * 1e-6).sum()))
        best = (u[:, :kept] * s[:kept]) @ vh[:kept]
        assert result.adapter.modules()[path]["lora_A.weight" if "embed" not in path
                                             else "lora_embedding_A"].shape[0] == kept
        assert_close(got[path].double(), best, rtol=1e-4)
        optimal_error = s[kept:].square().sum().sqrt()
        error = (total.double() - got[path].double()).norm()
        assert math.isclose(error, optimal_error, rel_tol=1e-3, abs_tol=1e-6 * total.norm().item())
    assert result.recipe["rank"] == rank


def test_svd_rank_above_every_module_is_refused(lora_trio):
    adapters = [adapter for _, adapter in lora_trio]
    with pytest.raises(Incompatible, match="larger than every module's summed rank"):
        merge(adapters, [1, 1, 1], strategy="svd", rank=40)


def test_loha_and_lokr_mix_with_lora_exactly(make):
    loha = make("loha", LoHaConfig(r=2, alpha=5, target_modules=["q_proj", "v_proj"], init_weights=False), 4)
    lokr_full = make("lokr_full", LoKrConfig(r=4, target_modules=["q_proj"], init_weights=False), 5)
    lokr_low = make("lokr_low", LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"], decompose_both=True,
                                           rank_pattern={"down_proj": 1}, init_weights=False), 6)
    lora = make("lora", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), 7)
    inputs = [loha, lokr_full, lokr_low, lora]
    weights = [0.4, 1.0, -0.6, 0.9]
    folders = [folder for folder, _ in inputs]
    result = merge([adapter for _, adapter in inputs], weights)
    expected = weighted_sum(folders, weights)
    got = merged_deltas(result.adapter)
    assert set(got) == set(expected)
    for path in expected:
        assert_close(got[path], expected[path])
    svd = merged_deltas(merge([adapter for _, adapter in inputs], weights, strategy="svd", rank=8).adapter)
    for path, total in expected.items():
        s = torch.linalg.svdvals(total.double())
        error = (total - svd[path]).norm()
        assert math.isclose(error, s[8:].square().sum().sqrt(), rel_tol=1e-3, abs_tol=1e-6 * total.norm().item())


def test_adalora_sums_exactly_with_lora(make):
    adalora = make("adalora", AdaLoraConfig(init_r=6, target_r=3, total_step=10, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False), 8)
    lora = make("lora", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), 9)
    weights = [0.8, -0.5]
    result = merge([adalora[1], lora[1]], weights)
    expected = weighted_sum([adalora[0], lora[0]], weights)
    got = merged_deltas(result.adapter)
    assert set(got) == set(expected)
    for path in expected:
        assert_close(got[path], expected[path])


@pytest.fixture
def same_rank_pair(make):
    a = make("p", LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False), 11)
    b = make("q", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 12)
    return a, b


def dare_mask(seed: int, path: str, index: int, shape: tuple[int, int], density: float) -> torch.Tensor:
    """DARE's keep mask for input ``index`` at module ``path``, from the stream hub.composition.merge documents."""
    key = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
    n = shape[0] * shape[1]
    words = np.random.SFC64(np.random.SeedSequence([seed % 2**64, key, index])).random_raw((n + 1) // 2)
    return torch.from_numpy(words.view(np.int32)[:n] < -(2**31) + round(density * 2**32)).reshape(shape)


def reference_merge(deltas: list[tuple[int, float, torch.Tensor]], strategy: str, density: float, sign: str,
                    seed: int, path: str) -> torch.Tensor:
    """One module's pruned merge, straightforwardly on whole dense deltas with PEFT's merge_utils: (input position,
    weight, ΔW) per input present at the module."""
    w = torch.tensor([weight for _, weight, _ in deltas])
    tensors = [delta for _, _, delta in deltas]
    if strategy in ("ties", "magnitude_prune"):
        return getattr(merge_utils, strategy)(tensors, w, density, **({"majority_sign_method": sign}
                                                                      if strategy == "ties" else {}))
    pruned = torch.stack([delta * dare_mask(seed, path, index, delta.shape, density) / density
                          for index, _, delta in deltas])
    if strategy == "dare_linear":
        return (pruned * w.view(-1, 1, 1)).sum(0)
    elected = merge_utils.calculate_majority_sign_mask(pruned, method=sign)
    return merge_utils.disjoint_merge(pruned * w.view(-1, 1, 1), elected)


@pytest.mark.parametrize(("strategy", "sign"), [("ties", "total"), ("magnitude_prune", "total"),
                                                ("dare_linear", "total"), ("dare_ties", "frequency")])
def test_pruning_strategies_follow_peft_merge_utils_on_dense_deltas(same_rank_pair, strategy, sign):
    (dir_a, a), (dir_b, b) = same_rank_pair
    weights, density, seed = [0.6, 1.3], 0.4, 17
    # A rank at least the module's size keeps the pruned sum exactly, so it can be compared entry by entry.
    result = merge([a, b], weights, strategy=strategy, density=density, majority_sign=sign, seed=seed, rank=64)
    deltas = [peft_deltas(dir_a), peft_deltas(dir_b)]
    got = merged_deltas(result.adapter)
    assert set(got) == set(deltas[0]) | set(deltas[1])
    for path in sorted(got):
        present = [(i, w, d[path]) for i, (w, d) in enumerate(zip(weights, deltas, strict=True)) if path in d]
        assert_close(got[path], reference_merge(present, strategy, density, sign, seed, path), rtol=1e-4)
        assert result.truncation[path] < 1e-5
    assert result.recipe["density"] == density and result.recipe["seed"] == seed


def lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Adapter:
    """A LoRA with scaling 1 (lora_alpha = r) and random factors of the given module shapes (out, in)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (rows, cols) in shapes.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) / math.sqrt(cols)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = torch.randn(rows, rank, generator=gen)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "target_modules": sorted({path.rsplit(".", 1)[-1] for path in shapes})}
    return Adapter(config=config, tensors=tensors)


# Modules of several row blocks each (BLOCK_ELEMENTS entries apiece), one with an odd width (DARE draws two
# entries per 64-bit word) and one that only the first two inputs adapt.
BLOCKED = {"model.layers.0.mlp.down_proj": (700, 901), "model.layers.0.mlp.up_proj": (1200, 300)}
BLOCKED_WEIGHTS = [1.0, -0.5, 0.8]


@pytest.fixture(scope="module")
def blocked_trio() -> list[Adapter]:
    up = {"model.layers.0.mlp.up_proj": BLOCKED["model.layers.0.mlp.up_proj"]}
    return [lora(BLOCKED, 4, 1), lora(BLOCKED, 8, 2), lora({k: v for k, v in BLOCKED.items() if k not in up}, 4, 3)]


def dense_deltas(adapters: list[Adapter], path: str) -> list[tuple[int, float, torch.Tensor]]:
    return [(i, w, params["lora_B.weight"] @ params["lora_A.weight"])
            for i, (w, adapter) in enumerate(zip(BLOCKED_WEIGHTS, adapters, strict=True))
            if (params := adapter.modules().get(path))]


@pytest.mark.parametrize(("strategy", "sign"), [("ties", "total"), ("magnitude_prune", "total"),
                                                ("dare_linear", "total"), ("dare_ties", "total")])
def test_blockwise_pruning_equals_the_dense_reference_and_reports_its_measured_error(blocked_trio, strategy, sign):
    density, seed = 0.3, 5
    full = merge(blocked_trio, BLOCKED_WEIGHTS, strategy=strategy, density=density, majority_sign=sign, seed=seed,
                 rank=1200)
    low = merge(blocked_trio, BLOCKED_WEIGHTS, strategy=strategy, density=density, majority_sign=sign, seed=seed,
                rank=6)
    got, truncated = merged_deltas(full.adapter), merged_deltas(low.adapter)
    error = norm = 0.0
    for path in BLOCKED:
        expected = reference_merge(dense_deltas(blocked_trio, path), strategy, density, sign, seed, path)
        assert_close(got[path], expected, rtol=1e-4)
        # The reported truncation error is the one the stored factors reach, and near the optimal rank-6 one.
        residual = (expected - truncated[path]).norm().item()
        assert math.isclose(low.truncation[path], residual / expected.norm().item(), rel_tol=1e-3)
        optimal = torch.linalg.svdvals(expected.double())[6:].square().sum().sqrt().item()
        assert optimal <= residual <= 1.001 * optimal
        error, norm = error + residual**2, norm + expected.norm().item() ** 2
    assert math.isclose(low.truncation_error, math.sqrt(error / norm), rel_tol=1e-3)
    assert low.adapter.modules()["model.layers.0.mlp.up_proj"]["lora_A.weight"].shape[0] == 6


def test_pruned_merge_that_fits_its_rank_reports_no_truncation(blocked_trio):
    # density 1 prunes nothing: the merge is the weighted sum, of rank 16 at most, stored at rank 16 by the range
    # finder (the modules are too large for the exact SVD), so the reported error must be rounding, not ~√ε.
    result = merge(blocked_trio, BLOCKED_WEIGHTS, strategy="magnitude_prune", density=1.0, rank=16)
    got = merged_deltas(result.adapter)
    for path in BLOCKED:
        exact = sum(w * delta for _, w, delta in dense_deltas(blocked_trio, path))
        assert_close(got[path], exact, rtol=1e-4)
        assert result.truncation[path] < 1e-5


@pytest.mark.parametrize("strategy", ["ties", "dare_ties"])
def test_pruned_merge_is_the_same_bit_for_bit_on_one_thread_or_two(blocked_trio, strategy):
    # Modules are merged on torch.get_num_threads() threads at once: a seed must give the same adapter either way.
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(merge(blocked_trio, BLOCKED_WEIGHTS, strategy=strategy, density=0.3, seed=5, rank=6))
            assert torch.get_num_threads() == count  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    one, two = results
    assert one.adapter.tensors.keys() == two.adapter.tensors.keys()
    assert all(torch.equal(one.adapter.tensors[k], two.adapter.tensors[k]) for k in one.adapter.tensors)
    assert one.truncation == two.truncation


def test_svd_reports_the_error_of_its_truncation(blocked_trio):
    result = merge(blocked_trio, BLOCKED_WEIGHTS, strategy="svd", rank=5)
    got = merged_deltas(result.adapter)
    for path in BLOCKED:
        exact = sum(w * delta for _, w, delta in dense_deltas(blocked_trio, path))
        assert math.isclose(result.truncation[path], ((exact - got[path]).norm() / exact.norm()).item(), rel_tol=1e-3)
    assert merge(blocked_trio, BLOCKED_WEIGHTS).truncation is None  # exact: nothing truncated


def test_dare_is_reproducible_with_a_seed_and_differs_with_another(same_rank_pair):
    (_, a), (_, b) = same_rank_pair
    first = merge([a, b], [1.0, 1.0], strategy="dare_ties", density=0.3, seed=5).adapter
    again = merge([a, b], [1.0, 1.0], strategy="dare_ties", density=0.3, seed=5).adapter
    other = merge([a, b], [1.0, 1.0], strategy="dare_ties", density=0.3, seed=6).adapter
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert any(not torch.allclose(first.tensors[k], other.tensors[k]) for k in first.tensors)
    # Default rank: the sum of the input ranks at each module (q_proj: 4 + 8), capped by the module's size.
    assert first.modules()["model.layers.0.self_attn.q_proj"]["lora_A.weight"].shape[0] == 12


def test_range_finder_is_near_optimal_seeded_and_reports_its_error():
    gen = torch.Generator().manual_seed(0)
    row_space = torch.randn(12, 1050, generator=gen)
    matrix = torch.randn(1100, 12, generator=gen) @ row_space + 0.05 * torch.randn(1100, 1050, generator=gen)
    optimal = torch.linalg.svdvals(matrix)[8:].square().sum().sqrt().item()

    def factor(rows: torch.Tensor, seed: int):
        omega = range_test_matrix(rows, matrix.shape, 8, generator=torch.Generator().manual_seed(seed))
        return factor_dense(matrix, 8, sample=matrix @ omega)

    b, a, error, norm = factor(row_space, 3)
    again = factor(row_space, 3)
    assert torch.equal(b, again[0]) and torch.equal(a, again[1])
    residual = (matrix - b @ a).norm().item()
    assert residual <= 1.001 * optimal
    # The error and norm it reports are those of its factors, measured here entry by entry.
    assert math.isclose(math.sqrt(error), residual, rel_tol=1e-3)
    assert math.isclose(norm, matrix.norm().item() ** 2, rel_tol=1e-4)
    # Rows unrelated to the matrix's: the Gaussian part of the test matrix still finds its range.
    b, a, *_ = factor(torch.randn(12, 1050, generator=gen), 3)
    assert (matrix - b @ a).norm().item() <= 1.001 * optimal


def test_ia3_weighted_sum_matches_peft(make):
    config = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    (dir_a, a), (dir_b, b) = make("ia3a", IA3Config(**config), 1), make("ia3b", IA3Config(**config), 2)
    weights = [0.25, 0.75]
    result = merge([a, b], weights)
    peft_model = PeftModel.from_pretrained(base_model(), dir_a, adapter_name="a")
    peft_model.load_adapter(dir_b, adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "m")
    expected = get_peft_model_state_dict(peft_model, adapter_name="m")
    assert set(result.adapter.tensors) == set(expected)
    for key, tensor in expected.items():
        assert_close(result.adapter.tensors[key], tensor)


def test_ia3_with_different_targets_is_refused(make):
    a = make("ia3a", IA3Config(target_modules=["k_proj"], feedforward_modules=[]), 1)[1]
    b = make("ia3b", IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]), 2)[1]
    with pytest.raises(Incompatible, match="same modules"):
        merge([a, b], [1, 1])


@pytest.mark.parametrize("config_class", [PromptTuningConfig, PromptEncoderConfig])
def test_prompt_embeddings_are_summed_and_load_in_peft(make, tmp_path, config_class):
    extra = {"encoder_hidden_size": 16} if config_class is PromptEncoderConfig else {}
    (_, a), (_, b) = (make(f"pr{i}", config_class(task_type="CAUSAL_LM", num_virtual_tokens=5, **extra), i)
                      for i in (1, 2))
    result = merge([a, b], [2.0, -1.0])
    expected = 2.0 * a.tensors["prompt_embeddings"] - b.tensors["prompt_embeddings"]
    assert_close(result.adapter.tensors["prompt_embeddings"], expected)
    loaded = PeftModel.from_pretrained(base_model(), write_adapter(result.adapter, tmp_path / "merged"))
    assert_close(loaded.prompt_encoder["default"].embedding.weight.detach(), expected)


def test_prompts_of_different_lengths_are_refused(make):
    a = make("p5", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), 1)[1]
    b = make("p7", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7), 2)[1]
    with pytest.raises(Incompatible, match="same length"):
        merge([a, b], [1, 1])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(adapters=[]), "empty"),
    (dict(weights=[1.0]), "1 weights for 2 adapters"),
    (dict(weights=[0, 0.0]), "all weights are zero"),
    (dict(weights=[1.0, float("nan")]), "finite"),
    (dict(weights=[float("inf"), 1.0]), "finite"),
    (dict(strategy="linear"), "unknown merge strategy 'linear'"),
    (dict(strategy="svd", rank=0), "positive integer"),
    (dict(rank=4), "keeps every module's full rank"),
    (dict(strategy="ties"), "needs density"),
    (dict(strategy="dare_linear", density=0.0), r"in \(0, 1\]"),
    (dict(strategy="ties", density=1.5), r"in \(0, 1\]"),
    (dict(strategy="svd", density=0.5), "density applies to"),
    (dict(strategy="ties", density=0.5, majority_sign="mean"), "majority_sign"),
    (dict(strategy="dare_ties", density=0.5, seed=1.5), "seed must be an integer"),
    (dict(strategy="dare_linear", density=0.5, seed=2**64), "seed must be an integer from -2"),  # torch overflowed
])
def test_bad_calls_are_refused_with_one_line(same_rank_pair, kwargs, message):
    call = {"adapters": [adapter for _, adapter in same_rank_pair], "weights": [1.0, 1.0], **kwargs}
    with pytest.raises(Incompatible, match=message) as error:
        merge(call.pop("adapters"), call.pop("weights"), **call)
    assert "\n" not in str(error.value)


def test_adapters_of_different_bases_are_refused(make):
    small = make("small", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), 1)[1]
    wide = make("wide", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), 2, hidden_size=48)[1]
    with pytest.raises(Incompatible, match="different bases"):
        merge([small, wide], [1, 1])


@pytest.mark.parametrize(("second", "message"), [
    (LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), "DoRA"),
    (IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "stack these adapters"),
    (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "stack these adapters"),
])
def test_unsummable_adapters_are_refused(make, second, message):
    lora = make("lora", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), 1)[1]
    other = make("other", second, 2)[1]
    with pytest.raises(Incompatible, match=message) as error:
        merge([lora, other], [1, 1])
    assert "\n" not in str(error.value)
