"""One module per adaptation method: how its tensors act on a model, and (where the algebra allows) its delta.

Every method module exposes ``attach(model, adapter, *, name, weight=1.0) -> Handle``; hub.runtime dispatches to it.
The handles of trainable methods also have ``trainable_parameters()`` and ``to_adapter()``, and their modules a
``new_adapter(model, *, ...)`` constructor that initializes a fresh adapter as PEFT does (``hub.train`` picks one by
``Recipe.method``).
"""
