"""Model cards: written for the Hub on push, read as untrusted input on pull.

A card is a README.md whose YAML front matter follows Hub conventions (``base_model``, ``library_name``,
``model-index``) and carries the hub's own metadata under ``adapter_hub``: digest, base fingerprint, method, rank,
metrics, lineage. On pull that text comes from a server the hub does not control, so it is parsed under limits
(size, node count with aliases expanded, nesting depth) before any Python object is built, then validated into a
``RemoteCard``; nothing else of the card reaches the registry.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCardData
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.resolver import Resolver

from hub.errors import InvalidArtifact
from hub.fingerprint import Fingerprint
from hub.formats.spec import METHOD_TO_PEFT_TYPE
from hub.methods.table import lookup
from hub.registry import Metric, Parent, VersionInfo
from hub.registry.refs import INT32_MAX, NAME
from hub.remote.paths import is_hub_model_id
from hub.secrets import scrub

log = logging.getLogger("hub.remote")

CARD_NAME = "README.md"
MAX_CARD_BYTES = 1 << 20
MAX_YAML_NODES = 20_000  # counted with every alias expanded, so an alias bomb counts at its full size
MAX_YAML_DEPTH = 32
DIGEST = re.compile(r"^[0-9a-f]{64}$")
# PEFT's task_type → the Hub's task id, for the card's model-index.
HUB_TASKS = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation",
             "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification",
             "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction"}
_FRONT_MATTER = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_CLAIMS_HUB_CARD = re.compile(r"(?m)^adapter_hub\s*:")


@dataclass(frozen=True)
class RemoteCard:
    """What a pull takes from a model card, type-checked.

    ``hub_card``: the card has an ``adapter_hub`` section (then ``digest`` is a valid sha256). A plain PEFT card
    contributes ``base_model`` only.
    """

    hub_card: bool
    base_model: str | None = None
    name: str | None = None
    number: int | None = None
    digest: str | None = None
    method: str | None = None
    rank: int | None = None
    base: Fingerprint | None = None
    metrics: tuple[Metric, ...] = ()
    lineage: tuple[Parent, ...] = ()
    tags: tuple[str, ...] = ()
    recipe: dict[str, Any] | None = field(default=None, hash=False)


# ----------------------------------------------------------------------------------------------------- reading
class _LimitedComposer(Composer):
    """PyYAML's composer, counting nodes (an alias at the size of what it points at) and nesting depth as the
    node graph is built, so a hostile document is refused before any Python object exists."""

    def __init__(self) -> None:
        Composer.__init__(self)
        self._depth = 0
        self._composed = 0
        self._sizes: dict[int, int] = {}  # id(node) -> node count with aliases expanded, once the node is complete

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(self.peek_event().anchor)
            if target is not None and id(target) not in self._sizes:
                raise InvalidArtifact("model card YAML has an alias inside the node it refers to")
            return Composer.compose_node(self, parent, index)
        self._depth += 1
        self._composed += 1
        if self._depth > MAX_YAML_DEPTH:
            raise InvalidArtifact(f"model card YAML is nested deeper than {MAX_YAML_DEPTH} levels")
        if self._composed > MAX_YAML_NODES:
            raise InvalidArtifact(f"model card YAML has more than {MAX_YAML_NODES} nodes")
        node = Composer.compose_node(self, parent, index)
        self._depth -= 1
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_YAML_NODES:
            raise InvalidArtifact(f"model card YAML has more than {MAX_YAML_NODES} nodes once its aliases are "
                                  "expanded")
        self._sizes[id(node)] = size
        return node


try:  # libyaml's parser when present (much faster), with the Python composer above on its events
    from yaml._yaml import CParser

    class _CardLoader(CParser, _LimitedComposer, SafeConstructor, Resolver):
        get_single_node = Composer.get_single_node  # CParser's own would compose in C, past the limits

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            _LimitedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

except ImportError:  # pragma: no cover - PyYAML without libyaml
    class _CardLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser,  # type: ignore[no-redef]
                      _LimitedComposer, SafeConstructor, Resolver):
        def __init__(self, text: str) -> None:
            yaml.reader.Reader.__init__(self, text)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            _LimitedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


def load_yaml(text: str) -> Any:
    """Parse untrusted YAML under the node and depth limits (InvalidArtifact naming the limit); malformed YAML
    raises ``yaml.YAMLError`` or ``ValueError``."""
    loader = _CardLoader(text)
    try:
        node = loader.get_single_node()
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def read_card(path: Path, where: str) -> RemoteCard | None:
    """The card at ``path`` (None when there is none, or a plain card that cannot be read: a warning says so).

    Raises InvalidArtifact (one line, prefixed with ``where``) for a card over a limit, and for a hub card (one
    with an ``adapter_hub`` section) that is malformed or has any field of the wrong type.
    """
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_CARD_BYTES:
        raise InvalidArtifact(f"{where}: {CARD_NAME} is larger than the {MAX_CARD_BYTES >> 20} MiB limit for model "
                              "cards")
    try:
        return parse_card(path.read_bytes().decode("utf-8"), where)
    except UnicodeDecodeError:
        log.warning("%s", scrub(f"{where}: {CARD_NAME} is not UTF-8 text; its card is ignored"))
        return None


def parse_card(text: str, where: str) -> RemoteCard | None:
    """See ``read_card``."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CARD_BYTES:
        raise InvalidArtifact(f"{where}: the model card is larger than the {MAX_CARD_BYTES >> 20} MiB limit")
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None
    front = match.group(2)
    claims_hub_card = bool(_CLAIMS_HUB_CARD.search(front))
    try:
        data = load_yaml(front)
    except InvalidArtifact as exc:
        raise InvalidArtifact(f"{where}: {exc}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        problem = _first_line(exc)
        if claims_hub_card:
            raise InvalidArtifact(scrub(f"{where}: the model card's YAML is malformed ({problem})")) from None
        log.warning("%s", scrub(f"{where}: the model card's YAML is malformed ({problem}); the card is ignored"))
        return None
    if not isinstance(data, dict):
        if claims_hub_card:
            raise InvalidArtifact(f"{where}: the model card's YAML is a {_kind(data)}, not a mapping")
        log.warning("%s", scrub(f"{where}: the model card's YAML is a {_kind(data)}, not a mapping; the card is "
                                "ignored"))
        return None
    base_model = data.get("base_model")
    if base_model is not None and not (isinstance(base_model, str) and is_hub_model_id(base_model)):
        log.warning("%s", scrub(f"{where}: the card's base_model is not one Hub model id; it is ignored"))
        base_model = None
    if "adapter_hub" not in data:
        return RemoteCard(hub_card=False, base_model=base_model)
    try:
        return _hub_card(data["adapter_hub"], base_model)
    except _FieldError as exc:
        raise InvalidArtifact(scrub(f"{where}: model card field adapter_hub{exc.path}: {exc.problem}")) from None


class _FieldError(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _hub_card(section: Any, base_model: str | None) -> RemoteCard:
    section = _mapping(section, "")
    digest = _optional(section, "digest", str, "")
    if digest is None or not DIGEST.fullmatch(digest) or digest == "0" * 64:
        raise _FieldError(".digest", "missing or not a sha256 digest (64 lowercase hex digits); the card vouches "
                                     "for nothing")
    name = _optional(section, "name", str, "")
    if name is not None and not NAME.fullmatch(name):
        raise _FieldError(".name", f"{name[:80]!r} is not an adapter name")
    number = _optional(section, "number", int, "")
    if number is not None and not 1 <= number <= INT32_MAX:
        raise _FieldError(".number", f"{number} is not a version number (1 to {INT32_MAX})")
    rank = _optional(section, "rank", int, "")
    recipe = _optional(section, "recipe", dict, "")
    if recipe is not None:
        _plain_json(recipe, ".recipe")
    return RemoteCard(
        hub_card=True, base_model=base_model, name=name, number=number, digest=digest,
        method=_optional(section, "method", str, ""), rank=rank, base=_fingerprint(section.get("base")),
        metrics=tuple(_metric(m, f".metrics[{i}]") for i, m in enumerate(_list(section, "metrics"))),
        lineage=tuple(_parent(p, f".lineage[{i}]") for i, p in enumerate(_list(section, "lineage"))),
        tags=tuple(_string(t, f".tags[{i}]") for i, t in enumerate(_list(section, "tags"))),
        recipe=recipe,
    )


def _fingerprint(value: Any) -> Fingerprint | None:
    if value is None:
        return None
    base = _mapping(value, ".base")
    weights_hash = _optional(base, "weights_hash", str, ".base")
    shape_hash = _optional(base, "shape_hash", str, ".base")
    if not weights_hash and not shape_hash:
        return None
    for key, text in (("weights_hash", weights_hash), ("shape_hash", shape_hash)):
        if text and not DIGEST.fullmatch(text):
            raise _FieldError(f".base.{key}", "not a sha256 digest (64 lowercase hex digits)")
    num_parameters = _optional(base, "num_parameters", int, ".base")
    return Fingerprint(weights_hash=weights_hash or "", shape_hash=shape_hash or "",
                       architecture=_optional(base, "architecture", str, ".base"),
                       num_parameters=num_parameters or 0)


def _metric(value: Any, path: str) -> Metric:
    entry = _mapping(value, path, allowed={"key", "value", "dataset", "split"})
    key = _optional(entry, "key", str, path)
    number = _optional(entry, "value", float, path)
    if key is None or number is None:
        raise _FieldError(path, "a metric needs a key and a value")
    return Metric(key=key, value=number, dataset=_optional(entry, "dataset", str, path),
                  split=_optional(entry, "split", str, path))


def _parent(value: Any, path: str) -> Parent:
    entry = _mapping(value, path, allowed={"name", "number", "digest", "weight", "strategy", "params"})
    name, number = _optional(entry, "name", str, path), _optional(entry, "number", int, path)
    if name is None or number is None:
        raise _FieldError(path, "a lineage entry needs a name and a number")
    if not NAME.fullmatch(name) or not 1 <= number <= INT32_MAX:
        raise _FieldError(path, f"{name[:80]!r}@{number} is not a version reference")
    digest = _optional(entry, "digest", str, path)
    if digest is not None and not DIGEST.fullmatch(digest):
        raise _FieldError(f"{path}.digest", "not a sha256 digest (64 lowercase hex digits)")
    params = _optional(entry, "params", dict, path) or {}
    _plain_json(params, f"{path}.params")
    return Parent(name=name, number=number, digest=digest, weight=_optional(entry, "weight", float, path),
                  strategy=_optional(entry, "strategy", str, path), params=params)


def _mapping(value: Any, path: str, allowed: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _FieldError(path, f"expected a mapping, got {_kind(value)}")
    if allowed is not None:
        extra = sorted(str(k)[:40] for k in value if k not in allowed)
        if extra:
            raise _FieldError(path, f"unexpected keys {', '.join(extra[:5])} (allowed: {', '.join(sorted(allowed))})")
    return value


def _optional(data: dict[str, Any], key: str, kind: type, path: str) -> Any:
    """``data[key]`` if absent/None (→ None) or of ``kind`` (float accepts whole numbers; bool is never a number)."""
    value = data.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise _FieldError(f"{path}.{key}", f"expected {_KIND_NAMES[kind]}, got {_kind(value)}")
    if kind is float and not math.isfinite(value):
        raise _FieldError(f"{path}.{key}", "not a finite number")
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _FieldError(f".{key}", f"expected a list, got {_kind(value)}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _FieldError(path, f"expected a string, got {_kind(value)}")
    return value


def _plain_json(value: Any, path: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _FieldError(path, f"not plain JSON ({_first_line(exc)})") from None


_KIND_NAMES = {str: "a string", int: "a whole number", float: "a number", dict: "a mapping", list: "a list"}


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", int: "whole number", float: "number", bool: "boolean",
            type(None): "nothing"}.get(type(value), type(value).__name__)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------------------- writing
def model_card(version: VersionInfo, *, repo_id: str, base_model: str | None = None) -> str:
    """A Hub model card whose YAML carries everything a pull needs to rebuild the registry entry.

    ``base_model`` is a Hub model id; without it, the version's base name when that is a Hub id and not a folder
    on this machine. A local path never reaches the card.
    """
    if base_model is None and is_hub_model_id(version.base_name):
        base_model = version.base_name
    # The hub's own formats (Method.peft_loadable) get the hub's loading snippet, not PEFT's.
    peft_format = lookup(version.config.get("peft_type")).peft_loadable
    tags = ["adapter-hub", version.method, *version.tags]
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")
    metadata: dict[str, Any] = {
        "name": version.name, "number": version.number, "digest": version.digest, "method": version.method,
        "rank": version.rank, "alpha": version.alpha, "targets": list(version.targets),
        "metrics": [{"key": m.key, "value": m.value, "dataset": m.dataset, "split": m.split}
                    for m in version.metrics],
        "lineage": [{"name": p.name, "number": p.number, "digest": p.digest, "weight": p.weight,
                     "strategy": p.strategy, "params": p.params} for p in version.parents],
        "tags": list(version.tags),
    }
    if version.recipe is not None:
        metadata["recipe"] = version.recipe
    if version.base is not None:
        metadata["base"] = {"weights_hash": version.base.weights_hash, "shape_hash": version.base.shape_hash,
                            "architecture": version.base.architecture,
                            "num_parameters": version.base.num_parameters}
    # The Hub's model-index needs a dataset per result: metrics measured on no named dataset stay in the table.
    task = HUB_TASKS.get(str(version.config.get("task_type")), "text-generation")
    eval_results = [EvalResult(task_type=task, dataset_type=m.dataset, dataset_name=m.dataset,
                               dataset_split=m.split, metric_type=m.key, metric_value=m.value)
                    for m in version.metrics if m.dataset]
    data = ModelCardData(base_model=base_model, library_name="peft" if peft_format else None, tags=tags,
                         eval_results=eval_results or None, model_name=version.name if eval_results else None,
                         adapter_hub=metadata)
    if base_model:
        data.base_model_relation = "adapter"
    metric_lines = "\n".join(f"| {m.key} | {m.value:.4g} | {m.dataset or ''} | {m.split or ''} |"
                             for m in version.metrics) or "| (none) | | | |"
    kind = f"{version.method} adapter" + (f" (rank {version.rank})" if version.rank else "")
    on = f"`{base_model}`" if base_model else "a base model not published on the Hub"
    body = (
        f"# {version.name} (version {version.number})\n\n"
        f"A {kind} on {on}, published with adapter hub.\n\n"
        f"```python\n{_loading_snippet(version, repo_id, peft_format)}\n```\n\n"
        f"| metric | value | dataset | split |\n| --- | --- | --- | --- |\n{metric_lines}\n\n"
        f"Artifact digest: `{version.digest}`\n"
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _loading_snippet(version: VersionInfo, repo_id: str, peft_format: bool) -> str:
    if peft_format:
        return (f"from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"{repo_id}\", "
                f"revision=\"v{version.number}\")")
    members = ("\n# a stack or mixture names its members by digest: pull them too"
               if version.method in ("stack", "mixture") else "")
    return (f"# {METHOD_TO_PEFT_TYPE.get(version.method, version.method)} is adapter hub's own format: "
            f"PEFT cannot load it{members}\n"
            "from hub import Hub, activate\nfrom hub.remote import Remote\n\nhub = Hub()\n"
            f"pulled = Remote(hub).pull(\"{repo_id}\", \"v{version.number}\")\n"
            "handle = activate(base_model, pulled.version.ref, hub=hub)")
