"""``hub train``: train an adapter on a base, optionally evaluate it, and register it with its recipe."""

from __future__ import annotations

import json
from typing import Any

import click

from cli.output import WholeNumber, print_json
from hub.client import SMOLLM2, Hub

# torch and transformers are imported inside the command: `hub --help` and the registry commands stay fast.

EVAL_COUNT = 50


def parse_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--device``: a torch device name (``cpu``, ``cuda``, ``cuda:1``) that this machine has; None: the best."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine")
    return value


DEVICE_HELP = "Device to run the model on: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)."
STRUCTURAL_HELP = ("Accept a base that matches the adapters' base in tensor names and shapes but not in weights "
                   "(another fine-tune, another dtype without its source folder).")


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is read as JSON when it parses (``true``, ``16``, ``["a"]``), else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--option")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


@click.command()
@click.argument("name")
@click.option("--data", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Training JSONL: prompt/completion lines or chat messages.")
@click.option("--task", default=None, help="A built-in task (hub.tasks) instead of --data.")
@click.option("--examples", "train_count", type=WholeNumber(min=1), default=1000, show_default=True,
              help="How many examples of --task to train on.")
@click.option("--base", "base_name", default=SMOLLM2, show_default=True,
              help=f"Base model folder, Hub model id ORG/NAME[@REVISION], or '{SMOLLM2}'.")
@click.option("--quantize", type=click.Choice(["nf4", "int8", "none"]), default="nf4", show_default=True,
              help="Load the base with bitsandbytes (QLoRA style) or in full precision.")
@click.option("--device", default=None, callback=parse_device, help=DEVICE_HELP)
@click.option("--method", default="lora", show_default=True,
              help="A trainable method of the method table (docs/methods.md): lora, dora, adalora, denselora, "
                   "loha, lokr, ia3, prompt_tuning, prefix_tuning, bottleneck, bitfit, ln_tuning.")
@click.option("--rank", type=WholeNumber(), default=None, help="Rank of the low-rank methods.")
@click.option("--alpha", type=float, default=None, help="Scaling numerator of the low-rank methods.")
@click.option("--targets", default=None, help="Comma-separated module names (default: the method's).")
@click.option("--steps", type=WholeNumber(), default=None, help="Optimizer steps (default: the method's).")
@click.option("--batch-size", type=WholeNumber(), default=None)
@click.option("--grad-accum", type=WholeNumber(), default=None, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: the method's).")
@click.option("--seed", type=WholeNumber(), default=None)
@click.option("--option", "options", multiple=True, help="Method option KEY=VALUE (JSON value), repeatable.")
@click.option("--eval-task", default=None, help="Evaluate on this built-in task's test split and record metrics.")
@click.option("--eval-data", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Evaluate on this JSONL and record metrics.")
@click.option("--eval-count", type=WholeNumber(min=1), default=EVAL_COUNT, show_default=True,
              help="Test examples of --eval-task.")
@click.option("--tag", "tags", multiple=True, help="Tag, repeatable.")
@click.option("--description", default=None)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the new version as JSON.")
def train(name: str, data: str | None, task: str | None, train_count: int, base_name: str, quantize: str,
          device: str | None, method: str, rank: int | None, alpha: float | None, targets: str | None,
          steps: int | None, batch_size: int | None, grad_accum: int | None, lr: float | None, seed: int | None,
          options: tuple[str, ...], eval_task: str | None, eval_data: str | None, eval_count: int,
          tags: tuple[str, ...], description: str | None, quiet: bool, as_json: bool) -> None:
    """Train a new version of adapter NAME on --data or --task, and register it with its recipe."""
    if (data is None) == (task is None):
        raise click.UsageError("give exactly one of --data and --task")
    if eval_task is not None and eval_data is not None:
        raise click.UsageError("give at most one of --eval-task and --eval-data")
    given = {"method": method, "rank": rank, "alpha": alpha, "steps": steps, "batch_size": batch_size,
             "grad_accum": grad_accum, "lr": lr, "seed": seed,
             "targets": [t.strip() for t in targets.split(",") if t.strip()] if targets is not None else None}
    recipe = {key: value for key, value in given.items() if value is not None}
    recipe["options"] = dict(parse_option(o) for o in options)
    trained = Hub().train(name, recipe=recipe, task=task, data=data, count=train_count, base=base_name,
                          quantize=None if quantize == "none" else quantize, device=device, eval_task=eval_task,
                          eval_data=eval_data, eval_count=eval_count, tags=tags, description=description,
                          progress=not quiet)
    version = trained.registered.version
    if as_json:
        print_json({**version.to_dict(), "created": trained.registered.created, "losses": trained.losses,
                    "seconds": trained.seconds})
        return
    click.echo(f"trained {version.method} in {trained.seconds:.0f}s: loss {trained.losses[0]:.3f} -> "
               f"{trained.losses[-1]:.3f} over {len(trained.losses)} steps", err=True)
    if trained.metrics:
        click.echo("  ".join(f"{m.key}={m.value:.4g}" for m in trained.metrics), err=True)
    verb = "registered" if trained.registered.created else "already registered as"
    click.echo(f"{verb} {version.ref} ({version.method}, digest {version.digest[:12]})")
