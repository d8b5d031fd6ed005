"""Base-model identity: ``weights_hash`` (exact) and ``shape_hash`` (structural).

Both hashes walk every tensor in name order, whatever file or shard it sits in, so re-sharding a checkpoint or
listing its files in another order changes nothing. Each tensor is fed as the canonical adapter digest feeds it
(``hub.formats.digest.update_with_tensor``: a JSON header ``[name, dtype, shape]`` then the raw little-endian
bytes), which lets a loaded model and the folder it was saved to hash alike.

Folders are hashed straight from the memory-mapped safetensors files (their headers parsed here), never loading
the model; results are cached by each file's (path, size, mtime_ns) in ``<cache_dir>/fingerprints.json``. A cache
that cannot be read or written (a read-only HUB_HOME) is skipped with a logged note: the fingerprint is still
computed. A loaded model is hashed from its tensors (``fingerprint_model``); a quantized one has only a structural
identity of its own (``shape_hash_of`` over its logical shapes), see ``hub.runtime.identify``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from hub.config import load_settings
from hub.errors import Incompatible, InvalidArtifact, NotFound, PermissionDenied
from hub.formats.digest import update_with_tensor
from hub.snapshots import model_files, probe

if TYPE_CHECKING:  # torch costs seconds to import; `hub list` never needs it
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fingerprint:
    """The identity of a base model.

    ``weights_hash``: sha256 over every tensor's name, dtype, shape and bytes in name order (unquantized weights).
    ``shape_hash``: sha256 over names and shapes only; equal shape hashes mean "structurally compatible".
    """

    weights_hash: str
    shape_hash: str
    architecture: str | None = None
    num_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        return cls(
            weights_hash=str(data["weights_hash"]),
            shape_hash=str(data["shape_hash"]),
            architecture=data.get("architecture"),
            num_parameters=int(data.get("num_parameters", 0)),
        )

    def same_weights(self, other: Fingerprint) -> bool:
        return self.weights_hash == other.weights_hash

    def same_shapes(self, other: Fingerprint) -> bool:
        return self.shape_hash == other.shape_hash


CACHE_FILENAME = "fingerprints.json"
# Bump when the hashing changes, so old cache entries are not trusted.
_CACHE_VERSION = 1
_CHUNK = 64 << 20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype code -> (torch dtype name as update_with_tensor writes it, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "C64": ("complex64", 8),
}


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: list[int]
    numel: int
    file: int
    start: int
    end: int


def fingerprint(
    model_or_path: str | os.PathLike[str] | torch.nn.Module,
    *,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> Fingerprint:
    """Fingerprint a safetensors folder or file, a loaded (unquantized) torch model, or a Hub model id
    ``ORG/NAME[@REVISION]`` (downloaded into HUB_HOME's cache like ``from_pretrained`` does, see
    ``hub.snapshots``).

    Raises NotFound, InvalidArtifact, PermissionDenied, RemoteError (a download failed), Incompatible (a
    bitsandbytes model: use ``hub.runtime.identify``)."""
    loaded_torch = sys.modules.get("torch")  # a torch model can only exist once torch is imported
    if loaded_torch is not None and isinstance(model_or_path, loaded_torch.nn.Module):
        return fingerprint_model(model_or_path)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise InvalidArtifact(
            f"cannot fingerprint a {type(model_or_path).__name__}: pass a path, a model id or a torch model"
        )
    path = model_files(model_or_path, cache_dir=cache_dir)
    return fingerprint_path(path, progress=progress, cache_dir=cache_dir)


def fingerprint_path(
    path: str | os.PathLike[str],
    *,
    progress: bool = False,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> Fingerprint:
    """Fingerprint a folder of safetensors files (one or many shards) or a single ``.safetensors`` file.

    The weights are streamed from memory-mapped files. ``use_cache=False`` rehashes and leaves the cache untouched.
    Raises NotFound (no such path, no safetensors in the folder), InvalidArtifact (not a folder or a safetensors
    file, malformed headers), PermissionDenied.
    """
    path = Path(path).expanduser()
    if not probe(path):
        raise NotFound(f"no model at {path}")
    with _permission_errors():
        files = weight_files(path)
        config = (path if path.is_dir() else path.parent) / "config.json"
        # config.json is part of the key: the architecture comes from it.
        stats = [_stat(f) for f in (*files, config) if f.is_file()]
        cache_file = (Path(cache_dir) if cache_dir is not None else load_settings().cache_dir) / CACHE_FILENAME
        key = str(path.resolve())
        if use_cache:
            cached = _cache_get(cache_file, key, stats)
            if cached is not None:
                return cached
        weights_hash, shape_hash, num_parameters = _hash_files(files, progress=progress, label=path.name)
    result = Fingerprint(weights_hash, shape_hash, _architecture(config), num_parameters)
    if use_cache:
        _cache_put(cache_file, key, stats, result)
    return result


def fingerprint_model(model: torch.nn.Module) -> Fingerprint:
    """Fingerprint a loaded model on the tensors ``save_pretrained`` would write (tied weights once).

    The tensors are hashed in the dtype the model holds them: a float32 folder loaded as bfloat16 hashes apart.

    A model that carries ``hub_fingerprint`` (set by the loader from the folder, before quantizing) returns it.
    """
    carried = getattr(model, "hub_fingerprint", None)
    if isinstance(carried, Fingerprint):
        return carried
    if any(type(module).__module__.startswith("bitsandbytes") for module in model.modules()):
        raise Incompatible(
            f"{type(model).__name__} is quantized with bitsandbytes, so its weights cannot be hashed: use"
            " hub.runtime.identify(model) (it finds the folder the model was loaded from), or fingerprint that folder"
        )
    state = saved_state_dict(model)
    weights = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if tensor.device.type == "meta":
            raise Incompatible(f"tensor {name} of {type(model).__name__} is not materialized (meta device)")
        update_with_tensor(weights, name, tensor)
    shapes = {name: list(tensor.shape) for name, tensor in state.items()}
    return Fingerprint(weights.hexdigest(), shape_hash_of(shapes.items()), type(model).__name__,
                       sum(tensor.numel() for tensor in state.values()))


def shape_hash_of(shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """The ``shape_hash`` of tensors given as (name, shape) pairs, in any order: what a folder with these tensors
    would hash to. Lets a quantized model (whose packed weights have other shapes) state its logical shapes."""
    digest = hashlib.sha256()
    for name, shape in sorted((name, [int(d) for d in shape]) for name, shape in shapes):
        digest.update(_shape_header(name, shape))
    return digest.hexdigest()


def saved_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from transformers import PreTrainedModel

    state = model.state_dict()
    if isinstance(model, PreTrainedModel):
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        # The same steps save_pretrained takes before writing, so a model and its saved folder agree
        # (a tied lm_head is dropped in favour of the embedding it shares storage with).
        for key in model._keys_to_ignore_on_save or ():
            state.pop(key, None)
        state = remove_tied_weights_from_state_dict(state, model)
        return revert_weight_conversion(model, state)
    # A plain module: tensors sharing storage (tied) count once, under the first of their names.
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for name in sorted(state):
        tensor = state[name]
        alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if alias not in seen:
            seen.add(alias)
            kept[name] = tensor
    return kept


@contextmanager
def _permission_errors():
    """An unreadable file or folder is a one-line PermissionDenied, naming it."""
    try:
        yield
    except PermissionError as exc:
        raise PermissionDenied(f"cannot read {exc.filename or 'the model'}: permission denied") from None


def weight_files(path: Path) -> list[Path]:
    if not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
        raise InvalidArtifact(f"{path} is not a model folder or a .safetensors file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InvalidArtifact(f"{path} is not a .safetensors file (only safetensors weights are read)")
        return [path]
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    index = path / _INDEX_NAME
    if index.is_file():
        # Some repos ship a second copy of the weights beside the shards (Mistral's consolidated.safetensors);
        # the transformers index names the files that make up the model.
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise InvalidArtifact(f"{index} is not a valid safetensors index: {error}") from error
        missing = sorted(n for n in names if not (path / n).is_file())
        if missing:
            raise InvalidArtifact(f"{path} is missing shards named in its index: {', '.join(missing)}")
        files = sorted(path / n for n in names)
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise InvalidArtifact(
                f"{path} holds only pickle weights ({', '.join(pickles)}); never unpickled: convert to safetensors"
            )
        raise NotFound(f"no .safetensors weights in {path}")
    return files


def _read_header(file: Path, index: int) -> list[_Entry]:
    size = file.stat().st_size
    with open(file, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise InvalidArtifact(f"{file} is not a safetensors file (too short)")
        header_len = int.from_bytes(raw, "little")
        if header_len > size - 8:
            raise InvalidArtifact(f"{file} is not a safetensors file (header length {header_len} past the end)")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as error:
            raise InvalidArtifact(f"{file} has an unreadable safetensors header: {error}") from error
    if not isinstance(header, dict):
        raise InvalidArtifact(f"{file} has a safetensors header that is not a JSON object")
    base = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, itemsize = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (base + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArtifact(f"{file}: tensor {name} has an invalid or unsupported header entry") from error
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * itemsize or not base <= start <= end <= size:
            raise InvalidArtifact(f"{file}: tensor {name} has data offsets that do not match its shape")
        entries.append(_Entry(name, dtype, shape, numel, index, start, end))
    return entries


def _hash_files(files: list[Path], *, progress: bool, label: str) -> tuple[str, str, int]:
    entries: dict[str, _Entry] = {}
    for index, file in enumerate(files):
        for entry in _read_header(file, index):
            if entry.name in entries:
                raise InvalidArtifact(f"tensor {entry.name} appears in both {files[entries[entry.name].file].name}"
                                      f" and {file.name}")
            entries[entry.name] = entry
    weights, shapes = hashlib.sha256(), hashlib.sha256()
    num_parameters = 0
    total = sum(e.end - e.start for e in entries.values())
    maps = _open_maps(files)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"fingerprint {label}",
                  disable=not progress) as bar:
            for name in sorted(entries):
                entry = entries[name]
                # The same header encoding as update_with_tensor, then the bytes exactly as stored (little-endian).
                weights.update(json.dumps([name, entry.dtype, entry.shape]).encode())
                shapes.update(_shape_header(name, entry.shape))
                view = maps[entry.file][1]
                for offset in range(entry.start, entry.end, _CHUNK):
                    stop = min(offset + _CHUNK, entry.end)
                    with view[offset:stop] as chunk:
                        weights.update(chunk)
                    bar.update(stop - offset)
                num_parameters += entry.numel
    finally:
        for mapped, view in maps:
            view.release()
            mapped.close()
    return weights.hexdigest(), shapes.hexdigest(), num_parameters


def _open_maps(files: list[Path]) -> list[tuple[mmap.mmap, memoryview]]:
    maps = []
    for file in files:
        with open(file, "rb") as handle:
            # File-backed pages: read in as they are hashed, dropped by the OS under pressure (no copy in RAM).
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        maps.append((mapped, memoryview(mapped)))
    return maps


def _shape_header(name: str, shape: list[int]) -> bytes:
    return json.dumps([name, shape]).encode()


def _architecture(config: Path) -> str | None:
    try:
        architectures = json.loads(config.read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return str(architectures[0]) if isinstance(architectures, list) and architectures else None


def _stat(file: Path) -> list[Any]:
    resolved = file.resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


def _cache_read(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):  # missing, unreadable or corrupt: a miss, never an error
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _cache_get(cache_file: Path, key: str, stats: list[list[Any]]) -> Fingerprint | None:
    entry = _cache_read(cache_file).get(key)
    if not isinstance(entry, dict) or entry.get("files") != stats:
        return None
    try:
        return Fingerprint.from_dict(entry["fingerprint"])
    except (KeyError, TypeError, ValueError):
        return None


def _cache_put(cache_file: Path, key: str, stats: list[list[Any]], result: Fingerprint) -> None:
    entries = _cache_read(cache_file)
    entries[key] = {"files": stats, "fingerprint": result.to_dict()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write beside and rename: a reader sees the old cache or the new one, never a torn file. Two writers
        # racing can lose one entry, which only costs a rehash later.
        fd, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=cache_file.parent)
    except OSError as exc:
        # A read-only HUB_HOME (or a full disk) costs the cache, not the answer.
        log.warning("fingerprint not cached (%s: %s)", cache_file.parent, exc.strerror or exc)
        return
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": _CACHE_VERSION, "entries": entries}, handle)
        os.replace(temp, cache_file)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        log.warning("fingerprint not cached (%s: %s)", cache_file, exc.strerror or exc)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
