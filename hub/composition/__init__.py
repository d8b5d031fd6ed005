"""Compositions of adapters: weighted sums merged into one adapter, stacks, gated mixtures, and the front door
``compose`` (also ``from hub import compose``):

>>> from hub import compose
>>> merged = compose(["math@2", "code"], weights=[0.7, 0.3])
>>> learned = compose(["math@2", "code", "chat"], weights="auto", examples=few)  # LoraHub-style search
"""

from hub.composition.api import Active, Composition, activate, compose
from hub.composition.auto import SearchConfig
from hub.composition.members import Member
from hub.composition.mixture import FitResult, Mixture, MixtureHandle
from hub.composition.router import RouterConfig
from hub.composition.stack import Stack
from hub.composition.weighted import WeightedSum

__all__ = [
    "Active",
    "Composition",
    "FitResult",
    "Member",
    "Mixture",
    "MixtureHandle",
    "RouterConfig",
    "SearchConfig",
    "Stack",
    "WeightedSum",
    "activate",
    "compose",
]
