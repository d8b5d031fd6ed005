"""``hub rank``: which registered adapters do a few examples of a task best, scored on one base loaded once."""

from __future__ import annotations

import click

from cli.output import print_json, print_table
from cli.train import DEVICE_HELP, STRUCTURAL_HELP, parse_device
from hub.client import SMOLLM2, Hub, Query


@click.command("rank")
@click.option("--data", type=click.Path(dir_okay=False, path_type=str), required=True,
              help="A JSONL file of a few prompt/completion pairs or chats of the task.")
@click.option("--base", "base_name", default=SMOLLM2, show_default=True,
              help="Base folder or Hub model id ORG/NAME[@REVISION].")
@click.option("--candidate", "refs", multiple=True,
              help="A version to score (NAME, NAME@3, NAME@ALIAS), repeatable (default: every compatible one).")
@click.option("--method", default=None, help="Only compatible versions of this method.")
@click.option("--tag", "tags", multiple=True, help="Only compatible versions with this tag, repeatable.")
@click.option("--quantize", type=click.Choice(["nf4", "int8", "none"]), default="nf4", show_default=True)
@click.option("--device", default=None, callback=parse_device, help=DEVICE_HELP)
@click.option("--allow-structural", is_flag=True, help=STRUCTURAL_HELP)
@click.option("--no-generate", is_flag=True, help="Rank by loss alone, without generating (no exact match).")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON.")
def rank(data: str, base_name: str, refs: tuple[str, ...], method: str | None, tags: tuple[str, ...], quantize: str,
         device: str | None, allow_structural: bool, no_generate: bool, as_json: bool) -> None:
    """Score adapters on the examples in --data, best first: exact match, then mean completion loss.

    \b
    hub rank --data few.jsonl --base smollm2
    hub rank --data few.jsonl --base smollm2 --candidate date --candidate name@2 --json
    """
    if refs and (method or tags):
        raise click.UsageError("--method and --tag filter the compatible versions: not with --candidate")
    results = Hub().rank(data=data, base=base_name, candidates=list(refs) or None,
                         query=Query(method=method, tags=tags), quantize=None if quantize == "none" else quantize,
                         device=device, generate=not no_generate, allow_structural=allow_structural)
    if as_json:
        print_json([{"position": i + 1, **r.to_dict()} for i, r in enumerate(results)])
        return
    rows = []
    for position, r in enumerate(results, start=1):
        if r.skipped is not None:
            rows.append(["-", r.ref, "", "", "", f"skipped: {r.skipped}"])
            continue
        exact = "" if no_generate else f"{r.exact_match:.2f}"
        rows.append([position, r.ref, exact, f"{r.loss:.4f}", f"{r.token_accuracy:.3f}", r.match or ""])
    print_table(["#", "version", "exact_match", "loss", "token_accuracy", "match"], rows)
