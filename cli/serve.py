"""``hub serve``: the OpenAI-compatible server over the registry (a few lines over ``Hub.serve``)."""

from __future__ import annotations

import os

import click

from cli.output import WholeNumber
from cli.train import DEVICE_HELP, parse_device
from hub.client import Hub


@click.command()
@click.option("--base", required=True, help="Base model: smollm2, a folder or a Hub id (ORG/NAME[@REV]).")
@click.option("--quantize", type=click.Choice(["nf4", "int8", "none"]), default="nf4", show_default=True)
@click.option("--device", default=None, callback=parse_device, help=DEVICE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=WholeNumber(0, 65535), default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="The id clients name the base by (default: --base).")
@click.option("--api-key", default=None, help="Require this bearer token on /v1 routes (default: $HUB_API_KEY).")
@click.option("--max-loaded", type=WholeNumber(min=1), default=16, show_default=True,
              help="Adapters attached at once; the least recently used unused one makes room.")
@click.option("--max-batch", type=WholeNumber(min=1), default=16, show_default=True,
              help="Requests decoded together.")
@click.option("--max-queue", type=WholeNumber(min=1), default=64, show_default=True,
              help="Requests waiting beyond the batch; more are answered 429.")
@click.option("--max-model-len", type=WholeNumber(min=2), default=None,
              help="Prompt plus completion tokens per request (default: the model's context length).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds running requests get to finish on SIGTERM/SIGINT.")
@click.option("--allow-adapter-paths", is_flag=True,
              help="Let /v1/load_lora_adapter read PEFT folders on this machine (lora_path), as vLLM does.")
@click.option("--json", "as_json", is_flag=True, help="Log one JSON object per line.")
def serve(base: str, quantize: str, device: str | None, host: str, port: int, served_model_name: str | None,
          api_key: str | None, max_loaded: int, max_batch: int, max_queue: int, max_model_len: int | None,
          shutdown_timeout: float, allow_adapter_paths: bool, as_json: bool) -> None:
    """Serve BASE and every adapter registered on it (HUB_HOME / HUB_DATABASE_URL) through an OpenAI-compatible
    API: each request's `model` is the base or any registry reference (date, date@3, date@prod: adapters, merged
    sums, stacks, mixtures); an `adapters` list in the body runs a weighted stack. Requests with different
    adapters are batched together."""
    if not as_json:
        click.echo(f"loading {base} ({quantize}); the API will be at http://{host}:{port}/v1", err=True)
    Hub().serve(base, quantize=None if quantize == "none" else quantize, device=device, host=host, port=port,
                served_model_name=served_model_name, api_key=api_key or os.environ.get("HUB_API_KEY") or None,
                max_loaded=max_loaded, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len,
                shutdown_timeout=shutdown_timeout, allow_adapter_paths=allow_adapter_paths, log_json=as_json)
