"""A stack: several adapters of any methods active together, each at its own weight, saved as one artifact."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hub.composition.members import Member, check_distinct, common_base, default_hub, load_members, register_composition
from hub.errors import Incompatible
from hub.formats import Adapter
from hub.formats.composition import STACK_TYPE
from hub.registry import Metric, Registered

if TYPE_CHECKING:
    from torch import nn

    from hub.client import Hub
    from hub.fingerprint import Fingerprint
    from hub.runtime import StackHandle


@dataclass
class Stack:
    """Adapters attached together (e.g. LoRA + IA3 + prompt tuning), each scaled by its weight.

    Attached, each member keeps its own name (``name@number``, or method and digest prefix) so ``gate_context``
    can still route them; the artifact (``to_adapter``) names the members by digest and holds no tensors.
    """

    members: list[Member]

    def __post_init__(self) -> None:
        check_distinct(self.members, "stack")
        common_base(self.members)

    @property
    def base(self) -> Fingerprint | None:
        return common_base(self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "stack", "members": [m.to_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, hub: Hub | None = None) -> Stack:
        return cls(load_members(data["members"], hub=default_hub(hub)))

    def to_adapter(self) -> Adapter:
        """The stack as an artifact (``HUB_STACK``: members by digest, no tensors), for the store and registry."""
        return Adapter(config={"peft_type": STACK_TYPE, "members": [m.to_dict() for m in self.members]}, tensors={})

    @classmethod
    def from_adapter(cls, artifact: Adapter, *, hub: Hub | None = None, base: Fingerprint | None = None,
                     base_name: str | None = None) -> Stack:
        if artifact.method != "stack":
            raise Incompatible(f"a {artifact.method} artifact is not a stack")
        return cls(load_members(artifact.config["members"], hub=default_hub(hub), base=base, base_name=base_name))

    def attach(self, model: nn.Module, *, name: str = "stack", allow_structural: bool = False) -> StackHandle:
        """Attach every member to ``model`` (all or none); ``detach()`` on the handle removes them all. A base
        that matches the members' in shapes only needs ``allow_structural``."""
        from hub.runtime import attach

        handle = attach(model, [m.adapter for m in self.members], name=[m.label for m in self.members],
                        weight=[m.weight for m in self.members], base_fingerprint=self.base,
                        allow_structural=allow_structural)
        handle.name = name
        return handle

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
        """Register the stack as a version of ``name`` (method ``stack``); members given in memory are stored too,
        and the registered ones become its lineage parents with their weights."""
        return register_composition(hub, self.to_adapter(), self.members, name=name, strategy="stack", params={},
                                    recipe=self.to_dict(), store_members=True, base=base, metrics=metrics,
                                    tags=tags, description=description)
