"""Whether an adapter fits a base, checked on shapes rather than claimed: each method says which base tensors it
needs in which shapes (``Method.needs``), and the base's shapes come from its safetensors headers (no weights are
read) or a loaded model. A needed tensor the base does not store is not judged (a tied ``lm_head`` is saved only as
the embedding it shares).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.errors import Incompatible, InvalidArtifact
from hub.methods.table import lookup

if TYPE_CHECKING:
    from hub.formats import Adapter

Shapes = dict[str, tuple[int, ...]]


def header_shapes(file: Path) -> Shapes:
    """The tensor shapes a safetensors file's header declares. Raises InvalidArtifact on a malformed header."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if size > os.path.getsize(file) - 8:
            raise InvalidArtifact(f"{file} is not a safetensors file (header length past the end)")
        try:
            header = json.loads(handle.read(size))
            return {name: tuple(int(d) for d in info["shape"]) for name, info in header.items()
                    if name != "__metadata__"}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidArtifact(f"{file} has an unreadable safetensors header ({exc})") from None


def base_shapes(base: Any, *, cache_dir: Path | None = None) -> Shapes | None:
    """The tensor shapes of a base: a folder, a ``.safetensors`` file or a Hub id (headers only), or a loaded
    unquantized model. None when they cannot be known (a bare fingerprint, a quantized model)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(base, torch.nn.Module):
        if any(type(module).__module__.startswith("bitsandbytes") for module in base.modules()):
            return None  # packed weights: their stored shapes are not the logical ones
        from hub.fingerprint import saved_state_dict

        return {name: tuple(tensor.shape) for name, tensor in saved_state_dict(base).items()}
    if not isinstance(base, (str, os.PathLike)):
        return None
    from hub.fingerprint import weight_files
    from hub.snapshots import model_files

    shapes: Shapes = {}
    for file in weight_files(model_files(base, cache_dir=cache_dir)):
        shapes.update(header_shapes(file))
    return shapes


def fit_problems(config: Mapping[str, Any], adapter_shapes: Mapping[str, tuple[int, ...]],
                 base: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Why an adapter (its config and tensor shapes by file key) does not fit a base of ``base`` shapes."""
    problems = []
    needs = lookup(config.get("peft_type")).needs(config, adapter_shapes)
    # Embeddings first: a vocabulary that differs explains every other mismatch (the output head's too).
    for need in sorted(needs, key=lambda need: need.what != "embedding"):
        have = base.get(need.key)
        problem = None if have is None else need.problem(have)
        if problem is not None and problem not in problems:
            problems.append(problem)
    return problems


def check_fit(adapter: Adapter, base: Any, *, cache_dir: Path | None = None) -> None:
    """Refuse an adapter whose tensors do not fit ``base``'s shapes (one line, the first reason).

    Raises Incompatible: ``adapter does not fit this base: needs a 136-row embedding at model.embed_tokens, the
    base has 128: resized vocabulary?``.
    """
    shapes = base_shapes(base, cache_dir=cache_dir)
    if shapes is None:
        return
    problems = fit_problems(adapter.config, {key: tuple(t.shape) for key, t in adapter.tensors.items()}, shapes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise Incompatible(f"adapter does not fit this base: {problems[0]}{more}")


def stored_fit(base: Any, artifact_folder: Callable[[str], Path], *,
               cache_dir: Path | None = None) -> Callable[[str], bool]:
    """A test of whether the stored artifact of a digest fits ``base`` (its config and safetensors header only);
    an artifact not in this store, or a base whose shapes cannot be known, passes."""
    shapes = base_shapes(base, cache_dir=cache_dir)

    def fits(digest: str) -> bool:
        folder = artifact_folder(digest)
        if shapes is None or not (folder / "adapter_model.safetensors").is_file():
            return True
        config = json.loads((folder / "adapter_config.json").read_text())
        return not fit_problems(config, header_shapes(folder / "adapter_model.safetensors"), shapes)

    return fits
