"""The local Hub server, driven by the real huggingface_hub client (no internet)."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import numpy as np
import pytest
from hubserver import HubServer, git_blob_sha1
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import file_download as hf_file_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import save_file

TOKEN, BOB_TOKEN = "hf_alice_secret", "hf_bob_secret"
REPO = "alice/math-lora"


@pytest.fixture
def server():
    with HubServer(tokens={TOKEN: "alice", BOB_TOKEN: "bob"}) as hub:
        yield hub


@pytest.fixture
def api(server: HubServer) -> HfApi:
    return HfApi(endpoint=server.url, token=TOKEN)


@pytest.fixture
def no_client_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client sleeps 1 s before resuming a broken download; the test needs the behaviour, not the wait."""
    monkeypatch.setattr(hf_file_download.time, "sleep", lambda _seconds: None)


def _adapter_folder(folder: Path, *, seed: int, rows: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"lora_A": rng.standard_normal((rows, 128), dtype=np.float32)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed}))
    (folder / "README.md").write_text(f"---\nlicense: mit\ntags: [peft]\n---\n# math-lora seed {seed}\n")
    return folder


def _pushed(api: HfApi, tmp_path: Path, *, private: bool = False) -> Path:
    api.create_repo(REPO, private=private)
    folder = _adapter_folder(tmp_path / "v1", seed=1)
    api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="v1")
    return folder


def _read(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_tags_and_downloads_each_version(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    assert api.whoami()["name"] == "alice"
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    first = _adapter_folder(tmp_path / "v1", seed=1)
    c1 = api.upload_folder(folder_path=first, repo_id=REPO, commit_message="v1")
    api.create_tag(REPO, tag="v1")
    second = _adapter_folder(tmp_path / "v2", seed=2)
    (second / "metrics.json").write_text('{"accuracy": 0.5}')
    c2 = api.upload_folder(folder_path=second, repo_id=REPO, commit_message="v2")
    api.create_tag(REPO, tag="v2", revision=c2.oid)
    assert len(c1.oid) == 40 and c1.oid != c2.oid

    at_v1 = Path(snapshot_download(REPO, revision="v1", endpoint=server.url, cache_dir=tmp_path / "c", token=TOKEN))
    at_main = Path(snapshot_download(REPO, endpoint=server.url, cache_dir=tmp_path / "c", token=TOKEN))
    assert at_v1.name == c1.oid and at_main.name == c2.oid
    assert _read(at_v1) == {**_read(first), ".gitattributes": server.files(REPO)[".gitattributes"]}
    assert _read(at_main) == {**_read(second), ".gitattributes": server.files(REPO)[".gitattributes"]}

    refs = api.list_repo_refs(REPO)
    assert {(t.name, t.target_commit) for t in refs.tags} == {("v1", c1.oid), ("v2", c2.oid)}
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", c2.oid)]
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["v2", "v1", "initial commit"]
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision="v1")][0] == c1.oid
    info = api.model_info(REPO, revision="refs/tags/v1")  # sent quoted: refs%2Ftags%2Fv1
    assert info.sha == c1.oid
    assert {s.rfilename: s.size for s in info.siblings}["adapter_model.safetensors"] == len(
        (first / "adapter_model.safetensors").read_bytes())
    assert api.model_info(REPO, revision=c1.oid).sha == c1.oid  # a commit id is a revision too


def test_unchanged_reupload_sends_no_file_content(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    folder = _pushed(api, tmp_path)
    head = server.resolve(REPO)
    before, seen = server.received_bytes, len(server.requests)
    again = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="same again")
    sent = server.received_bytes - before
    assert again.oid == head == server.resolve(REPO)  # no new commit
    assert sent < (folder / "adapter_model.safetensors").stat().st_size / 20  # only preupload samples
    assert not any("/commit/" in path for _, path in server.requests[seen:])

    (folder / "adapter_config.json").write_text('{"r": 16}')  # one small change: only that file travels
    before = server.received_bytes
    changed = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="bump r")
    assert changed.oid != head
    assert server.received_bytes - before < 4000
    assert server.files(REPO)["adapter_config.json"] == b'{"r": 16}'


