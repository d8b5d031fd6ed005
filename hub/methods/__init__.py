"""Adaptation methods: one object per PEFT type, in one table (``hub.methods.table``; docs/methods.md lists it).

A method (``hub.methods.base.Method``) owns its typed config, the validation of its tensors, what the registry
indexes about it, the base shapes it needs, how it attaches (building deltas on ``hub.sites``), its merge algebra
where one exists, its fresh initialization and its default training recipe. ``adapter.kind`` is an adapter's
method; formats, runtime, composition and training ask it and never branch on a method's name.
"""

from hub.methods.base import Method, Need
from hub.methods.table import all_methods, lookup, peft_types, trainer

__all__ = ["Method", "Need", "all_methods", "lookup", "peft_types", "trainer"]
