"""A Hub server that lies or attacks: remote content never decides a local path, tokens never reach a message,
untrusted cards and files are refused under limits, every error is one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.file_download
import pytest
import torch
import yaml
from hubserver import HubServer, alias_bomb_card, deep_card, huge_card, wide_card

from hub.client import Hub
from hub.errors import Conflict, HubError, IntegrityError, InvalidArtifact, NotFound, QueryError, RemoteError
from hub.fingerprint import Fingerprint
from hub.formats import Adapter, adapter_digest, write_adapter
from hub.registry import Metric
from hub.remote import Remote
from hub.remote.errors import translate
from hub.remote.paths import Downloads, remove_inside
from hub.secrets import scrub

TOKEN = "hf_hostileTestToken0123456789abcdefXYZ"
BASE = Fingerprint(weights_hash="1" * 64, shape_hash="2" * 64, architecture="LlamaForCausalLM", num_parameters=10)


def tiny_lora(seed: int, base_model: str | None = None) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    if base_model:
        config["base_model_name_or_path"] = base_model
    return Adapter(config=config, tensors={f"{prefix}.lora_A.weight": torch.randn(2, 8, generator=generator),
                                           f"{prefix}.lora_B.weight": torch.randn(8, 2, generator=generator)})


def peft_files(adapter: Adapter, folder: Path) -> dict[str, bytes]:
    write_adapter(adapter, folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def hub_card(digest: object, **fields: object) -> bytes:
    section = {"name": "seeded", "number": 1, "digest": digest, **fields}
    return ("---\n" + yaml.safe_dump({"adapter_hub": section}) + "---\n\n# card\n").encode()


def tree(root: Path, *skip: Path) -> set[Path]:
    """Every path under ``root`` (files, folders, links), except under ``skip``."""
    return {p for p in root.rglob("*") if not any(p == s or p.is_relative_to(s) for s in skip)}


@pytest.fixture
def server():
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        yield srv


@pytest.fixture
def source(tmp_path: Path) -> Hub:
    """a@1 (metric on a named dataset, base named by a local path) and a@2."""
    hub = Hub(home=tmp_path / "source")
    hub.register(tiny_lora(1, base_model=str(tmp_path / "models" / "base")), name="a", base=BASE,
                 base_name=str(tmp_path / "models" / "base"),
                 metrics=[Metric(key="accuracy", value=0.8, dataset="date", split="test")])
    hub.register(tiny_lora(2), name="a", base=BASE, metrics={"accuracy": 0.9})
    return hub


@pytest.fixture
def target(tmp_path: Path) -> Hub:
    return Hub(home=tmp_path / "target")


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub sleeps between retries of failed downloads; these tests need not wait for it.
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda _: None)


def nothing_stored(hub: Hub) -> bool:
    return hub.registry.list(include_yanked=True) == [] and not any(hub.settings.store_dir.rglob("*.safetensors"))


# ------------------------------------------------------------------------- 1. remote content never names a path
TRAVERSALS = {
    "etag": lambda victim: {"ETag": '"' + "../" * 12 + str(victim).lstrip("/") + '"'},
    "linked-etag": lambda victim: {"X-Linked-Etag": '"' + "../" * 12 + str(victim).lstrip("/") + '"'},
    "commit-header": lambda victim: {"X-Repo-Commit": "../" * 12 + str(victim.parent).lstrip("/")},
    "absolute-etag": lambda victim: {"ETag": f'"{victim}"'},
}


@pytest.mark.parametrize("attack", sorted(TRAVERSALS))
def test_server_chosen_etag_or_commit_never_touches_files_outside_hub_home(tmp_path, server, source, target,
                                                                          attack):
    remote = Remote(source, endpoint=server.url, token=TOKEN)
    remote.push("a@1", "alice/a")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        server.set_download_headers("alice/a", name, TRAVERSALS[attack](victim))
    before = tree(tmp_path, target.settings.home, source.settings.home)
    if attack != "commit-header":  # an ETag naming a path makes the download fail, saying so
        with pytest.raises(RemoteError, match="cannot be stored"):
            Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1")
    for attempt in (lambda: Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1"),
                    lambda: Remote(target, endpoint=server.url, token=TOKEN).versions("alice/a"),
                    lambda: remote.push("a@1", "alice/a")):
        try:
            attempt()
        except HubError as exc:
            assert "\n" not in str(exc)
    assert victim.read_text() == "precious"
    assert tree(tmp_path, target.settings.home, source.settings.home) == before


def test_eviction_removes_links_never_what_they_point_at(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    downloads = Downloads(tmp_path / "home" / "cache" / "remote", "http://x", "alice/a")
    folder = downloads.commit_folder("a" * 40)
    folder.mkdir(parents=True)
    (folder / "README.md").symlink_to(victim)
    (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
    downloads.evict("a" * 40)
    assert not folder.exists() and victim.read_text() == "precious"
    remove_inside(victim, tmp_path / "home")  # outside the root: left alone
    assert victim.exists()


def test_corrupt_download_is_evicted_and_nothing_outside_home_changes(tmp_path, server, source, target):
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    server.corrupt("alice/a", "adapter_model.safetensors")
    before = tree(tmp_path, target.settings.home)
    with pytest.raises((IntegrityError, InvalidArtifact)):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/a", "v1")
    assert tree(tmp_path, target.settings.home) == before
    assert nothing_stored(target)
    assert not list((target.settings.cache_dir / "remote").rglob("adapter_model.safetensors"))


# --------------------------------------------------------------------------------------- 2. secrets stay secret
ECHOES = [(status, path) for status in (400, 401, 403, 404, 409, 412, 429, 500, 503)
          for path in ("/api/models/alice/a/revision", "/resolve/")]


@pytest.mark.parametrize("source_of_token", ["argument", "HF_TOKEN", "stored login"])
def test_token_echoed_by_the_server_never_reaches_a_message(tmp_path, server, source, target, monkeypatch, caplog,
                                                            source_of_token):
    caplog.set_level("DEBUG")
    Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    token = None
    if source_of_token == "argument":
        token = TOKEN
    elif source_of_token == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        token_file = tmp_path / "hf-token"
        token_file.write_text(TOKEN)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(token_file))
    messages = []
    for status, path in ECHOES:
        server.fail_next(status, path, times=10, message="denied: {authorization}", reason="No {authorization}")
        with pytest.raises(HubError) as caught:
            Remote(target, endpoint=server.url, token=token).pull("alice/a", "v1")
        server.clear_faults()
        messages.append(str(caught.value))
    assert all(TOKEN not in m and "\n" not in m for m in messages), messages
    assert any("denied: Bearer ***" in m for m in messages)  # the server's reason is kept, scrubbed
    assert TOKEN not in caplog.text


def test_scrub_masks_every_source_of_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "envTokenValue123")
    token_file = tmp_path / "token"
    token_file.write_text("storedLoginToken456")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(token_file))
    text = scrub("a envTokenValue123 b Authorization: Bearer anything-here c postgresql+psycopg://bob:pa55@db:5432/hub "
                 "d hf_" + "x1" * 20 + " e ?token=abc")
    assert "envTokenValue123" not in text and "anything-here" not in text and "pa55" not in text
    assert "x1x1" not in text and "abc" not in text and "bob" in text and "db:5432/hub" in text
    monkeypatch.delenv("HF_TOKEN")
    assert "storedLoginToken456" not in scrub("stored: storedLoginToken456")


# ------------------------------------------------------------------------------------ 3. verification required
@pytest.mark.parametrize("digest", [None, "", "0" * 64, "not-a-digest", "A" * 64, 12345])
def test_hub_card_without_a_valid_digest_is_refused(tmp_path, server, target, digest):
    files = peft_files(tiny_lora(3), tmp_path / "files")
    server.seed("alice/bad", {**files, "README.md": hub_card(digest)}, tags=("v1",))
    with pytest.raises(InvalidArtifact, match="digest") as caught:
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/bad", "v1")
    assert "\n" not in str(caught.value)
    assert nothing_stored(target)


def test_plain_peft_repo_is_pulled_unverified_and_says_so(tmp_path, server, target, caplog):
    adapter = tiny_lora(4)
    server.seed("alice/plain", peft_files(adapter, tmp_path / "files"))
    pulled = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/plain")
    assert not pulled.verified and pulled.version.digest == adapter_digest(adapter)
    assert "no hub card vouches" in caplog.text


def test_hub_card_with_matching_digest_is_verified(tmp_path, server, target):
    adapter = tiny_lora(5)
    files = peft_files(adapter, tmp_path / "files")
    server.seed("alice/good", {**files, "README.md": hub_card(adapter_digest(adapter))}, tags=("v1",))
    pulled = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/good", "v1")
    assert pulled.verified and pulled.version.ref == "seeded@1"


# ---------------------------------------------------------------------------------------- 4. limits on input
def test_60_mb_card_is_refused_from_the_listing_without_downloading_it(tmp_path, server, target):
    files = peft_files(tiny_lora(6), tmp_path / "files")
    server.seed("alice/huge", {**files, "README.md": huge_card(60 << 20)})
    with pytest.raises(InvalidArtifact, match="1 MiB limit for model cards"):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/huge")
    assert not any(m == "GET" and p.endswith("README.md") for m, p in server.requests)
    assert nothing_stored(target)


def test_card_larger_than_the_listing_said_is_refused_after_download(tmp_path, server, target):
    files = peft_files(tiny_lora(6), tmp_path / "files")
    server.seed("alice/liar", {**files, "README.md": huge_card(2 << 20)})
    server.set_download_headers("alice/liar", "README.md", {"Content-Length": str(2 << 20)})
    remote = Remote(target, endpoint=server.url, token=TOKEN)
    remote._resolve = lambda *args: (server.resolve("alice/liar"), None)  # as if the listing had no sizes
    (Downloads(target.settings.cache_dir / "remote", remote.endpoint, "alice/liar")
     .commit_folder(server.resolve("alice/liar")).mkdir(parents=True))
    with pytest.raises(HubError):
        remote.pull("alice/liar")
    assert nothing_stored(target)


@pytest.mark.parametrize(("card", "limit"), [
    (wide_card(200_000), "1 MiB limit"),
    (wide_card(30_000), "more than 20000 nodes"),
    (alias_bomb_card(), "once its aliases are expanded"),
    (deep_card(100), "deeper than 32 levels"),
    (deep_card(10_000), "malformed"),  # libyaml stops first
    (b"---\na: &a [*a]\n---\n", "alias inside the node"),
])
def test_hostile_yaml_is_refused_naming_the_limit(tmp_path, server, target, card, limit):
    files = peft_files(tiny_lora(7), tmp_path / "files")
    server.seed("alice/yaml", {**files, "README.md": card})
    with pytest.raises(InvalidArtifact, match=limit) as caught:
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/yaml")
    assert "\n" not in str(caught.value)
    assert nothing_stored(target)


def test_config_over_its_limit_and_safetensors_header_over_its_limit_are_refused(tmp_path, server, target):
    files = peft_files(tiny_lora(8), tmp_path / "files")
    config = files["adapter_config.json"][:-2] + b', "padding": "' + b"x" * (2 << 20) + b'"}'
    server.seed("alice/config", {**files, "adapter_config.json": config})
    with pytest.raises(InvalidArtifact, match="limit for adapter configs"):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/config")
    weights = (1 << 40).to_bytes(8, "little") + b"{}"
    server.seed("alice/header", {**files, "adapter_model.safetensors": weights})
    with pytest.raises(InvalidArtifact, match="limit for safetensors headers"):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/header")
    assert nothing_stored(target)


def test_repo_with_too_many_files_is_refused(tmp_path, server, target):
    files = peft_files(tiny_lora(9), tmp_path / "files")
    server.seed("alice/many", {**files, **{f"junk/{i}.txt": b"" for i in range(10_001)}})
    with pytest.raises(InvalidArtifact, match="more than 10000 files"):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/many")


# ------------------------------------------------------------------------------------------ 5. typed cards
@pytest.mark.parametrize(("fields", "problem"), [
    ({"metrics": {"accuracy": 1}}, r"adapter_hub\.metrics: expected a list"),
    ({"metrics": [{"key": "accuracy", "value": "0.9"}]}, r"metrics\[0\]\.value: expected a number, got string"),
    ({"number": "1"}, r"adapter_hub\.number: expected a whole number"),
    ({"lineage": [{"name": "p", "number": 1, "evil": True}]}, r"lineage\[0\]: unexpected keys evil"),
    # Past the registry's limits: refused as the card's field, not later as a bare reference error.
    ({"number": 2**31}, r"adapter_hub\.number: 2147483648 is not a version number"),
    ({"lineage": [{"name": "bad name", "number": 1}]}, r"lineage\[0\]: 'bad name'@1 is not a version reference"),
    ({"lineage": [{"name": "p", "number": 10**20}]}, r"lineage\[0\]: 'p'@100000000000000000000 is not a version"),
    ({"tags": [1]}, r"tags\[0\]: expected a string"),
    ({"base": ["x"]}, r"adapter_hub\.base: expected a mapping"),
])
def test_hub_card_with_a_wrong_field_is_refused_in_one_line(tmp_path, server, target, fields, problem):
    adapter = tiny_lora(10)
    card = hub_card(adapter_digest(adapter), **fields)
    server.seed("alice/typed", {**peft_files(adapter, tmp_path / "files"), "README.md": card}, tags=("v1",))
    with pytest.raises(InvalidArtifact, match=problem):
        Remote(target, endpoint=server.url, token=TOKEN).pull("alice/typed", "v1")
    assert nothing_stored(target)


@pytest.mark.parametrize("card", [b"---\n[unclosed\n---\n", b"---\n- a\n- b\n---\n", b"---\n\xff\xfe\n---\n"])
def test_plain_repo_with_a_malformed_card_keeps_the_peft_files(tmp_path, server, target, caplog, card):
    server.seed("alice/plainbad", {**peft_files(tiny_lora(11), tmp_path / "files"), "README.md": card})
    pulled = Remote(target, endpoint=server.url, token=TOKEN).pull("alice/plainbad")
    assert pulled.version.ref == "plainbad@1" and not pulled.verified
    assert "ignored" in caplog.text


# ----------------------------------------------------------------------------------------- 6. error mapping
def test_bad_request_keeps_the_servers_reason(server, source):
    server.fail_next(400, "/api/repos/create", message="name is reserved for the organization")
    with pytest.raises(QueryError, match="refused the request: name is reserved for the organization"):
        Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")


def test_409_without_url_on_create_is_an_existing_repo(server, source):
    remote = Remote(source, endpoint=server.url, token=TOKEN)
    remote.push("a@1", "alice/a")
    server.fail_next(409, "/api/repos/create", message="exists")  # no "url" in the body
    assert remote.push("a@2", "alice/a").tag == "v2"
    server.fail_next(409, "/api/repos/create", message="exists")  # and a repo that does not exist after all
    with pytest.raises(NotFound) as caught:
        remote.push("a@1", "alice/other")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("status", "kind", "words"), [
    (401, RemoteError, "authentication failed"), (403, RemoteError, "access denied (forbidden here)"),
    (404, NotFound, "forbidden here"), (409, Conflict, "conflict"), (412, Conflict, "changed meanwhile"),
    (429, RemoteError, "rate limited"), (500, RemoteError, "server error 500 (forbidden here)"),
])
def test_http_errors_are_one_line_with_the_reason(server, source, status, kind, words):
    server.fail_next(status, "/api/models/alice/a/refs", message="forbidden here")
    with pytest.raises(kind) as caught:
        Remote(source, endpoint=server.url, token=TOKEN).push("a@1", "alice/a")
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_transport_and_local_io_errors_say_what_failed(tmp_path, source, target):
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        url = srv.url
    with pytest.raises(RemoteError, match="cannot connect to"):
        Remote(target, endpoint=url, token=TOKEN).pull("alice/a")
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        Remote(source, endpoint=srv.url, token=TOKEN).push("a@1", "alice/a")
        (target.settings.cache_dir).mkdir(parents=True)
        (target.settings.cache_dir / "remote").write_text("a file where a folder belongs")
        with pytest.raises(HubError, match="cannot write|Not a directory"):
            Remote(target, endpoint=srv.url, token=TOKEN).pull("alice/a", "v1")
    full = translate(OSError(errno.ENOSPC, "No space left on device", "/x/blob"), "alice/a@v1", url)
    denied = translate(PermissionError(errno.EACCES, "Permission denied", "/x/blob"), "alice/a@v1", url)
    assert "disk is full" in str(full) and "/x/blob" in str(full)
    assert "permission denied" in str(denied)


# -------------------------------------------------------------------------------------- 10. HF_ENDPOINT, homes
def test_hf_endpoint_is_honoured_and_nothing_is_written_outside_hub_home(tmp_path, server, source, target,
                                                                        monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    Remote(source).push("a@1", "alice/a")
    before = tree(tmp_path, target.settings.home)
    remote = Remote(target)
    assert remote.endpoint == server.url
    assert remote.pull("alice/a", "v1").version.ref == "a@1"
    assert [v.tag for v in remote.versions("alice/a")] == ["v1"]
    assert tree(tmp_path, target.settings.home) == before
    assert huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY  # telemetry would write under HF_HOME


def test_offline_pull_uses_the_hubs_own_download(tmp_path, source):
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        Remote(source, endpoint=srv.url, token=TOKEN).push("a@1", "alice/a")
        Remote(Hub(home=tmp_path / "t"), endpoint=srv.url, token=TOKEN).pull("alice/a", "v1")
        url = srv.url
    fresh = Hub(home=tmp_path / "t", database_url=f"sqlite:///{tmp_path / 'other.db'}")
    assert Remote(fresh, endpoint=url, token=TOKEN).pull("alice/a", "v1").version.digest == source.get("a@1").digest
    assert not os.path.exists(tmp_path / "t" / "cache" / "hf")
