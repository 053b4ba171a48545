"""The mixtral-quant command line: parse, call one library function, print.

MODEL defaults to the embedded tiny Mixtral, so every command runs on a fresh install.
Errors print as one line (``error: ...``) with exit status 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
import torch

from . import __version__
from .device import resolve_device
from .errors import MixtralQuantError
from .paths import shipped_recipes

MODEL_HELP = "Model folder (Hugging Face layout). Default: the embedded tiny Mixtral."


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
      mixtral-quant export gguf exports/gptq --type q4_0 --out exports/gptq.gguf
    """
    ctx.obj = {"debug": debug}
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1" and ctx.invoked_subcommand not in ("quantize", "eval"):
        raise MixtralQuantError(f"{ctx.invoked_subcommand} runs in one process, not under torchrun "
                                f"(WORLD_SIZE={world}); quantize and eval spread over ranks")


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
@click.option("--no-verify", is_flag=True, help="Read a quantized folder that has no manifest.json, unchecked.")
def generate(
    model: Path | None, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float,
    seed: int, device: str, dtype: str, backend: str, no_verify: bool,
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

        m = load_model(folder, dtype=DTYPES[dtype], device=resolve_device(device), no_verify=no_verify)
        new = run(m, ids, sampling, eos_id=tok.eos_id)
    new = [t for t in new if t != tok.eos_id]
    # Decode prompt and continuation together so the joining space survives.
    click.echo(tok.decode(new) if chat else tok.decode(ids[1:] + new))


@cli.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--recipe", "-r", required=True,
              help=f"A shipped recipe ({', '.join(shipped_recipes())}) or a recipe .toml file.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--bits", type=int, help="Override the recipe's bit width.")
@click.option("--group-size", type=int, help="Override the recipe's group size (-1: per output row).")
@click.option("--samples", type=int, help="Override the number of calibration sequences.")
@click.option("--seq-len", type=int, help="Override the calibration sequence length.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact or unfinished run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or closing table.")
def quantize(
    model: Path | None, recipe: str, out: Path, bits: int | None, group_size: int | None, samples: int | None,
    seq_len: int | None, device: str, resume: bool, overwrite: bool, quiet: bool,
) -> None:
    """Quantize every expert and attention projection of MODEL with a calibration RECIPE.

    Weights stream from disk one decoder layer at a time; the router, embeddings, lm_head and
    norms stay 16-bit. The artifact (Hugging Face layout, loadable by this tool, and by GPTQModel /
    vLLM for GPTQ or transformers for bitsandbytes) appears at OUT only when complete.

    \b
    Expert-parallel over processes or GPUs (torch.distributed; gloo on CPU, NCCL on CUDA):
      torchrun --nproc-per-node 2 -m mixtral_quant quantize --recipe gptq-w4g128 --out exports/gptq
    Each rank quantizes the experts e with e % N == rank; rank 0 writes. The bytes equal a
    one-process run's at torchrun's one thread per process. MIXTRAL_QUANT_TIMEOUT (seconds, default
    600) bounds every wait for another rank; after a failure, rerun with --resume.
    """
    from .distributed import ranks_from_env
    from .pipeline import quantize_model
    from .recipe import load_recipe
    from .summary import quantize_summary

    r = load_recipe(recipe, bits=bits, group_size=group_size, samples=samples, seq_len=seq_len)
    dev = resolve_device(device)
    ranks = ranks_from_env(dev)  # under torchrun: this process's rank; rank 0 writes and prints
    path = quantize_model(model, r, out, dev, resume=resume, overwrite=overwrite, progress=not quiet, ranks=ranks)
    ranks.close()
    if not ranks.main:
        return
    if not quiet:
        click.echo(quantize_summary(path, model))
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def verify(artifact: Path) -> None:
    """Check every file of ARTIFACT (a folder, or a .gguf file) against the sha256 hashes in its manifest."""
    if artifact.suffix == ".gguf" and not artifact.is_dir():
        from .export.gguf import manifest_path, verify_gguf

        verify_gguf(artifact)
        click.echo(f"ok: {artifact} matches {manifest_path(artifact)}")
        return
    from .artifact import verify as run

    manifest = run(artifact)
    click.echo(f"ok: {len(manifest['files'])} files match {artifact / 'manifest.json'}")


