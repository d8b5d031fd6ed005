"""A weighted sum of adapters, merged into one new adapter that registers with its lineage."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hub.composition.members import Member, common_base, default_hub, load_members, register_composition
from hub.composition.merge import MergeResult, merge
from hub.formats import Adapter
from hub.registry import Metric, Registered

if TYPE_CHECKING:
    from torch import nn

    from hub.client import Hub
    from hub.composition.auto import WeightSearch
    from hub.fingerprint import Fingerprint
    from hub.runtime import AttachedHandle


@dataclass
class WeightedSum:
    """Σ weightᵢ · memberᵢ as one adapter, computed by ``strategy`` (see ``hub.composition.merge``) when created.

    ``adapter`` is the merged adapter (LoRA for LoRA-family inputs, IA3 or a prompt for those); ``recipe`` how it
    was made (strategy, weights, rank, density, majority sign, seed and the parents' digests, ``truncation_error``
    when the sum was stored at a lower rank, and ``search``: the weight search's settings and score when the weights
    were fitted).
    """

    members: list[Member]
    strategy: str = "exact"
    rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    # How the weights were fitted when ``compose(weights="auto")`` chose them (hub.composition.auto), else None.
    search: WeightSearch | None = None
    result: MergeResult = field(init=False, repr=False)

    def __post_init__(self) -> None:
        common_base(self.members)
        self.result = merge([m.adapter for m in self.members], [m.weight for m in self.members],
                            strategy=self.strategy, rank=self.rank, density=self.density,
                            majority_sign=self.majority_sign, seed=self.seed)

    @property
    def adapter(self) -> Adapter:
        return self.result.adapter

    @property
    def recipe(self) -> dict[str, Any]:
        recipe = {"kind": "sum", **self.result.recipe}
        if self.result.truncation_error is not None:  # what storing it at `rank` lost: ‖ΔW − BA‖_F / ‖ΔW‖_F
            recipe["truncation_error"] = self.result.truncation_error
        if self.search is not None:
            recipe["search"] = self.search.to_recipe()
        return recipe

    @property
    def base(self) -> Fingerprint | None:
        return common_base(self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sum", "members": [m.to_dict() for m in self.members], "strategy": self.strategy,
                "rank": self.rank, "density": self.density, "majority_sign": self.majority_sign, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, hub: Hub | None = None) -> WeightedSum:
        """Redo a sum from ``to_dict()``: members are read from ``hub``'s store by digest, the merge recomputed
        (bit for bit: every strategy is deterministic given its seed)."""
        members = load_members(data["members"], hub=default_hub(hub))
        return cls(members, strategy=data["strategy"], rank=data["rank"], density=data["density"],
                   majority_sign=data["majority_sign"], seed=data["seed"])

    def attach(self, model: nn.Module, *, name: str = "sum", allow_structural: bool = False) -> AttachedHandle:
        """Attach the merged adapter to ``model`` (checked against the inputs' base when they name one; a base
        that matches in shapes only needs ``allow_structural``)."""
        from hub.runtime import attach

        return attach(model, self.adapter, name=name, base_fingerprint=self.base, allow_structural=allow_structural)

    def register(
        self,
        hub: Hub | None = None,
        *,
        name: str,
        base: Fingerprint | Any | None = None,
        metrics: Mapping[str, float] | Iterable[Metric] = (),
        tags: Iterable[str] = (),
        description: str | None = None,
    ) -> Registered:
        """Register the merged adapter as a new version of ``name``; the registered inputs become its lineage
        parents, each with its weight, the strategy and its parameters, so the merge can be reproduced."""
        params = {key: self.result.recipe[key] for key in ("rank", "density", "majority_sign", "seed")
                  if self.result.recipe[key] is not None}
        if self.search is not None:  # each parent's edge says its weight was searched, and how
            params["search"] = self.search.settings.to_dict()
        return register_composition(hub, self.adapter, self.members, name=name, strategy=self.strategy, params=params,
                                 recipe=self.recipe, store_members=False, base=base, metrics=metrics, tags=tags,
                                 description=description)
