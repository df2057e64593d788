"""``lomix chat`` and ``lomix generate``: a trained mixture answering prompts (recipes/inference.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lomix.errors import LomixError

from .commands import fail

RUN = typer.Argument(..., help="A run folder from `lomix train` (or its mixture/ folder).")
TASK_HELP = "Route as this task (name or id from the run's tasks.json); needed by runs whose router routes by task."
DESCRIPTION_HELP = (
    "The task's description for routers that route by description (default: the --task's description from "
    "tasks.json); with no --task, a description alone (a task the run never trained on)."
)


def _options(max_new_tokens: int, sample: bool, temperature: float, top_p: float, top_k: int, seed: int, raw: bool):
    from lomix.recipes.inference import GenerationOptions

    options = GenerationOptions(max_new_tokens, sample, temperature, top_p, top_k, seed, raw)
    options.check()
    return options


MAX_NEW_TOKENS = typer.Option(128, "--max-new-tokens", help="Most tokens generated per answer.")
SAMPLE = typer.Option(False, "--sample", help="Sample (with the options below) instead of greedy decoding.")
TEMPERATURE = typer.Option(1.0, "--temperature", help="Sampling temperature (with --sample).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling: the smallest set of tokens of this mass (with --sample).")
TOP_K = typer.Option(50, "--top-k", help="Sample among the K most likely tokens (with --sample; 0: all).")
SEED = typer.Option(0, "--seed", help="Seed of the sampling.")
RAW = typer.Option(
    False, "--raw", help="Send the text as typed, without the run's prompt template (and, for generate, chat template)."
)


def chat(
    run_dir: Path = RUN,
    task: str | None = typer.Option(None, "--task", help=TASK_HELP),
    task_description: str | None = typer.Option(None, "--task-description", help=DESCRIPTION_HELP),
    max_new_tokens: int = MAX_NEW_TOKENS,
    sample: bool = SAMPLE,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: int = SEED,
    raw: bool = RAW,
) -> None:
    """Talk to a trained mixture: one message per line on stdin, the answer streamed to stdout.

    The conversation goes through the tokenizer's chat template (when it has one) and each message
    through the run's data.prompt_template (unless --raw). /reset starts a new conversation, /exit
    (or end of input) quits.
    """
    from transformers import TextStreamer

    from lomix.recipes import inference

    try:
        options = _options(max_new_tokens, sample, temperature, top_p, top_k, seed, raw)
        run = inference.open_run(run_dir)
        route = inference.route(run, task, description=task_description)
    except LomixError as exc:
        raise fail(exc) from None
    streamer = TextStreamer(run.tokenizer, skip_prompt=True, skip_special_tokens=True)
    typer.echo(f"lomix chat: {run.directory}; /reset starts over, /exit quits", err=True)
    turns: list[tuple[str, str]] = []
    while True:
        typer.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        message = line.strip()
        if message == "/exit":
            break
        if message == "/reset":
            turns = []
            typer.echo("(new conversation)", err=True)
            continue
        if not message:
            continue
        try:
            ids = inference.chat_ids(run, turns, message, route, raw)
            answer = inference.generate(run, [ids], [route], options, streamer=streamer)[0]
        except LomixError as exc:  # e.g. a router that needs what the command line did not give
            raise fail(exc) from None
        turns.append((message, run.tokenizer.decode(answer, skip_special_tokens=True)))


def generate(
    run_dir: Path = RUN,
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    input_file: Path | None = typer.Option(
        None,
        "--input",
        "-i",
        help='JSONL prompts: one object per line with "prompt" and optionally "task", "task_description".',
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSONL file to write (default: stdout)."),
    task: str | None = typer.Option(None, "--task", help=TASK_HELP + ' A row\'s own "task" wins.'),
    task_description: str | None = typer.Option(
        None, "--task-description", help=DESCRIPTION_HELP + ' A row\'s own "task_description" wins.'
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generate call (left-padded)."),
    max_new_tokens: int = MAX_NEW_TOKENS,
    sample: bool = SAMPLE,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: int = SEED,
    raw: bool = RAW,
) -> None:
    """Answer prompts in batches with a trained mixture; one JSON line per prompt.

    Each output row is the input row plus "completion" (the text) and "new_tokens" (its length in
    tokens). Prompts are formatted as `lomix eval` formats inputs (unless --raw); greedy unless --sample.
    """
    from lomix.atomic import atomic_file
    from lomix.errors import ConfigError
    from lomix.recipes import inference

    try:
        if (prompt is None) == (input_file is None):
            raise ConfigError("--prompt/--input", "give prompts with --prompt TEXT (repeatable) or --input FILE.jsonl")
        rows = [{"prompt": text} for text in prompt] if prompt else inference.read_prompts(input_file)
        options = _options(max_new_tokens, sample, temperature, top_p, top_k, seed, raw)
        run = inference.open_run(run_dir)
        results = inference.generate_rows(run, rows, options, task, batch_size, task_description)
        if out is None:
            for row in results:
                typer.echo(json.dumps(row, ensure_ascii=False))
            return
        with atomic_file(out) as handle:  # a failed run leaves a previous file as it was
            for row in results:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    except LomixError as exc:
        raise fail(exc) from None
    typer.echo(f"wrote {len(rows)} rows to {out}", err=True)
