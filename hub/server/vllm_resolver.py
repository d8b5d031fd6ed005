"""A vLLM LoRA resolver: vLLM serves ``model: "date@prod"`` straight from the hub's registry.

vLLM asks its registered resolvers whenever a request names a model it does not know
(vllm/entrypoints/openai/models/serving.py). This one looks the name up in the registry (HUB_HOME /
HUB_DATABASE_URL, as every hub command), exports the version as a plain LoRA (``hub.export_vllm``) into a cache
folder keyed by its digest (a digest's content never changes, so an export is made once) and hands vLLM a
``LoRARequest`` for it. Names the registry does not know, and versions vLLM cannot serve (DoRA, mixtures, other
methods: logged with the reason), resolve to None, so vLLM answers 404 or tries its next resolver.

Installed as the ``vllm.general_plugins`` entry point ``adapter_hub`` (pyproject.toml): run vLLM with
``--enable-lora --max-lora-rank R`` (R at least the exports' rank) and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
``HUB_VLLM_CACHE`` sets the export folder (default HUB_HOME/cache/vllm). Which base vLLM serves is checked by
name: a version is served when its recorded base name equals vLLM's model, or when ``HUB_VLLM_BASE`` names a local
folder whose fingerprint equals the version's base.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.errors import HubError, NotFound, QueryError

if TYPE_CHECKING:
    from hub.client import Hub

log = logging.getLogger(__name__)
RESOLVER_NAME = "adapter-hub"


def register() -> None:
    """vLLM's plugin hook (called once per vLLM process): register the registry resolver."""
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_resolver())


def make_resolver(hub: Hub | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """A ``vllm.lora.resolver.LoRAResolver`` over ``hub`` (default: ``Hub()`` on first use)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class RegistryResolver(LoRAResolver):
        """Registry references → exported plain LoRAs (see the module docstring)."""

        def __init__(self) -> None:
            self._hub = hub
            self._cache_dir = Path(cache_dir) if cache_dir is not None else None
            self._lock = asyncio.Lock()

        @property
        def hub(self) -> Hub:
            if self._hub is None:
                from hub.client import Hub

                self._hub = Hub()
            return self._hub

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            async with self._lock:  # one export at a time; a second request for it finds it done
                path = await asyncio.to_thread(export_path, self.hub, base_model_name, lora_name, self._cache_dir)
            if path is None:
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=_stable_id(path.name), lora_path=str(path),
                               base_model_name=base_model_name)

    return RegistryResolver()


def export_path(hub: Hub, base_model_name: str, lora_name: str, cache_dir: Path | None = None) -> Path | None:
    """The folder holding ``lora_name``'s export for vLLM's model ``base_model_name`` (made on first use), or None
    when the registry has no such version, it is for another base, or vLLM cannot serve it (logged)."""
    from hub.export_vllm import export_for_vllm

    try:
        version = hub.get(lora_name)
    except (NotFound, QueryError):
        return None
    if not _same_base(hub, version, base_model_name):
        log.warning("%s is registered on base %s, not on vLLM's %s: not served", version.ref,
                    version.base_name or "(unknown)", base_model_name)
        return None
    root = cache_dir or Path(os.environ.get("HUB_VLLM_CACHE") or hub.settings.cache_dir / "vllm")
    # Keyed by content and by the base name written into the export's config.
    target = root / f"{version.digest[:32]}-{re.sub(r'[^A-Za-z0-9._-]+', '_', base_model_name)[:80]}"
    if (target / "adapter_config.json").is_file():
        return target
    try:
        result = export_for_vllm(hub, version.ref, target, base_model=base_model_name)
    except HubError as exc:
        log.warning("not served through vLLM: %s", exc)
        return None
    log.info("exported %s for vLLM at rank %d into %s", version.ref, result.rank, target)
    return target


def _same_base(hub: Hub, version: Any, base_model_name: str) -> bool:
    folder = os.environ.get("HUB_VLLM_BASE")
    if folder and version.base is not None:
        return hub.fingerprint(folder).weights_hash == version.base.weights_hash
    return version.base_name == base_model_name


def _stable_id(name: str) -> int:
    """A positive id from the export's folder name (vLLM replaces it with its own counter; it must be ≥ 1)."""
    return int(name[:15], 16) + 1
