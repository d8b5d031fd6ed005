"""Model cards are untrusted input: fuzzed cards either validate into a RemoteCard or raise a HubError, and a pull
that fails writes nothing to the registry or the store."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
import yaml
from hubserver import HubServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_remote_hostile import BASE, TOKEN, peft_files, tiny_lora

from hub.client import Hub
from hub.errors import HubError
from hub.formats import adapter_digest
from hub.registry import Metric
from hub.remote import Remote, RemoteCard, model_card
from hub.remote.cards import parse_card

DIGEST = "ab" * 32
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=12)
metric = st.fixed_dictionaries({"key": st.sampled_from(["accuracy", "f1"]) | values,
                                "value": st.floats(allow_nan=True) | values},
                               optional={"dataset": values, "split": values, "extra": values})
parent = st.fixed_dictionaries({"name": st.just("p") | values, "number": st.integers(-1, 3) | values},
                               optional={"digest": st.just(DIGEST) | values, "weight": values,
                                         "params": values, "evil": values})
section = st.fixed_dictionaries({}, optional={
    "name": st.just("fuzzed") | values, "number": st.integers(-1, 5) | values,
    "digest": st.just(DIGEST) | values, "method": values, "rank": values,
    "metrics": st.lists(metric, max_size=3) | values, "lineage": st.lists(parent, max_size=2) | values,
    "tags": st.lists(st.text(max_size=8), max_size=3) | values, "recipe": values,
    "base": st.fixed_dictionaries({}, optional={"weights_hash": st.just("1" * 64) | values,
                                                "shape_hash": st.just("2" * 64) | values,
                                                "num_parameters": values}) | values,
})
front_matter = st.fixed_dictionaries({}, optional={"adapter_hub": section | values, "base_model": values,
                                                   "library_name": values})


def as_card(data: object) -> str:
    return "---\n" + yaml.safe_dump(data, allow_unicode=True) + "---\n\n# card\n"


def check(card: RemoteCard | None) -> None:
    """A card that validated has the types the registry expects."""
    if card is None:
        return
    assert card.base_model is None or isinstance(card.base_model, str)
    if card.hub_card:
        assert isinstance(card.digest, str) and len(card.digest) == 64
        assert all(isinstance(m.key, str) and isinstance(m.value, float) for m in card.metrics)
        assert all(isinstance(p.name, str) and isinstance(p.number, int) for p in card.lineage)
        assert all(isinstance(t, str) for t in card.tags)


@settings(max_examples=150, deadline=None)
@given(front_matter | values)
def test_fuzzed_card_yaml_validates_or_raises_a_hub_error(data):
    try:
        check(parse_card(as_card(data), "alice/fuzz@v1"))
    except HubError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzzed_card_text_validates_or_raises_a_hub_error(text):
    for card in (text, f"---\n{text}\n---\n", f"---\nadapter_hub:\n  {text}\n---\n"):
        try:
            check(parse_card(card, "alice/fuzz@v1"))
        except HubError as exc:
            assert "\n" not in str(exc)


def test_cards_the_hub_writes_read_back(tmp_path):
    hub = Hub(home=tmp_path / "home")
    hub.register(tiny_lora(1), name="a", base=BASE,
                 metrics=[Metric(key="accuracy", value=0.8, dataset="date", split="test")],
                 recipe={"steps": 3}, tags=["demo"])
    version = hub.get("a@1")
    card = parse_card(model_card(version, repo_id="alice/a"), "alice/a@v1")
    assert card.hub_card and card.digest == version.digest and card.name == "a" and card.number == 1
    assert card.metrics == tuple(version.metrics) and card.base == BASE and card.recipe == {"steps": 3}


@pytest.fixture(scope="module")
def shared_server():
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        yield srv


_repos = itertools.count()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section)
def test_fuzzed_pull_registers_a_valid_card_or_writes_nothing(shared_server, tmp_path_factory, data):
    adapter = tiny_lora(7)
    if data.get("digest") == DIGEST:
        data = {**data, "digest": adapter_digest(adapter)}
    repo_id = f"alice/fuzz{next(_repos)}"
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        files = peft_files(adapter, Path(tmp) / "files")
        shared_server.seed(repo_id, {**files, "README.md": as_card({"adapter_hub": data}).encode()}, tags=("v1",))
        target = Hub(home=Path(tmp) / "target")
        try:
            pulled = Remote(target, endpoint=shared_server.url, token=TOKEN).pull(repo_id, "v1")
        except HubError as exc:
            assert "\n" not in str(exc)
            assert target.registry.list(include_yanked=True) == []
            assert not any(target.settings.store_dir.rglob("*.safetensors"))
        else:
            assert pulled.verified and pulled.version.digest == adapter_digest(adapter)
        finally:
            target.registry.close()
