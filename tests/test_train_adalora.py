"""AdaLoRA training: the hub's loop and PEFT's AdaLoraModel (its own update_and_allocate and orthogonal regularizer)
allocate the same ranks from the same start, data and hyperparameters; the trained adapter is the folder PEFT saves,
PEFT loads it with the same logits, and the registry records the ranks the budget kept."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from test_train import char_tokenizer, logits, tiny_data, tiny_llama

from hub.client import Hub
from hub.data import collate, encode
from hub.errors import InvalidArtifact
from hub.fingerprint import fingerprint
from hub.formats import Adapter, read_adapter, write_adapter
from hub.runtime import attach
from hub.train import Recipe, lr_factor, new_adapter, train

# PEFT warns that its own AdaLoRA rank_pattern keys (masks, not ranks) match no module; its saved folders do too.
warnings.filterwarnings("ignore", message=".*(rank_pattern keys did not match|right-padding).*")

# A run long enough for each phase: 2 steps before the budget falls, 7 of cubic decay, 3 on the final ranks.
# One batch holds all the data, so both loops see the same examples at every step.
DATA = 8
RECIPE = Recipe(method="adalora", rank=2, steps=12, batch_size=DATA, lr=5e-2, warmup=2,
                options={"init_r": 4, "tinit": 2, "tfinal": 3})


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return char_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer: Any) -> Any:
    return train(tiny_llama(), tokenizer, tiny_data(DATA), RECIPE, progress=False)


def kept_ranks(rank_pattern: dict[str, list[bool]]) -> dict[str, int]:
    """Module path → how many triplets its mask keeps (PEFT's keys end in lora_E, during training in .default)."""
    return {key.removesuffix(".default").removesuffix(".lora_E"): sum(mask) for key, mask in rank_pattern.items()}


def peft_training(tokenizer: Any, folder: Path) -> Adapter:
    """PEFT's AdaLoraModel trained by the loop its docs give (backward, optimizer step, update_and_allocate, zero
    grad), with the hub's optimizer, schedule, clipping and starting tensors; the adapter PEFT saves."""
    fresh = new_adapter(tiny_llama(), RECIPE)
    config = AdaLoraConfig(**{key: value for key, value in fresh.config.items() if key != "peft_type"})
    config.inference_mode = False
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(fresh.tensors[name.replace(".default", "")])
    ids, labels, mask = collate([encode(tokenizer, e, max_length=128) for e in tiny_data(DATA)], pad_id=0, left=True)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=RECIPE.lr, weight_decay=RECIPE.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, RECIPE))
    model.train()
    for step in range(1, RECIPE.steps + 1):
        # The loss PEFT's forward returns: mean cross-entropy over the completion tokens plus the regularizer.
        model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, RECIPE.max_grad_norm)
        optimizer.step()
        schedule.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(folder)
    return read_adapter(folder)


def test_the_hub_allocates_the_ranks_peft_allocates(trained: Any, tokenizer: Any, tmp_path: Path) -> None:
    theirs = peft_training(tokenizer, tmp_path / "peft")
    ours_kept, theirs_kept = (kept_ranks(a.config["rank_pattern"]) for a in (trained.adapter, theirs))
    assert ours_kept.keys() == theirs_kept.keys() and len(ours_kept) == 8
    assert all(abs(ours_kept[path] - theirs_kept[path]) <= 1 for path in ours_kept), (ours_kept, theirs_kept)
    # The budget: target_r per module on average, spent unevenly (otherwise nothing was allocated).
    assert sum(ours_kept.values()) == RECIPE.rank * len(ours_kept) and len(set(ours_kept.values())) > 1
    assert {path: params["lora_A"].shape[0] for path, params in trained.adapter.modules().items()} == ours_kept
    # Where the masks agree (all of them on this machine), the trained triplets are PEFT's: same loss, same steps.
    masks = [a.config["rank_pattern"] for a in (trained.adapter, theirs)]
    same = [path for path in ours_kept if masks[0][f"{path}.lora_E"] == masks[1][f"{path}.lora_E"]]
    assert len(same) >= 6
    ours_modules, theirs_modules = trained.adapter.modules(), theirs.modules()
    for path in same:
        for name, tensor in theirs_modules[path].items():
            assert torch.allclose(ours_modules[path][name], tensor, atol=1e-5), (path, name)


def test_the_trained_adapter_is_a_folder_peft_loads_with_the_same_logits(trained: Any, tokenizer: Any,
                                                                          tmp_path: Path) -> None:
    assert trained.losses[-1] < 0.6 * trained.losses[0]
    folder = write_adapter(trained.adapter, tmp_path / "adalora")
    data = tiny_data(DATA)
    model = tiny_llama()
    handle = attach(model, read_adapter(folder))
    ours = logits(model, tokenizer, data)
    handle.detach()
    peft_model = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    assert (logits(peft_model, tokenizer, data) - ours).abs().max() <= 1e-4
    assert kept_ranks(peft_model.peft_config["default"].rank_pattern) == kept_ranks(
        trained.adapter.config["rank_pattern"])


def test_the_registry_records_the_ranks_the_budget_kept(trained: Any, hub_home: Path) -> None:
    kept = kept_ranks(trained.adapter.config["rank_pattern"])
    hub = Hub()
    hub.register(trained.adapter, name="ada", base=None, recipe=trained.recipe.to_dict())
    version = hub.get("ada")
    assert version.method == "adalora" and version.rank == max(kept.values())
    assert kept_ranks(version.config["rank_pattern"]) == kept
    assert version.recipe["options"] == {"init_r": 4, "tinit": 2, "tfinal": 3}
    assert version.config["total_step"] == RECIPE.steps  # the schedule spans the recipe's steps


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta1": 1.0}, "beta1 and beta2 must lie strictly between 0 and 1"),
        ({"orth_reg_weight": -1}, "orth_reg_weight must be a non-negative number"),
        ({"deltaT": 0}, "deltaT must be an integer of at least 1"),
        ({"tinit": "2"}, "tinit must be an integer of at least 0, not '2'"),
    ],
)
def test_bad_allocator_settings_are_refused_by_the_recipe(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArtifact, match=message):
        Recipe.from_dict({**RECIPE.to_dict(), "options": options})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 4, "options": {"init_r": 4}}, "needs 1 <= target_r < init_r"),
        ({"options": {"tinit": 6, "tfinal": 6}}, "leaves no budgeting phase"),
    ],
)
def test_bad_schedules_are_refused_before_the_model_is_touched(changes: dict[str, Any], message: str,
                                                                tokenizer: Any) -> None:
    model = tiny_llama()
    before = fingerprint(model)
    recipe = Recipe.from_dict({**RECIPE.to_dict(), **changes})
    with pytest.raises(InvalidArtifact, match=message):
        train(model, tokenizer, tiny_data(DATA), recipe, progress=False)
    assert fingerprint(model) == before and not any(p.requires_grad for p in model.parameters())