@cli.command("eval")
@click.argument("variants", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", "-b", type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--dataset", "-d", default="wiki-test", show_default=True,
              help="wiki-test or moby-dick (shipped; the novel is held out from the tiny model's training), a .txt "
                   "file, or wikitext2 (needs the datasets library and its cache).")
@click.option("--ctx", default=512, show_default=True, type=int, help="Window length in tokens.")
@click.option("--stride", type=int, help="Window step (default: ctx, no overlap).")
@click.option("--max-tokens", type=int,
              help="Score only the first N tokens of the dataset (like llama-perplexity --chunks or lm-eval --limit).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--report", "report_dir", type=click.Path(path_type=Path), help="Write report.json/.md/.html here.")
@click.option("--check", type=click.Path(path_type=Path), help="Bounds TOML: exit non-zero if a variant regressed.")
@click.option("--layer-sequential", is_flag=True, default=None,
              help="Run all windows layer by layer with weights streamed from disk (models larger than the device).")
@click.option("--no-verify", is_flag=True, help="Read a quantized folder that has no manifest.json, unchecked.")
def eval_cmd(
    variants: tuple[Path, ...], baseline: Path | None, dataset: str, ctx: int, stride: int | None,
    max_tokens: int | None, device: str, report_dir: Path | None, check: Path | None, layer_sequential: bool | None,
    no_verify: bool,
) -> None:
    """Perplexity, KL, router agreement, memory and speed of VARIANTS against the 16-bit baseline.

    \b
    Under torchrun the windows are divided among the ranks and their sums gathered in window order:
      torchrun --nproc-per-node 2 -m mixtral_quant eval exports/gptq --report exports/report
    """
    from .checkpoint import resolve_model
    from .distributed import ranks_from_env
    from .eval.report import markdown
    from .eval.runner import evaluate

    ranks = ranks_from_env(resolve_device(device))  # under torchrun: windows divided among the ranks
    report = evaluate(list(variants), resolve_model(baseline), dataset, ctx, stride, device, report_dir, check,
                      layer_sequential, no_verify=no_verify, max_tokens=max_tokens, ranks=ranks)
    ranks.close()
    if ranks.main:
        click.echo(markdown(report))


@cli.group()
def export() -> None:
    """Export an artifact for other runtimes."""


@export.command("onnx")
@click.argument("variant", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["ort", "standard"]), default="ort", show_default=True,
              help="ort: onnxruntime contrib ops (MoE/QMoE, GroupQueryAttention, MatMulNBits); standard: ai.onnx only.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--nf4-experts", type=click.Choice(["int8", "int4", "float"]), default="int8", show_default=True,
              help="How NF4 experts map to QMoE (it has no NF4 kernel).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (or start an unfinished one over).")
@click.option("--resume", is_flag=True, help="Continue an export that was interrupted (OUT.partial).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--no-verify", is_flag=True, help="Read a quantized folder that has no manifest.json, unchecked.")
def export_onnx_cmd(variant: Path | None, out: Path, target: str, dtype: str, nf4_experts: str,
                    overwrite: bool, resume: bool, quiet: bool, no_verify: bool) -> None:
    """Write VARIANT as an ONNX decoder with KV-cache inputs/outputs, genai_config.json and tokenizer."""
    from .checkpoint import resolve_model
    from .export import ExportDtype, NF4Experts, Target, export_onnx, export_summary

    path = export_onnx(resolve_model(variant), out, Target[target.upper()], ExportDtype[dtype.upper()],
                       overwrite, progress=not quiet, nf4_experts=NF4Experts[nf4_experts.upper()], resume=resume,
                       no_verify=no_verify)
    if not quiet:
        click.echo(export_summary(path))
    click.echo(f"wrote {path}")


GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q4_k", "q4_0"]


