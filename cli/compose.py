"""``hub compose``: a weighted sum, stack or gated mixture of registered versions, registered with its lineage."""

from __future__ import annotations

import click

from cli.output import print_json
from cli.train import DEVICE_HELP, STRUCTURAL_HELP, parse_device
from hub.client import Hub

KINDS = ("sum", "stack", "mixture")


def parse_weights(text: str | None) -> list[float] | None:
    """``0.7,0.3`` → [0.7, 0.3]."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--name", required=True, help="Register the result as a new version of NAME.")
@click.option("--weights", default=None, help="One weight per REF, comma-separated (default: 1 each).")
@click.option("--kind", type=click.Choice(KINDS), default="sum", show_default=True,
              help="sum: one merged adapter; stack: all active together; mixture: experts behind a trained gate.")
@click.option("--strategy", default="exact", show_default=True,
              help="sum: exact, svd, ties, dare_linear, dare_ties or magnitude_prune.")
@click.option("--rank", type=int, default=None, help="sum: output rank for svd and the pruning strategies.")
@click.option("--density", type=float, default=None, help="sum: fraction kept by ties/dare/magnitude_prune.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="DARE's pruning, the gate's initialization.")
@click.option("--router", type=click.Choice(["layerwise", "two_pass"]), default="layerwise", show_default=True,
              help="mixture: one pass with per-layer gates, or X-LoRA's two passes.")
@click.option("--top-k", type=int, default=None, help="mixture: experts kept per token (default: all).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="mixture: the gate's softmax.")
@click.option("--fit-task", "fit_tasks", multiple=True, help="mixture: a built-in task to fit the gate on, repeatable.")
@click.option("--fit-data", type=click.Path(dir_okay=False), default=None,
              help="mixture: a JSONL file of prompt/completion pairs or chats to fit the gate on.")
@click.option("--fit-examples", type=int, default=300, show_default=True,
              help="Distinct examples per --fit-task (the gate overfits a few repeated ones).")
@click.option("--steps", type=int, default=100, show_default=True, help="mixture: gate training steps.")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="mixture: gate learning rate.")
@click.option("--base", default=None,
              help="mixture: base folder or Hub model id ORG/NAME[@REVISION] (default: the experts' base).")
@click.option("--quantize", type=click.Choice(["nf4", "int8", "none"]), default="nf4", show_default=True,
              help="mixture: how the base is loaded to fit the gate.")
@click.option("--device", default=None, callback=parse_device, help=f"mixture: {DEVICE_HELP}")
@click.option("--allow-structural", is_flag=True, help=f"mixture: {STRUCTURAL_HELP}")
@click.option("--tag", "tags", multiple=True, help="Tag, repeatable.")
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the new version as JSON.")
def compose(refs: tuple[str, ...], name: str, weights: str | None, kind: str, strategy: str, rank: int | None,
            density: float | None, majority_sign: str, seed: int, router: str, top_k: int | None, temperature: float,
            fit_tasks: tuple[str, ...], fit_data: str | None, fit_examples: int, steps: int, lr: float,
            base: str | None, quantize: str, device: str | None, allow_structural: bool, tags: tuple[str, ...],
            description: str | None, as_json: bool) -> None:
    """Compose REFS (NAME, NAME@3 or NAME@ALIAS) and register the result as NAME.

    \b
    hub compose math@2 code --weights 0.7,0.3 --strategy svd --rank 16 --name math-code
    hub compose date name record --kind mixture --fit-task date --fit-task name --fit-task record --name router
    """
    fitting = bool(fit_tasks or fit_data)
    if kind == "mixture" and not fitting:
        raise click.UsageError("a mixture's gate must be trained: pass --fit-task and/or --fit-data")
    if kind != "mixture" and fitting:
        raise click.UsageError("--fit-task and --fit-data train a mixture's gate: use them with --kind mixture")
    if kind != "mixture" and (device is not None or allow_structural):
        raise click.UsageError("--device and --allow-structural apply to fitting a mixture (--kind mixture)")
    hub = Hub()
    router_config = None
    if kind == "mixture":
        router_config = {"kind": router, "temperature": temperature, "top_k": top_k, "seed": seed}
    result = hub.compose(list(refs), parse_weights(weights), kind=kind, strategy=strategy, rank=rank,
                         density=density, majority_sign=majority_sign, seed=seed, router=router_config)
    if kind == "mixture":
        hub.fit(result, tasks=fit_tasks, data=fit_data, per_task=fit_examples, base=base,
                quantize=None if quantize == "none" else quantize, device=device, allow_structural=allow_structural,
                steps=steps, lr=lr, seed=seed)
    registered = result.register(hub, name=name, tags=tags, description=description)
    version = registered.version
    if as_json:
        print_json({**version.to_dict(), "created": registered.created})
        return
    verb = "registered" if registered.created else "already registered as"
    inputs = ", ".join(f"{p.ref} ×{p.weight:g}" for p in version.parents) or "adapters given in memory"
    click.echo(f"{verb} {version.ref} ({version.method} of {inputs}; digest {version.digest[:12]})")
