"""``hub eval``: score registered versions (adapters, sums, stacks, mixtures) on one dataset and record the metrics."""

from __future__ import annotations

import click

from cli.output import WholeNumber, print_json, print_table
from cli.train import DEVICE_HELP, EVAL_COUNT, STRUCTURAL_HELP, parse_device
from hub.client import SMOLLM2, Hub


@click.command("eval")
@click.argument("refs", nargs=-1, required=True)
@click.option("--task", default=None, help="A built-in task (hub.tasks): its test split.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="A JSONL file of prompt/completion pairs or chats.")
@click.option("--count", type=WholeNumber(min=1), default=EVAL_COUNT, show_default=True,
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
    if (data is None) == (task is None):
        raise click.UsageError("give exactly one of --data and --task")
    results = Hub().evaluate(list(refs), task=task, data=data, count=count, base=base_name,
                             quantize=None if quantize == "none" else quantize, device=device,
                             allow_structural=allow_structural, with_base=with_base, record=not no_record,
                             progress=not quiet)
    if as_json:
        print_json([result.to_dict() for result in results])
        return
    for result in results:
        if result.base_check:
            click.echo(f"{result.ref}: {result.base_check}", err=True)
    keys = list(results[0].metrics)
    print_table(["version", *keys], [[r.ref, *(f"{r.metrics[k]:.4g}" for k in keys)] for r in results])