@export.command("gguf")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="The .gguf file to write.")
@click.option("--type", "type_", type=click.Choice(GGUF_TYPES), default="f16", show_default=True,
              help="Type of the decoder's linears (experts, attention). q4_0 / q8_0 keep an artifact's own codes "
                   "when its grid is that type (symmetric 4-/8-bit, groups a multiple of 32, as gptq-w4g32 or "
                   "gptq-w4g128), q4_k those of gptq-q4_k; anything else is re-quantized with llama.cpp's "
                   "round-to-nearest (q4_k, q6_k: ggml's reference quantizers).")
@click.option("--embedding-type", type=click.Choice(GGUF_TYPES), help="token_embd's type. Default: --type.")
@click.option("--output-type", type=click.Choice(GGUF_TYPES),
              help="The output head's type. Default: --type, or q6_k when --type is q4_0 or q4_k (as "
                   "llama-quantize).")
@click.option("--kv-type", type=click.Choice(GGUF_TYPES),
              help="Attention k/v's type. Default: --type; q8_0 for an 8-expert model from float at q4_0 or q4_k "
                   "(as llama-quantize).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT written by mixtral-quant.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or closing table.")
@click.option("--no-verify", is_flag=True, help="Read a quantized folder that has no manifest.json, unchecked.")
def export_gguf_cmd(source: Path | None, out: Path, type_: str, embedding_type: str | None, output_type: str | None,
                    kv_type: str | None, overwrite: bool, quiet: bool, no_verify: bool) -> None:
    """Write SOURCE (a float model or an artifact) as one GGUF file that llama.cpp runs.

    \b
    Tensors stream one layer at a time; OUT appears only when complete, with OUT.manifest.json
    (sha256, source, the type each component became). For example:
      mixtral-quant quantize --recipe gptq-w4g32 --out exports/gptq-w4g32
      mixtral-quant export gguf exports/gptq-w4g32 --type q4_0 --out exports/tiny-q4_0.gguf
      llama-cli -m exports/tiny-q4_0.gguf -p "The history of"
      mixtral-quant quantize --recipe gptq-q4_k --out exports/gptq-q4_k    # GPTQ on Q4_K's grid
      mixtral-quant export gguf exports/gptq-q4_k --type q4_k --out exports/tiny-q4_k.gguf
    """
    from .checkpoint import resolve_model
    from .export.gguf import GGUFOptions, GGUFType, export_gguf, gguf_summary

    def pick(name: str | None) -> GGUFType | None:
        return GGUFType(name) if name else None

    opts = GGUFOptions(GGUFType(type_), pick(embedding_type), pick(output_type), pick(kv_type))
    result = export_gguf(resolve_model(source), out, opts, overwrite, progress=not quiet, no_verify=no_verify)
    if not quiet:
        click.echo(gguf_summary(result))
    else:
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {result.path}")


@cli.command()
@click.option("--out", "-o", default=Path("exports/demo"), show_default=True, type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--recipe", "recipes", multiple=True, help="Only these recipes (repeatable). Default: all shipped.")
@click.option("--samples", default=32, show_default=True, type=int, help="Calibration sequences per recipe.")
@click.option("--eval-tokens", default=8192, show_default=True, type=int, help="Tokens of wiki-test to score.")
@click.option("--check", type=click.Path(path_type=Path), help="Bounds TOML for the regression gate.")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX exports.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def demo(out: Path, model: Path | None, recipes: tuple[str, ...], samples: int, eval_tokens: int,
         check: Path | None, no_onnx: bool, device: str) -> None:
    """Quantize the tiny model with every recipe, export ONNX, evaluate all against fp16."""
    from .demo import run_demo
    from .eval.report import markdown

    report = run_demo(out, model, list(recipes) or None, samples, eval_tokens, 512, check, not no_onnx,
                      resolve_device(device), say=click.echo)
    click.echo(markdown(report))
    click.echo(f"reports in {out / 'report'}")


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
    except OSError as e:  # a path the system refuses: one line, as for the project's own errors
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"error: {e.strerror or e}{where}", err=True)
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
