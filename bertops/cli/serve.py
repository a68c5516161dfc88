"""``bertops serve``: validate a model repository and run tritonserver on it until stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bertops.cli._common import ConfigFile, command, config_default, console, out, pick

app = typer.Typer()
ADVANCED = "Advanced"


@command(app, "serve")
def serve(
    repo: Annotated[Path, typer.Option("--repo", "-r", help="Model repository folder.")] = Path("triton_models"),
    http_port: Annotated[int | None, typer.Option(help=f"HTTP/REST port ({config_default('serve.http_port')}).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help=f"gRPC port ({config_default('serve.grpc_port')}).")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help=f"Prometheus metrics port ({config_default('serve.metrics_port')}).", rich_help_panel=ADVANCED)] = None,
    host: Annotated[str | None, typer.Option(
        help=f"Address to bind; loopback unless told otherwise ({config_default('serve.host')}).")] = None,
    log_file: Annotated[Path | None, typer.Option(
        help="Server log (default: a temporary file).", rich_help_panel=ADVANCED)] = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for all models to load.", rich_help_panel=ADVANCED)] = 300.0,
    config: ConfigFile = None,
):
    """Validate the repository, start tritonserver, print the endpoints, restart it on failure; Ctrl-C stops it."""
    from bertops.config import load_config
    from bertops.triton.server import TritonServer
    from bertops.triton.supervisor import Supervisor, serve_until_stopped
    from bertops.triton.validate import check_servable, repository_models

    cfg = load_config(config).serve
    check_servable(repo)  # one-line refusal before anything starts
    served = repository_models(repo)
    server = TritonServer(repo, pick(http_port, cfg.http_port), pick(grpc_port, cfg.grpc_port),
                          pick(metrics_port, cfg.metrics_port), host=pick(host, cfg.host), log_file=log_file)
    supervisor = Supervisor(server, list(served), start_timeout=timeout,
                            log=lambda line: console.print(line, highlight=False, soft_wrap=True))

    def ready() -> None:
        models = ", ".join(f"{m} ({t})" for m, t in served.items())
        out.print(f"serving {repo}: {models}", highlight=False)
        out.print(f"  HTTP    http://{server.http_url}", highlight=False)
        out.print(f"  gRPC    {server.grpc_url}", highlight=False)
        out.print(f"  metrics http://{server.metrics_url}/metrics", highlight=False)
        probe_models = " ".join(f"--model {m}" for m in served)
        out.print(f"  health  python -m bertops.triton.health --url {server.http_url} {probe_models}", highlight=False)
        out.print(f"  log     {server.log_path}; Ctrl-C to stop", highlight=False)

    serve_until_stopped(supervisor, ready)
