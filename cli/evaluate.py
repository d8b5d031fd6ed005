"""``hub eval``: score registered versions (adapters, sums, stacks, mixtures) on one dataset and record the metrics."""

from __future__ import annotations

from pathlib import Path

import click

from cli.output import print_json, print_table
from cli.train import DEVICE_HELP, EVAL_COUNT, SMOLLM2, STRUCTURAL_HELP, load_examples, parse_device, resolve_base
from hub.client import Hub
from hub.errors import NotFound
from hub.registry import Metric


@click.command("eval")
@click.argument("refs", nargs=-1, required=True)
@click.option("--task", default=None, help="A built-in task (hub.tasks): its test split.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="A JSONL file of prompt/completion pairs or chats.")
@click.option("--count", type=click.IntRange(min=1), default=EVAL_COUNT, show_default=True,
              help="Examples of --task's test split.")
@click.option("--base", "base_name", default=SMOLLM2, show_default=True,
              help="Base folder or Hub model id ORG/NAME[@REVISION].")
@click.option("--quantize", type=click.Choice(["nf4", "int8", "none"]), default="nf4", show_default=True)
@click.option("--device", default=None, callback=parse_device, help=DEVICE_HELP)
@click.option("--allow-structural", is_flag=True, help=STRUCTURAL_HELP)
@click.option("--with-base", is_flag=True, help="Also score the base without any adapter (not recorded).")
@click.option("--no-record", is_flag=True, help="Print the metrics without recording them in the registry.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate_command(refs: tuple[str, ...], task: str | None, data: str | None, count: int, base_name: str,
                     quantize: str, device: str | None, allow_structural: bool, with_base: bool, no_record: bool,
                     quiet: bool, as_json: bool) -> None:
    """Evaluate REFS (NAME, NAME@3 or NAME@ALIAS) on --task or --data, each on the same base and examples.

    \b
    hub eval date name sum-exact mixture --task date --with-base
    """
    from hub.composition import activate
    from hub.evaluate import evaluate
    from hub.runtime import load_base, load_tokenizer

    if (data is None) == (task is None):
        raise click.UsageError("give exactly one of --data and --task")
    hub = Hub()
    versions = [hub.get(ref) for ref in refs]  # unknown refs fail before the model loads
    path = resolve_base(base_name)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise NotFound(f"the base at {path} has no tokenizer to evaluate with")
    examples = load_examples(data, task, "test", count, tokenizer)
    dataset = task or Path(data or "").name
    base = load_base(path, quantize=None if quantize == "none" else quantize, device=device)

    results: list[tuple[str, dict[str, float]]] = []
    if with_base:
        results.append(("(base)", evaluate(base.model, tokenizer, examples, progress=not quiet).as_metrics()))
    for version in versions:
        handle = activate(base.model, version.ref, hub=hub, allow_structural=allow_structural)
        if getattr(handle, "base_check", None) is not None:
            click.echo(f"{version.ref}: {handle.base_check}", err=True)
        try:
            scores = evaluate(base.model, tokenizer, examples, progress=not quiet).as_metrics()
        finally:
            handle.detach()
        results.append((version.ref, scores))
        if not no_record:
            hub.registry.add_metrics(version.ref, [Metric(key=k, value=v, dataset=dataset, split="test")
                                                   for k, v in scores.items()])
    if as_json:
        print_json([{"ref": ref, "dataset": dataset, "split": "test", "count": len(examples), "metrics": scores}
                    for ref, scores in results])
        return
    keys = list(results[0][1])
    print_table(["version", *keys], [[ref, *(f"{scores[k]:.4g}" for k in keys)] for ref, scores in results])
