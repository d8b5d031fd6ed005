"""Property-based: whatever strings and numbers reach the registry (refs, names, aliases, tags, metric keys and
values, datasets, descriptions), only HubError subclasses escape, and a call that fails writes nothing: the
registry's rows and the store's listing are the same before and after. On SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from hub.client import Hub
from hub.errors import HubError
from hub.formats import Adapter
from hub.registry import Metric
from hub.registry.refs import check_alias, check_int, check_metric_key, check_name, parse_condition, parse_ref

TABLES = ("adapters", "versions", "metrics", "aliases", "tags", "lineage", "remotes", "bases", "base_names")

# Everything a user could type, and then some: control characters, surrogates, digits of other scripts, long runs.
anything = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec=None), max_size=30),
    st.text(alphabet="abv019@:._-/\n\x00 ²١", max_size=12),
    st.builds(lambda c, n: c * n, st.sampled_from("ab1\n"), st.integers(95, 305)),
)
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(alphabet="0123456789١²-_ .e", max_size=25))


@settings(max_examples=400, deadline=None)
@given(anything, numbers)
def test_parsers_raise_only_hub_errors(value: str, number: object) -> None:
    for check in (parse_ref, check_name, check_alias, check_metric_key, parse_condition,
                  lambda v: check_int(number, "n"), lambda v: parse_ref(f"m@{v}")):
        try:
            check(value)
        except HubError as exc:
            assert "\n" not in str(exc)


def lora(seed: int) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    return Adapter(config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                           "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"},
                   tensors={f"{key}.lora_A.weight": torch.randn(2, 16, generator=generator),
                            f"{key}.lora_B.weight": torch.randn(16, 2, generator=generator)})


def snapshot(hub: Hub) -> tuple:
    with hub.registry.engine.connect() as conn:
        counts = tuple(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES)
        aliases = tuple(conn.execute(text("SELECT alias, version_id FROM aliases ORDER BY alias")).all())
    return counts, aliases, tuple(hub.store.digests()), tuple(hub.store.staging())


@pytest.fixture(params=["sqlite", "postgresql"])
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Hub:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    hub = Hub(home=tmp_path / "home", database_url=url)
    hub.register(lora(0), name="base-line", base=None)  # something to alias, resolve and collide with
    return hub


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=anything, alias=anything, tag=anything, key=anything, value=numbers, dataset=anything,
       description=anything, ref=anything, seed=st.integers(1, 4))
def test_registry_calls_raise_only_hub_errors_and_failures_write_nothing(
        hub: Hub, name: str, alias: str, tag: str, key: str, value: object, dataset: str, description: str,
        ref: str, seed: int) -> None:
    calls = [
        lambda: hub.register(lora(seed), name=name, base=None, tags=[tag], description=description,
                             metrics=[Metric(key, value, dataset or None)]),  # type: ignore[arg-type]
        lambda: hub.register(lora(seed), name="base-line", base=None, metrics={key: value}),  # type: ignore
        lambda: hub.registry.set_alias("base-line@1", alias),
        lambda: hub.registry.get(ref),
        lambda: hub.registry.list(where=[f"{key}>={value}"], tags=[tag]),
        lambda: hub.registry.record_remote("base-line@1", repo_id=name, tag=tag, commit=alias),
    ]
    for call in calls:
        before = snapshot(hub)
        try:
            call()
        except HubError as exc:
            assert "\n" not in str(exc)
            assert snapshot(hub) == before
