"""One module per adaptation method: how its tensors act on a model, and (where the algebra allows) its delta.

Every method module exposes ``attach(model, adapter, *, name, weight=1.0) -> Handle``; hub.runtime dispatches to it.
"""
