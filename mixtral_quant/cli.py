"""The mixtral-quant command line: parse, call one library function, print.

MODEL defaults to the embedded tiny Mixtral, so every command runs on a fresh install.
Errors print as one line (``error: ...``) with exit status 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import torch

from . import __version__
from .errors import MixtralQuantError

MODEL_HELP = "Model folder (Hugging Face layout). Default: the embedded tiny Mixtral."


def pick_device(device: str) -> torch.device:
    """'auto' is CUDA when a GPU is visible, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MixtralQuantError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mixtral-quant")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Quantize, export and evaluate Mixtral-8x7B and Mistral-7B, experts included.

    \b
    Start here:
      mixtral-quant demo                        quantize, export and evaluate the embedded tiny model
      mixtral-quant inspect [MODEL]             config, parameters and bytes by component
      mixtral-quant quantize [MODEL] --recipe gptq-w4g128 --out exports/gptq
      mixtral-quant eval exports/gptq --baseline MODEL
      mixtral-quant export onnx exports/gptq --out exports/gptq-onnx
    """
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
def inspect(model: Path | None) -> None:
    """Print the config, parameters and bytes by component and dtype, and the shards of MODEL."""
    from .inventory import format_inventory, inventory

    click.echo(format_inventory(inventory(model)))


@cli.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in Mistral's [INST] ... [/INST] format.")
@click.option("--max-new-tokens", "-n", default=48, show_default=True, type=int)
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx: MODEL is a folder written by `export onnx`, run with onnxruntime.")
def generate(
    model: Path | None, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float,
    seed: int, device: str, dtype: str, backend: str,
) -> None:
    """Generate text from MODEL (any variant: fp16, NF4, GPTQ, int8, or an ONNX export)."""
    from .checkpoint import resolve_model
    from .generate import Sampling
    from .generate import generate as run
    from .tokenizer import Tokenizer

    folder = resolve_model(model)
    tok = Tokenizer(folder)
    ids = tok.chat([(prompt, None)]) if chat else tok.encode(prompt)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    if backend == "onnx":
        from .export.ort_runner import generate_onnx

        new = generate_onnx(folder, ids, sampling, eos_id=tok.eos_id)
    else:
        from .loading import load_model

        m = load_model(folder, dtype=DTYPES[dtype], device=pick_device(device))
        new = run(m, ids, sampling, eos_id=tok.eos_id)
    new = [t for t in new if t != tok.eos_id]
    # Decode prompt and continuation together so the joining space survives.
    click.echo(tok.decode(new) if chat else tok.decode(ids[1:] + new))


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    # bitsandbytes logs a warning about optional CPU kernels at import; the CLI keeps its output clean.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        cli.main(standalone_mode=False)
    except MixtralQuantError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
