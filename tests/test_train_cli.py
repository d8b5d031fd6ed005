"""``hub train``: trains on a JSONL file or a built-in task, evaluates, registers the version with its recipe and
metrics, and prints the reference; bad input is one ``error:`` line (exit 1) or a usage error (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_train import char_tokenizer, tiny_llama

from cli.main import HubGroup
from cli.train import train
from hub.client import Hub
from hub.fingerprint import fingerprint

# The command as it runs under the `hub` group, which turns the hub's errors into one line and exit code 1.
GROUP = HubGroup(commands={"train": train})
FAST = ["--steps", "4", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a character tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": " yes"}) + "\n" for i in range(12)))
    return path


def run(*args: str) -> object:
    return CliRunner().invoke(GROUP, ["train", *args])


def test_train_on_a_file_evaluates_and_registers_with_the_recipe(hub_home: Path, tiny_base: Path, data: Path):
    result = run("demo", "--data", str(data), "--base", str(tiny_base), "--quantize", "none", "--rank", "4",
                 "--targets", "q_proj,v_proj", "--option", "use_rslora=true", "--eval-data", str(data), "--tag", "cli",
                 *FAST)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("registered demo@1 (lora, digest ")
    version = Hub().get("demo@1")
    assert version.recipe["rank"] == 4 and version.recipe["targets"] == ["q_proj", "v_proj"]
    assert version.recipe["options"] == {"use_rslora": True} and version.recipe["steps"] == 4
    assert version.base.weights_hash == fingerprint(tiny_base).weights_hash
    assert {m.key for m in version.metrics} == {"exact_match", "token_accuracy", "loss", "perplexity"}
    assert all(m.dataset == "train.jsonl" and m.split == "test" for m in version.metrics)
    assert version.targets == ["q_proj", "v_proj"] and "cli" in version.tags


def test_train_on_a_task_with_another_method_on_nf4(hub_home: Path, tiny_base: Path):
    result = run("dates", "--task", "date", "--examples", "16", "--base", str(tiny_base), "--method", "prompt_tuning",
                 "--option", "num_virtual_tokens=2", "--eval-task", "date", "--eval-count", "2", *FAST)
    assert result.exit_code == 0, result.output
    version = Hub().get("dates")
    assert version.method == "prompt_tuning" and version.recipe["method"] == "prompt_tuning"
    assert {(m.dataset, m.split) for m in version.metrics} == {("date", "test")}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--steps", "2"], 2, "give exactly one of --data and --task"),
        (["--task", "date", "--data", "x.jsonl"], 2, "give exactly one of --data and --task"),
        (["--task", "date", "--option", "oops"], 2, "'oops' is not KEY=VALUE"),
        (["--task", "date", "--method", "vera"], 1, "error: cannot train method 'vera'"),
        (["--task", "date", "--option", "nope=1"], 1, "error: unknown lora option nope"),
        (["--task", "nope"], 1, "error: unknown task 'nope'"),
        (["--task", "date", "--targets", "qq_proj"], 1, "error: LoRA: LlamaForCausalLM has no module named qq_proj"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], code: int, message: str, hub_home: Path, tiny_base: Path):
    result = run("demo", "--base", str(tiny_base), "--quantize", "none", *args, *FAST)
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_data_and_bases_are_one_line(hub_home: Path, tiny_base: Path, tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    result = run("demo", "--data", str(bad), "--base", str(tiny_base), *FAST)
    assert result.exit_code == 1 and f"error: {bad}:2: needs string fields" in result.output
    weights_only = tmp_path / "weights-only"
    tiny_llama().save_pretrained(weights_only)
    result = run("demo", "--task", "date", "--base", str(weights_only), *FAST)
    assert result.exit_code == 1 and "has no tokenizer to train with" in result.output
    result = run("demo", "--task", "date", "--base", str(tmp_path / "missing"), *FAST)
    assert result.exit_code == 1 and "error: no model folder or file at" in result.output
    # The name is checked first, before the base is even looked at: a typo costs no training.
    result = run("bad name", "--task", "date", "--base", str(tmp_path / "missing"), *FAST)
    assert result.exit_code == 1 and "error: invalid adapter name 'bad name'" in result.output
    assert not Hub().list()


def test_help_names_every_trainable_method() -> None:
    from hub.methods.table import trainable_names

    shown = " ".join(CliRunner().invoke(train, ["--help"], terminal_width=1000).output.split())
    assert [name for name in trainable_names() if name not in shown] == []