def test_writes_require_a_valid_token_of_the_owner(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    _pushed(api, tmp_path)
    anonymous = HfApi(endpoint=server.url, token=False)
    for write in (lambda: anonymous.create_repo("alice/other"),
                  lambda: anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO),
                  lambda: anonymous.create_tag(REPO, tag="v9")):
        with pytest.raises(HfHubHTTPError) as err:
            write()
        assert err.value.response.status_code == 401
    bob = HfApi(endpoint=server.url, token=BOB_TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert err.value.response.status_code == 403
    wrong = HfApi(endpoint=server.url, token="hf_wrong")
    for read in (lambda: wrong.model_info(REPO), wrong.whoami):  # a bad token is refused even for a public read
        with pytest.raises(HfHubHTTPError) as err:
            read()
        assert err.value.response.status_code == 401
    assert anonymous.model_info(REPO).sha == server.resolve(REPO)  # public reads need no token
    assert "x.txt" not in server.files(REPO) and "v9" not in {t.name for t in api.list_repo_refs(REPO).tags}


def test_tokens_never_come_back_in_responses(server: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    bodies = [json.dumps(api.whoami())]
    for auth in (TOKEN, "hf_wrong_secret"):
        request = urllib.request.Request(f"{server.url}/api/whoami-v2", headers={"Authorization": f"Bearer {auth}"})
        try:
            with urllib.request.urlopen(request) as response:
                bodies.append(response.read().decode() + str(response.headers))
        except urllib.error.HTTPError as exc:
            bodies.append(exc.read().decode() + str(exc.headers))
    assert len(bodies) == 3 and not any(secret in body for body in bodies for secret in (TOKEN, "hf_wrong_secret"))


def test_private_repo_is_invisible_to_others(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    _pushed(api, tmp_path, private=True)
    assert api.model_info(REPO).private is True
    for token in (False, BOB_TOKEN):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=server.url, token=token).model_info(REPO)
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(REPO, endpoint=server.url, cache_dir=tmp_path / "c", token=token)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(REPO, "README.md", endpoint=server.url, cache_dir=tmp_path / "c", token=token)
    got = snapshot_download(REPO, endpoint=server.url, cache_dir=tmp_path / "c", token=TOKEN)
    assert (Path(got) / "adapter_model.safetensors").exists()


def test_repo_lifecycle_conflicts_and_missing_things(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    _pushed(api, tmp_path)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    api.create_tag(REPO, tag="v1")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(REPO, tag="v1")
    assert err.value.response.status_code == 409
    api.create_tag(REPO, tag="v1", exist_ok=True)
    api.delete_tag(REPO, tag="v1")
    assert api.list_repo_refs(REPO).tags == []
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v1")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", endpoint=server.url, cache_dir=tmp_path / "c", token=TOKEN)
    api.delete_file("README.md", repo_id=REPO)
    assert "README.md" not in server.files(REPO)
    api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO)
    api.delete_repo(REPO, missing_ok=True)


def test_dataset_repos_live_under_their_prefix(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    url = api.create_repo("alice/evals", repo_type="dataset")
    assert url.endswith("/datasets/alice/evals")
    api.upload_file(path_or_fileobj=b"q,a\n1,2\n", path_in_repo="data/test.csv", repo_id="alice/evals",
                    repo_type="dataset")
    got = snapshot_download("alice/evals", repo_type="dataset", endpoint=server.url, cache_dir=tmp_path / "c",
                            token=TOKEN)
    assert (Path(got) / "data" / "test.csv").read_bytes() == b"q,a\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):  # same name, other type: a different repo
        api.model_info("alice/evals")


def test_paths_escaping_the_repo_are_refused(server: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    commit = b"\n".join(json.dumps(line).encode() for line in (
        {"key": "header", "value": {"summary": "evil"}},
        {"key": "file", "value": {"path": "../escape.txt", "content": "eA==", "encoding": "base64"}}))
    request = urllib.request.Request(f"{server.url}/api/models/{REPO}/commit/main", data=commit, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/x-ndjson"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server.url}/{REPO}/resolve/main/..%2F..%2Fetc%2Fpasswd")
    assert err.value.code == 400
    assert list(server.files(REPO)) == [".gitattributes"]


def test_corrupt_serves_altered_bytes_under_the_original_etag(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    folder = _pushed(api, tmp_path)
    original = (folder / "adapter_model.safetensors").read_bytes()
    server.corrupt(REPO, "adapter_model.safetensors")
    got = Path(hf_hub_download(REPO, "adapter_model.safetensors", endpoint=server.url, cache_dir=tmp_path / "c",
                               token=TOKEN))
    served = got.read_bytes()
    assert served != original and len(served) == len(original)
    assert got.resolve().name == git_blob_sha1(original)  # the cache blob is named by the advertised ETag
    assert server.files(REPO)["adapter_model.safetensors"] == original


def test_cut_download_is_resumed_by_the_client(server: HubServer, api: HfApi, tmp_path: Path,
                                                no_client_sleep: None) -> None:
    folder = _pushed(api, tmp_path)
    original = (folder / "adapter_model.safetensors").read_bytes()
    server.cut_next_download(REPO, "adapter_model.safetensors", 1000)
    got = hf_hub_download(REPO, "adapter_model.safetensors", endpoint=server.url, cache_dir=tmp_path / "c",
                          token=TOKEN)
    assert hashlib.sha256(Path(got).read_bytes()).digest() == hashlib.sha256(original).digest()
    gets = [p for m, p in server.requests if m == "GET" and p.endswith("/resolve/main/adapter_model.safetensors")]
    assert len(gets) == 2  # cut once, then resumed


def test_repeated_cuts_make_the_client_raise_then_recover(server: HubServer, api: HfApi, tmp_path: Path,
                                                          no_client_sleep: None) -> None:
    folder = _pushed(api, tmp_path)
    server.cut_next_download(REPO, "adapter_model.safetensors", 0, times=10)
    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(REPO, "adapter_model.safetensors", endpoint=server.url, cache_dir=tmp_path / "c",
                        token=TOKEN)
    server.clear_faults()
    got = hf_hub_download(REPO, "adapter_model.safetensors", endpoint=server.url, cache_dir=tmp_path / "c",
                          token=TOKEN)
    assert Path(got).read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("status", [429, 500, 403])
def test_fail_next_answers_one_request_with_the_status(server: HubServer, api: HfApi, status: int) -> None:
    api.create_repo(REPO)
    server.fail_next(status, f"/api/models/{REPO}")
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(REPO)  # model_info does not retry, so the injected status surfaces
    assert err.value.response.status_code == status
    assert api.model_info(REPO).sha == server.resolve(REPO)


def test_downloads_work_offline_once_cached(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    folder = _pushed(api, tmp_path)
    api.create_tag(REPO, tag="v1")
    tagged = server.resolve(REPO, "v1")
    online = snapshot_download(REPO, revision="v1", endpoint=server.url, cache_dir=tmp_path / "c", token=TOKEN)
    server.stop()
    offline = snapshot_download(REPO, revision="v1", endpoint=server.url, cache_dir=tmp_path / "c", token=TOKEN,
                                local_files_only=True)
    unreachable = snapshot_download(REPO, revision="v1", endpoint=server.url, cache_dir=tmp_path / "c", token=TOKEN)
    assert offline == unreachable == online
    assert _read(Path(offline))["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    assert os.path.basename(offline) == tagged
