"""Base fingerprints: sharding-invariant weights_hash, structural shape_hash, model == folder, stat cache."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from safetensors.torch import load_file, save_file

from hub.errors import Incompatible, InvalidArtifact, NotFound, PermissionDenied
from hub.fingerprint import Fingerprint, fingerprint, fingerprint_model, fingerprint_path


def _llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def _saved(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture
def tiny_dir(tiny_llama, tmp_path: Path) -> Path:
    return _saved(tiny_llama, tmp_path / "tiny")


def _fp(path: Path, tmp_path: Path) -> Fingerprint:
    return fingerprint_path(path, cache_dir=tmp_path / "fp-cache")


def test_one_file_and_three_shards_hash_alike(tiny_llama, tmp_path: Path) -> None:
    one = _saved(tiny_llama, tmp_path / "one")
    three = _saved(tiny_llama, tmp_path / "three", max_shard_size="40KB")
    assert len(list(one.glob("*.safetensors"))) == 1
    assert len(list(three.glob("*.safetensors"))) == 3

    single, sharded = _fp(one, tmp_path), _fp(three, tmp_path)
    assert single == sharded
    assert single.architecture == "LlamaForCausalLM"
    assert single.num_parameters == tiny_llama.num_parameters()


def test_file_order_and_split_do_not_matter(tiny_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(tiny_dir / "model.safetensors")
    names = sorted(tensors)
    # The later names go to the file that sorts first, so file order and name order disagree.
    split = tmp_path / "split"
    split.mkdir()
    save_file({n: tensors[n] for n in names[::2]}, split / "b.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, split / "a.safetensors")
    assert _fp(split, tmp_path).weights_hash == _fp(tiny_dir, tmp_path).weights_hash


def test_a_single_safetensors_file_is_accepted(tiny_dir: Path, tmp_path: Path) -> None:
    assert _fp(tiny_dir / "model.safetensors", tmp_path) == _fp(tiny_dir, tmp_path)


def test_one_changed_value_changes_weights_hash_only(tiny_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(tiny_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3
    changed = tmp_path / "changed"
    changed.mkdir()
    save_file(tensors, changed / "model.safetensors")

    before, after = _fp(tiny_dir, tmp_path), _fp(changed, tmp_path)
    assert after.weights_hash != before.weights_hash
    assert after.shape_hash == before.shape_hash


def test_same_shapes_other_values_and_other_shapes(tiny_dir: Path, tmp_path: Path) -> None:
    base = _fp(tiny_dir, tmp_path)
    reseeded = _fp(_saved(_llama(seed=1), tmp_path / "seed1"), tmp_path)
    assert reseeded.shape_hash == base.shape_hash and reseeded.weights_hash != base.weights_hash

    wider = _fp(_saved(_llama(intermediate_size=96), tmp_path / "wider"), tmp_path)
    assert wider.shape_hash != base.shape_hash


def test_another_dtype_is_structurally_compatible_but_not_identical(tiny_llama, tiny_dir: Path, tmp_path: Path):
    bf16 = _fp(_saved(tiny_llama.to(torch.bfloat16), tmp_path / "bf16"), tmp_path)
    fp32 = _fp(tiny_dir, tmp_path)
    assert bf16.same_shapes(fp32) and not bf16.same_weights(fp32)


def test_model_and_its_saved_folder_agree(tiny_llama, tiny_dir: Path, tmp_path: Path) -> None:
    assert fingerprint_model(tiny_llama) == _fp(tiny_dir, tmp_path)
    assert fingerprint(tiny_llama) == fingerprint(tiny_dir, cache_dir=tmp_path)


def test_tied_embeddings_count_once_like_the_saved_file(tmp_path: Path) -> None:
    tied = _llama(tie_word_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    folder = _saved(tied, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")

    from_model, from_folder = fingerprint_model(tied), _fp(folder, tmp_path)
    assert from_model == from_folder
    assert from_model.num_parameters == tied.num_parameters()


@pytest.mark.slow
def test_smollm2_model_and_folder_agree(smollm2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    from_folder = fingerprint_path(smollm2_dir, cache_dir=tmp_path, use_cache=False)
    assert fingerprint_model(model) == from_folder
    assert from_folder.architecture == "LlamaForCausalLM"
    assert from_folder.num_parameters == model.num_parameters()


def test_cache_hit_does_not_rehash_and_a_changed_file_invalidates(tiny_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "fp-cache"
    first = fingerprint_path(tiny_dir, cache_dir=cache)
    assert (cache / "fingerprints.json").is_file()

    # Flip one byte of tensor data in place and put size and mtime back: the stat key is unchanged, so a
    # cached answer can only be the old one, and only a real rehash sees the new bytes.
    weights = tiny_dir / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as handle:
        handle.seek(stat.st_size - 1)
        last = handle.read(1)
        handle.seek(stat.st_size - 1)
        handle.write(bytes([last[0] ^ 0xFF]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert fingerprint_path(tiny_dir, cache_dir=cache) == first
    rehashed = fingerprint_path(tiny_dir, cache_dir=cache, use_cache=False)
    assert rehashed.weights_hash != first.weights_hash

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint_path(tiny_dir, cache_dir=cache) == rehashed


def test_default_cache_lives_under_hub_home(hub_home: Path, tiny_dir: Path) -> None:
    fingerprint_path(tiny_dir)
    assert (hub_home / "cache" / "fingerprints.json").is_file()


def test_a_corrupt_cache_file_is_ignored(tiny_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "fp-cache"
    cache.mkdir()
    (cache / "fingerprints.json").write_text("{not json")
    assert fingerprint_path(tiny_dir, cache_dir=cache) == fingerprint_path(tiny_dir, cache_dir=cache, use_cache=False)


def test_second_copy_beside_indexed_shards_is_ignored(tiny_llama, tmp_path: Path) -> None:
    sharded = _saved(tiny_llama, tmp_path / "sharded", max_shard_size="40KB")
    expected = _fp(sharded, tmp_path)
    tensors = {f"consolidated.{k}": v for k, v in tiny_llama.state_dict().items()}
    save_file(tensors, sharded / "consolidated.safetensors")
    assert _fp(sharded, tmp_path) == expected


def test_pickle_only_folder_is_refused(tiny_llama, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(tiny_llama.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InvalidArtifact, match="pytorch_model.bin"):
        fingerprint(folder, cache_dir=tmp_path)
    with pytest.raises(InvalidArtifact, match="not a .safetensors file"):
        fingerprint(folder / "pytorch_model.bin", cache_dir=tmp_path)


def test_missing_and_empty_paths_are_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        fingerprint(tmp_path / "nowhere", cache_dir=tmp_path)
    with pytest.raises(NotFound):
        fingerprint_path(tmp_path / "nowhere", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="no .safetensors"):
        fingerprint(tmp_path / "empty", cache_dir=tmp_path)


def test_malformed_safetensors_is_invalid(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (tiny_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArtifact, match="data offsets"):
        fingerprint(broken, cache_dir=tmp_path)
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(InvalidArtifact, match="past the end"):
        fingerprint(broken, cache_dir=tmp_path)


def test_a_name_resolves_in_the_local_hf_cache(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    # The layout huggingface_hub writes: refs/main names a commit whose snapshot holds the files.
    repo = tmp_path / "hf-cache" / "models--acme--tiny-llama"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert fingerprint("acme/tiny-llama", cache_dir=tmp_path) == _fp(tiny_dir, tmp_path)
    with pytest.raises(NotFound, match="acme/other: HF_HUB_OFFLINE is set"):
        fingerprint("acme/other", cache_dir=tmp_path)


def test_other_objects_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifact, match="dict"):
        fingerprint({"weight": torch.zeros(1)}, cache_dir=tmp_path)  # type: ignore[arg-type]


def test_bitsandbytes_model_needs_its_carried_fingerprint(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    with pytest.raises(Incompatible, match=r"bitsandbytes.*hub.runtime.identify"):
        fingerprint_model(quantized)

    unquantized = _fp(tiny_dir, tmp_path)
    quantized.hub_fingerprint = unquantized
    assert fingerprint(quantized) == unquantized


def test_progress_bar_counts_bytes(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    fingerprint_path(tiny_dir, cache_dir=tmp_path, progress=True)
    assert "fingerprint tiny" in capsys.readouterr().err


def test_fingerprint_round_trips_through_a_dict(tiny_dir: Path, tmp_path: Path) -> None:
    result = _fp(tiny_dir, tmp_path)
    assert Fingerprint.from_dict(result.to_dict()) == result


# -- issue 16: one-line errors, caches that cannot be written -------------------------------------------------


def _cli(args: list[str]):
    from click.testing import CliRunner

    from cli.main import cli

    return CliRunner().invoke(cli, args)


def _one_error_line(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


@pytest.mark.parametrize(("args", "message"), [
    (["fingerprint", "/dev/null"], "/dev/null is not a model folder or a .safetensors file"),
    (["train", "x", "--task", "date", "--base", "/dev/null"], "/dev/null is not a model folder"),
    (["fingerprint", "no-such-folder"], "no model folder or file at no-such-folder"),
])
def test_cli_errors_are_one_line(hub_home: Path, args: list[str], message: str) -> None:
    _one_error_line(_cli(args), message)


def test_cli_folder_without_safetensors_is_one_line(hub_home: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    _one_error_line(_cli(["fingerprint", str(tmp_path / "empty")]), "no .safetensors weights in")


def test_permission_denied_is_not_reported_as_missing(hub_home: Path, tiny_dir: Path, monkeypatch) -> None:
    # Tests run as root, which no file mode stops: deny the way the kernel would, from os.stat.
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path).startswith(str(tiny_dir)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    _one_error_line(_cli(["fingerprint", str(tiny_dir)]), f"cannot read {tiny_dir}: permission denied")
    with pytest.raises(PermissionDenied):
        fingerprint_path(tiny_dir)


def test_unreadable_weights_are_permission_denied(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(PermissionDenied, match="model.safetensors: permission denied"):
        fingerprint_path(tiny_dir, cache_dir=tmp_path)


def test_a_read_only_hub_home_still_fingerprints(tmp_path: Path, tiny_dir: Path, monkeypatch, caplog) -> None:
    # HUB_HOME below a regular file: nothing can be created there, whoever runs the test.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HUB_HOME", str(tmp_path / "file" / "home"))
    expected = fingerprint_path(tiny_dir, cache_dir=tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="hub.fingerprint"):
        assert fingerprint_path(tiny_dir) == expected
    assert "fingerprint not cached" in caplog.text
    result = _cli(["fingerprint", str(tiny_dir)])
    assert result.exit_code == 0 and expected.weights_hash in result.output


def test_an_unwritable_cache_file_is_skipped(tiny_dir: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    import hub.fingerprint as module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(module.tempfile, "mkstemp", refuse)
    with caplog.at_level(logging.WARNING, logger="hub.fingerprint"):
        result = fingerprint_path(tiny_dir, cache_dir=tmp_path / "cache")
    assert result == fingerprint_path(tiny_dir, cache_dir=tmp_path / "other", use_cache=False)
    assert "fingerprint not cached" in caplog.text and "Permission denied" in caplog.text
