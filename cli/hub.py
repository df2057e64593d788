"""``lomix hub pull`` and ``lomix hub push``: a thin front over `lomix.hub`.

The hub's environment variables apply: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE (the download cache),
HF_HUB_OFFLINE=1 (use the cache only) and HF_TOKEN (or the login saved by ``hf auth login``).
"""

from __future__ import annotations

from pathlib import Path

import typer

hub_app = typer.Typer(
    help="Pull and push PEFT LoRA adapters and lomix mixtures (Hugging Face Hub or local folders).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@hub_app.command()
def pull(
    spec: str = typer.Argument(
        ..., help="namespace/name[@revision] (a branch, tag or commit) or a local folder (./path)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder to copy the validated files into; default: leave them in the hub cache."
    ),
    kind: str = typer.Option("auto", help="auto, lomix (a mixture) or peft (a LoRA adapter)."),
    subfolder: str | None = typer.Option(None, help="Folder inside the repository holding the files."),
    token: str | None = typer.Option(None, help="Hub token; default: HF_TOKEN or the saved login."),
    offline: bool = typer.Option(False, "--offline", help="Use the local cache only, like HF_HUB_OFFLINE=1."),
) -> None:
    """Download and validate a mixture or PEFT adapter (safetensors only; names and shapes checked)."""
    from lomix.errors import LomixError
    from lomix.hub import pull as pull_

    try:
        pulled = pull_(spec, out, kind=kind, subfolder=subfolder, token=token, local_files_only=offline)
    except LomixError as exc:
        _fail(exc)
    commit = f" (commit {pulled.commit})" if pulled.commit else ""
    what = "lomix mixture" if pulled.kind == "lomix" else "PEFT LoRA adapter"
    typer.echo(f"{what} {pulled.source}{commit} -> {pulled.folder}")
    for name in pulled.files:
        typer.echo(f"  {name}")


@hub_app.command()
def push(
    run_dir: Path = typer.Argument(..., help="A run folder (or the mixture folder itself)."),
    repo_id: str = typer.Argument(..., help="namespace/name of the repository; created if missing."),
    private: bool | None = typer.Option(
        None, "--private/--public", help="Visibility of a new repository (an existing one keeps its own)."
    ),
    token: str | None = typer.Option(None, help="Hub token with write access; default: HF_TOKEN or the saved login."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    base_model: str | None = typer.Option(None, help="Hub id of the base model, for the model card."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files and the model card; upload nothing."),
) -> None:
    """Upload the mixture, its training config, evaluation files and a generated model card in one commit."""
    from lomix.errors import LomixError
    from lomix.hub import plan_push
    from lomix.hub import push as push_

    try:
        if dry_run:
            plan = plan_push(run_dir, repo_id, base_model=base_model)
            typer.echo(f"would upload to {repo_id}: {', '.join(plan.paths())}\n")
            typer.echo(plan.readme)
            return
        result = push_(run_dir, repo_id, private=private, token=token, commit_message=message, base_model=base_model)
    except LomixError as exc:
        _fail(exc)
    typer.echo(f"pushed {', '.join(result.files)} to {result.repo_id} (commit {result.commit})")
    typer.echo(result.url)
