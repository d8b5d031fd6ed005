"""``hub compose``: a weighted sum, stack or gated mixture of registered versions, registered with its lineage."""

from __future__ import annotations

import math
from typing import Any

import click

from cli.output import WholeNumber, print_json
from cli.train import DEVICE_HELP, STRUCTURAL_HELP, parse_device
from hub.client import Hub, check_name

KINDS = ("sum", "stack", "mixture")


def parse_weights(text: str | None, *, option: str = "--weights") -> list[float] | None:
    """``0.7,0.3`` → [0.7, 0.3]."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None


def positive_number(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A learning rate: finite and above 0 (click's FloatRange lets 'nan' through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a finite number above 0")
    return value


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--name", required=True, help="Register the result as a new version of NAME.")
@click.option("--weights", default=None, help="One weight per REF, comma-separated (default: 1 each).")
@click.option("--auto", is_flag=True,
              help="sum: fit the weights on --fit-data first (each REF alone, then LoraHub's CMA-ES + L1), then merge.")
@click.option("--search", type=click.Choice(["cma", "gradient"]), default="cma", show_default=True,
              help="--auto: CMA-ES (gradient-free) or Adam on the weights.")
@click.option("--budget", type=WholeNumber(min=1), default=40, show_default=True,
              help="--auto: loss evaluations in all (cma trials or gradient steps, and one per REF to rank them).")
@click.option("--l1", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="--auto: L1 penalty on the mean absolute weight.")
@click.option("--bounds", default="-1.5,1.5", show_default=True, help="--auto: LOW,HIGH for every weight.")
@click.option("--start", type=click.Choice(["rank", "zero"]), default="rank", show_default=True,
              help="--auto: score each REF alone first and search the --top-k best (default 3) from the best,"
                   " or LoraHub's search of every weight from 0.")
@click.option("--objective", type=click.Choice(["match_probability", "loss"]), default="match_probability",
              show_default=True, help="--auto: minimise 1 - the mean probability of each whole completion, or the"
                                      " mean token loss (LoraHub's).")
@click.option("--kind", type=click.Choice(KINDS), default="sum", show_default=True,
              help="sum: one merged adapter; stack: all active together; mixture: experts behind a trained gate.")
@click.option("--strategy", default="exact", show_default=True,
              help="sum: exact, svd, ties, dare_linear, dare_ties or magnitude_prune.")
@click.option("--rank", type=WholeNumber(), default=None, help="sum: output rank for svd and the pruning strategies.")
@click.option("--density", type=float, default=None, help="sum: fraction kept by ties/dare/magnitude_prune.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True)
@click.option("--seed", type=WholeNumber(), default=0, show_default=True,
              help="DARE's pruning, the gate's initialization.")
@click.option("--router", type=click.Choice(["layerwise", "two_pass"]), default="layerwise", show_default=True,
              help="mixture: one pass with per-layer gates, or X-LoRA's two passes.")
@click.option("--top-k", type=WholeNumber(), default=None,
              help="mixture: experts kept per token (default: all); --auto --start rank: REFs searched (default 3).")
@click.option("--routing", type=click.Choice(["token", "sequence"]), default="token", show_default=True,
              help="mixture: a gate per token, or one per sequence from its prompt (better from few examples).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="mixture: the gate's softmax.")
@click.option("--fit-task", "fit_tasks", multiple=True, help="mixture: a built-in task to fit the gate on, repeatable.")
@click.option("--fit-data", type=click.Path(dir_okay=False), default=None,
              help="mixture, --auto: a JSONL file of prompt/completion pairs or chats to fit the gate or weights on.")
@click.option("--fit-examples", type=WholeNumber(), default=300, show_default=True,
              help="Distinct examples per --fit-task (the gate overfits a few repeated ones).")
@click.option("--steps", type=WholeNumber(), default=40, show_default=True, help="mixture: gate training steps.")
@click.option("--lr", type=float, default=None, callback=positive_number,
              help="mixture: gate learning rate (default 0.01); --auto --search gradient: the weights' (0.1).")
@click.option("--base", default=None,
              help="mixture, --auto: base folder or Hub model id ORG/NAME[@REVISION] (default: the inputs' base).")
@click.option("--quantize", type=click.Choice(["nf4", "int8", "none"]), default="nf4", show_default=True,
              help="mixture, --auto: how the base is loaded to fit on.")
@click.option("--device", default=None, callback=parse_device, help=f"mixture, --auto: {DEVICE_HELP}")
@click.option("--allow-structural", is_flag=True, help=f"mixture: {STRUCTURAL_HELP}")
@click.option("--tag", "tags", multiple=True, help="Tag, repeatable.")
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the new version as JSON.")
def compose(refs: tuple[str, ...], name: str, weights: str | None, auto: bool, search: str, budget: int, l1: float,
            bounds: str, start: str, objective: str, kind: str, strategy: str, rank: int | None,
            density: float | None, majority_sign: str, seed: int, router: str, routing: str, top_k: int | None,
            temperature: float,
            fit_tasks: tuple[str, ...], fit_data: str | None, fit_examples: int, steps: int, lr: float | None,
            base: str | None, quantize: str, device: str | None, allow_structural: bool, tags: tuple[str, ...],
            description: str | None, as_json: bool) -> None:
    """Compose REFS (NAME, NAME@3 or NAME@ALIAS) and register the result as NAME.

    \b
    hub compose math@2 code --weights 0.7,0.3 --strategy svd --rank 16 --name math-code
    hub compose date name record --kind mixture --fit-task date --fit-task name --fit-task record --name router
    hub compose date name record --auto --fit-data few.jsonl --name few-shot
    """
    check_name(name)  # before the search, the gate's fit or the merge: none of that work is lost to a typo
    context = click.get_current_context()

    def given(*options: str) -> str:
        return ", ".join(f"--{option.replace('_', '-')}" for option in options
                         if context.get_parameter_source(option) is not click.core.ParameterSource.DEFAULT)

    searching = given("search", "budget", "l1", "bounds", "start", "objective")
    if searching and not auto:
        raise click.UsageError(f"{searching} set the --auto search: use them with --auto")
    # Options of another kind are refused rather than ignored: a forgotten --kind mixture would register a sum.
    gating = given("router", "routing", "temperature", "steps", "fit_examples")
    if kind != "mixture" and gating:
        raise click.UsageError(f"{gating} set a mixture's gate: use them with --kind mixture")
    shared = given("top_k", "lr")
    if kind != "mixture" and not auto and shared:
        raise click.UsageError(f"{shared} apply to a mixture's gate (--kind mixture) or the --auto search")
    if kind != "sum" and given("majority_sign"):
        raise click.UsageError("--majority-sign applies to a sum's ties or dare_ties (--kind sum)")
    if auto:
        _compose_auto(list(refs), name=name, weights=weights, search=search, budget=budget, l1=l1, bounds=bounds,
                      start=start, objective=objective, top_k=top_k, kind=kind, strategy=strategy, rank=rank,
                      density=density, majority_sign=majority_sign,
                      seed=seed, fit_tasks=fit_tasks, fit_data=fit_data, lr=lr, base=base, quantize=quantize,
                      device=device, allow_structural=allow_structural, tags=tags, description=description,
                      as_json=as_json)
        return
    fitting = bool(fit_tasks or fit_data)
    if kind == "mixture" and not fitting:
        raise click.UsageError("a mixture's gate must be trained: pass --fit-task and/or --fit-data")
    if kind != "mixture" and fitting:
        raise click.UsageError("--fit-task and --fit-data train a mixture's gate or (--fit-data) fit --auto weights")
    if kind != "mixture" and (device is not None or allow_structural):
        raise click.UsageError("--device and --allow-structural apply to fitting a mixture (--kind mixture)")
    hub = Hub()
    router_config = None
    if kind == "mixture":
        router_config = {"kind": router, "routing": routing, "temperature": temperature, "top_k": top_k, "seed": seed}
    result = hub.compose(list(refs), parse_weights(weights), kind=kind, strategy=strategy, rank=rank,
                         density=density, majority_sign=majority_sign, seed=seed, router=router_config)
    if kind == "mixture":
        hub.fit(result, tasks=fit_tasks, data=fit_data, per_task=fit_examples, base=base,
                quantize=None if quantize == "none" else quantize, device=device, allow_structural=allow_structural,
                steps=steps, lr=1e-2 if lr is None else lr, seed=seed)
    _register(hub, result, name=name, tags=tags, description=description, as_json=as_json)


def _compose_auto(refs: list[str], *, name: str, weights: str | None, search: str, budget: int, l1: float,
                  bounds: str, start: str, objective: str, top_k: int | None, kind: str, strategy: str,
                  rank: int | None, density: float | None, majority_sign: str,
                  seed: int, fit_tasks: tuple[str, ...], fit_data: str | None, lr: float | None, base: str | None,
                  quantize: str, device: str | None, allow_structural: bool, tags: tuple[str, ...],
                  description: str | None, as_json: bool) -> None:
    """``--auto``: the weights of a sum fitted on --fit-data, then the sum made and registered with them."""
    if weights is not None:
        raise click.UsageError("--auto fits the weights: not with --weights")
    if kind != "sum":
        raise click.UsageError("--auto fits the weights of a sum (--kind sum)")
    if fit_data is None or fit_tasks:
        raise click.UsageError("--auto fits the weights on a few examples: pass --fit-data FILE (not --fit-task)")
    if allow_structural:
        raise click.UsageError("--allow-structural applies to fitting a mixture (--kind mixture)")
    low_high = parse_weights(bounds, option="--bounds")
    if len(low_high) != 2:
        raise click.BadParameter(f"{bounds!r} is not LOW,HIGH", param_hint="--bounds")
    if top_k is not None and start != "rank":
        raise click.UsageError("--top-k with --auto chooses the REFs searched after ranking them (--start rank)")
    settings = {"method": search, "budget": budget, "l1": l1, "bounds": low_high, "seed": seed, "start": start,
                "objective": objective, **({"lr": lr} if lr is not None else {}),
                **({"top_k": top_k} if top_k is not None else {})}
    hub = Hub()
    result = hub.compose(refs, "auto", strategy=strategy, rank=rank, density=density, majority_sign=majority_sign,
                         seed=seed, data=fit_data, search=settings, base=base,
                         quantize=None if quantize == "none" else quantize, device=device)
    if not as_json:
        found = result.search
        click.echo(f"weights {', '.join(f'{w:.3f}' for w in found.weights)} ({search}, {found.evaluations} "
                   f"evaluations on {found.examples} examples, {objective} {found.objective:.4f}, loss "
                   f"{found.loss:.4f}, {found.seconds:.1f} s)",
                   err=True)
    _register(hub, result, name=name, tags=tags, description=description, as_json=as_json)


def _register(hub: Hub, result: Any, *, name: str, tags: tuple[str, ...], description: str | None,
              as_json: bool) -> None:
    registered = result.register(hub, name=name, tags=tags, description=description)
    version = registered.version
    if as_json:
        print_json({**version.to_dict(), "created": registered.created})
        return
    verb = "registered" if registered.created else "already registered as"
    inputs = ", ".join(f"{p.ref} ×{p.weight:g}" for p in version.parents) or "adapters given in memory"
    # A pruned or svd sum is stored factored at a rank: say how far that is from the exact result.
    error = (version.recipe or {}).get("truncation_error")
    stored = f"; rank {version.rank}, truncation error {error:.3g} (--rank keeps more)" if error else ""
    click.echo(f"{verb} {version.ref} ({version.method} of {inputs}; digest {version.digest[:12]}{stored})")
