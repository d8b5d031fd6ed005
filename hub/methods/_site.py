"""Methods that act at linear/embedding sites (``hub.sites``): attaching one builds its deltas, then wraps them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.methods.base import Method
from hub.sites import Delta, SiteHandle, attach_deltas

if TYPE_CHECKING:
    from torch import nn

    from hub.formats import Adapter


class SiteMethod(Method):
    """A method whose adapters are deltas at sites: attachable, mergeable into base weights, stackable."""

    attachable = True
    mergeable = True
    stackable = True

    def build(self, model: nn.Module, adapter: Adapter) -> dict[str, Delta]:
        """Validate ``adapter`` against ``model`` and build its deltas per module path; the model is not touched."""
        raise NotImplementedError

    def attach(self, model: nn.Module, adapter: Adapter, *, name: str, weight: float = 1.0) -> SiteHandle:
        """Wrap the adapter's modules (never modifying them) and add its deltas, modules_to_save swapped in."""
        return attach_deltas(model, self.build(model, adapter), adapter=adapter, name=name, weight=weight)
