"""``mixtral-quant quantize``: stream a checkpoint layer by layer through a recipe into an artifact.

Peak memory is one decoder layer plus the calibration activations: weights are read from disk per
layer and kept in their stored dtype (linears widen per call, see ``StoredLinear``), activations
stay on the CPU and move to the device a chunk at a time, expert Hessians are captured within a
byte budget, and each layer's shard is written as soon as it is quantized. Work happens in ``<out>.partial``; a
``state.json`` there is the commit point after each layer, so ``--resume`` continues after the
last finished layer and the result has the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .artifact import (
    STATE,
    check_output,
    output_lock,
    prepare_output,
    publish,
    read_state,
    remove_scraps,
    run_errors,
    sha256_bytes,
    sha256_file,
    write_json,
    write_manifest,
)
from .calibrate import LayerQuantizer, LayerReport, calibration_tokens
from .checkpoint import INDEX_FILE, CheckpointReader, load_config, quantization_config, resolve_model
from .config import MixtralConfig, read_config_json
from .distributed import Ranks, ranks_from_env
from .errors import IntegrityError, MixtralQuantError
from .hf_tokenizer import write_tokenizer_files
from .loading import check_checkpoint, load_layer, load_linears
from .mixed_probe import check_budget, mixed_record, plan_widths
from .quant import get_method
from .quant.scheme import dynamic_entry
from .recipe import Recipe
from .tokenizer import Tokenizer

CPU = torch.device("cpu")
COPY_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "LICENSE-tokenizer", "TOKENIZER_NOTICE.md")


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def quantize_model(
    model: str | Path | None,
    recipe: Recipe,
    out: Path,
    device: torch.device = CPU,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    chunk: int = 8,
    stop_after: int | None = None,
    ranks: Ranks | None = None,
) -> Path:
    """Quantize every expert and attention projection of MODEL with RECIPE into the artifact OUT.

    Bad input fails before anything is written; a full disk fails with the finished layers kept
    in ``<out>.partial`` for ``resume``. Under torchrun (``ranks`` None: from the environment) the
    experts of each layer are spread over the ranks (:class:`LayerQuantizer`) and rank 0 alone checks
    the output, writes and resumes; the artifact has the bytes of a one-process run at the same
    thread count per process (torchrun's default: 1).
    """
    ranks = ranks if ranks is not None else ranks_from_env(device)
    lock = output_lock(out) if ranks.main else contextlib.nullcontext()
    with run_errors(out), lock:
        return _quantize(model, recipe, out, device, resume, overwrite, progress and ranks.main, chunk, stop_after,
                         ranks)


def _quantize(model: str | Path | None, recipe: Recipe, out: Path, device: torch.device, resume: bool,
              overwrite: bool, progress: bool, chunk: int, stop_after: int | None, ranks: Ranks) -> Path:
    src = resolve_model(model)
    run = ranks.from_main(lambda: _prepare(src, recipe, out, resume, overwrite), "checking the inputs")
    cfg = load_config(src)
    reader = CheckpointReader(src)
    work, state = run.work, run.state
    done, h = run.layers_done, run.h
    if recipe.mixed is not None and "mixed" not in state:
        if ranks.world > 1:
            raise MixtralQuantError("a [mixed] recipe runs in one process so far: run it without torchrun")
        assert h is not None  # a run that has no plan yet has not finished a layer
        state["mixed"] = plan_widths(reader, cfg, recipe, h, device, chunk, progress)
    widths = state.get("mixed", {}).get("widths", {})
    bar = tqdm(range(done, cfg.num_hidden_layers), desc=f"quantize {recipe.name}", unit="layer",
               initial=done, total=cfg.num_hidden_layers, disable=not progress)
    # The experts' float weights are read one expert at a time as they are quantized, unless the method
    # looks at all of them first (AWQ's shared scale search) or they are kept as they are.
    lazy = recipe.quantizes("experts") and getattr(get_method(recipe.quant), "fake_quant", None) is None
    for i in bar:
        layer = load_layer(reader, cfg, i, torch.float32, device, keep_linears_stored=True,
                           defer=_is_expert_linear if lazy else None)  # fmt: skip
        fetch = partial(load_linears, reader, layer, dtype=torch.float32, device=device, keep_linears_stored=True)
        prefix = f"model.layers.{i}."
        mine = {n[len(prefix):]: b for n, b in widths.items() if n.startswith(prefix)}
        lq = LayerQuantizer(layer, cfg, recipe, device, chunk, ranks=ranks, fetch=fetch, widths=mine)
        assert h is not None
        h = lq.run(h)
        if ranks.main:
            _commit_layer(reader, work, state, i, layer, lq, h, cfg.num_hidden_layers)
        bar.set_postfix(err=f"{_mean(lq.report.errors):.2e}", s=f"{lq.report.seconds:.1f}")
        del layer, lq
        give_back_freed_memory()
        if stop_after is not None and i + 1 >= stop_after:
            raise MixtralQuantError(f"stopped after layer {i + 1} as asked; continue with --resume")
    reader.close()

    def finished() -> Path:
        finish(src, work, recipe, cfg.num_hidden_layers, run.identity, state, time.time() - run.started)
        return publish(work, out)

    return ranks.from_main(finished, "finishing the artifact")


def _is_expert_linear(name: str) -> bool:
    return name.startswith("block_sparse_moe.experts.")


@dataclass
class _Start:
    """Where a run starts: rank 0's work folder, state and identity; every rank's first layer and its inputs."""

    work: Path
    state: dict[str, Any]
    identity: dict[str, Any]
    layers_done: int
    h: torch.Tensor | None
    started: float


def _prepare(src: Path, recipe: Recipe, out: Path, resume: bool, overwrite: bool) -> _Start:
    """Check every input, prepare ``<out>.partial`` and read back an interrupted run's commit point."""
    check_output(out, overwrite, resume, src)
    if quantization_config(src):
        raise MixtralQuantError(f"{src} is already quantized: quantize from the 16-bit checkpoint")
    cfg = load_config(src)
    check = recipe.quant.validate_shape  # (in_features, out_features) of each kind of linear
    check(cfg.hidden_size, cfg.intermediate_size)
    check(cfg.intermediate_size, cfg.hidden_size)
    check(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim)
    check(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    if recipe.mixed is not None:
        check_budget(recipe, cfg)
    if not (src / "tokenizer.model").is_file():
        raise MixtralQuantError(f"{src} has no tokenizer.model: calibration text must be tokenized with the "
                                "model's own tokenizer; copy it into the folder")
    tok = Tokenizer(src)
    with CheckpointReader(src) as reader:
        return _start(src, cfg, reader, recipe, tok, out, resume, overwrite)


def _start(src: Path, cfg: MixtralConfig, reader: CheckpointReader, recipe: Recipe, tok: Tokenizer, out: Path,
           resume: bool, overwrite: bool) -> _Start:  # fmt: skip
    check_checkpoint(reader, cfg)  # every tensor there, shaped, float and finite, before anything is written
    t_start = time.time()
    # Everything read from the source that changes the artifact's bytes: weights, config, tokenizer and
    # the files copied along. A resumed run must have the same, or it would mix two models.
    inputs = {*reader.files, src / "config.json", *(src / n for n in COPY_FILES if (src / n).is_file())}
    source_hashes = {f.name: sha256_file(f) for f in sorted(inputs)}
    tokens = calibration_tokens(recipe, tok) if recipe.needs_calibration else calibration_tokens_light(recipe, tok)
    if int(tokens.max()) >= cfg.vocab_size:
        raise MixtralQuantError(
            f"the tokenizer {tok.path} gives ids up to {int(tokens.max())} but the model's vocab_size is "
            f"{cfg.vocab_size}: put the model's own tokenizer.model in {src}"
        )
    cal_hash = sha256_bytes(tokens.numpy().tobytes())
    identity = {"recipe": recipe.digest(), "source": source_hashes, "calibration_sha256": cal_hash}
    work = prepare_output(out, overwrite, resume, src)
    n_shards = cfg.num_hidden_layers + 1
    state: dict[str, Any] = {"identity": identity, "layers_done": 0, "reports": [], "files": {}}
    if resume and (work / STATE).is_file():
        state = read_layer_state(work, identity, n_shards)
    done = int(state["layers_done"])
    h = None
    if done == 0:
        head = {n: reader.get(n) for n in reader.names if not n.startswith("model.layers.")}
        save_atomic(head, work / shard_name(1, n_shards))
        state["files"][shard_name(1, n_shards)] = sha256_file(work / shard_name(1, n_shards))
        del head
        h = torch.nn.functional.embedding(tokens, reader.get("model.embed_tokens.weight", torch.float32))
    elif done < cfg.num_hidden_layers:  # a run stopped while finishing has no activations left, nor needs them
        h = load_file(str(work / f"activations-{done}.safetensors"))["h"]
    return _Start(work, state, identity, done, h, t_start)


def _commit_layer(reader: CheckpointReader, work: Path, state: dict[str, Any], i: int, layer: torch.nn.Module,
                  lq: LayerQuantizer, h: torch.Tensor, n_layers: int) -> None:  # fmt: skip
    """Write layer ``i``'s shard and the next layer's inputs, then the commit point ``state.json``."""
    n_shards = n_layers + 1
    prefix = f"model.layers.{i}."
    quantized = {prefix + k: v for k, v in lq.tensors.items()}
    replaced = {k.rsplit(".", 1)[0] for k in lq.tensors}
    # float tensors the method changed (AWQ's folded norms and router), in their stored dtype
    changed = {prefix + n: layer.get_parameter(n).detach().cpu().to(reader.get(prefix + n).dtype)
               for n in sorted(lq.changed)}  # fmt: skip
    kept = {n: reader.get(n) for n in reader.names
            if n.startswith(prefix) and n[len(prefix):].rsplit(".", 1)[0] not in replaced and n not in changed}
    save_atomic({**kept, **changed, **quantized}, work / shard_name(i + 2, n_shards))
    del kept, quantized
    save_atomic({"h": h.contiguous()}, work / f"activations-{i + 1}.safetensors")
    state["files"][shard_name(i + 2, n_shards)] = sha256_file(work / shard_name(i + 2, n_shards))
    state["files"].pop(f"activations-{i}.safetensors", None)
    if i + 1 < n_layers:  # the next layer's inputs; the last layer's outputs are not needed
        act = f"activations-{i + 1}.safetensors"
        state["files"][act] = sha256_file(work / act)
    state["layers_done"] = i + 1
    state["reports"].append(asdict(lq.report))
    write_json(work / STATE, state)
    (work / f"activations-{i}.safetensors").unlink(missing_ok=True)


def read_layer_state(work: Path, identity: dict[str, Any], n_shards: int) -> dict[str, Any]:
    """The commit point of an interrupted run, checked: the same inputs, and every file it names
    (shards, saved activations) present with the bytes it recorded."""
    damaged = f"{work / STATE} is damaged"
    state = read_state(work, identity, {"files": dict, "layers_done": int, "reports": list},
                       "another source model (weights, config or tokenizer), recipe or calibration data")
    if not 0 <= state["layers_done"] < n_shards:
        raise IntegrityError(f"{damaged} (layers_done {state['layers_done']}): start over with --overwrite")
    for name, digest in sorted(state["files"].items()):
        path = work / name
        if not path.is_file() or sha256_file(path) != digest:
            what = "missing" if not path.is_file() else "changed since it was written"
            raise IntegrityError(f"{path} is {what}: the unfinished run cannot continue; start over with --overwrite")
    return state


def give_back_freed_memory() -> None:
    """Free a finished layer before the next one loads: collect reference cycles (bitsandbytes'
    ``Params4bit`` points back at its module, so a dropped layer outlives ``del``) and return freed
    heap pages to the OS (glibc ``malloc_trim``; medium-sized buffers otherwise stay resident)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def calibration_tokens_light(recipe: Recipe, tok: Tokenizer) -> torch.Tensor:
    """Methods without a Hessian still run the layers (to count tokens per expert) on a few sequences."""
    from dataclasses import replace

    small = replace(recipe, calibration=replace(recipe.calibration, samples=min(16, recipe.calibration.samples)))
    return calibration_tokens(small, tok)


def finish(src: Path, work: Path, recipe: Recipe, n_layers: int, identity: dict[str, Any],
           state: dict[str, Any], seconds: float) -> None:
    """Index, config with quantization_config, tokenizer, calibration record, manifest."""
    for scrap in work.glob("activations-*.safetensors"):
        scrap.unlink()
    remove_scraps(work)  # a killed run's half-written files
    n = n_layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(1, n + 1):
        with safe_open(str(work / shard_name(k, n)), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                weight_map[name] = shard_name(k, n)
        total += (work / shard_name(k, n)).stat().st_size
    write_json(work / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    method = get_method(recipe.quant)
    qc = method.quantization_config()
    if "mixed" in state:  # GPTQModel's per-module override: the widths that differ from qc's bits
        qc["dynamic"] = dynamic_entry(recipe.quant, state["mixed"]["widths"])
    if "llm_int8_skip_modules" in qc:  # bitsandbytes' entry: the Mixtral modules it leaves in float
        qc["llm_int8_skip_modules"] = ["block_sparse_moe.gate", "lm_head"]
    config = read_config_json(src)
    config["quantization_config"] = qc
    write_json(work / "config.json", config)
    for name in method.config_files:
        write_json(work / name, qc)
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, work / name)
    # GPTQModel, transformers and vLLM read tokenizer.json; build it from tokenizer.model when missing.
    write_tokenizer_files(work, int(config.get("max_position_embeddings", 4096)))
    reports = [LayerReport(**r) for r in state["reports"]]
    calibration = {
        "recipe": recipe.to_dict(),
        "expert_policy": recipe.experts.policy.value,
        "tokens_per_expert": [r.tokens_per_expert for r in reports],
        "fallbacks": {f"model.layers.{r.layer}.{m}": why for r in reports for m, why in r.fallbacks.items()},
        "damping_raised": {f"model.layers.{r.layer}.{m}": d for r in reports for m, d in r.damp.items()},
        "errors": {f"model.layers.{r.layer}.{m}": e for r in reports for m, e in sorted(r.errors.items())},
    }
    if any(r.awq_alpha for r in reports):  # AWQ: the alpha each folding point's scale search chose
        calibration["awq_alpha"] = {f"model.layers.{r.layer}.{p}": a for r in reports for p, a in r.awq_alpha.items()}
    if "mixed" in state:
        calibration["mixed"] = mixed_record(state["mixed"], reports, recipe)
    write_json(work / "calibration.json", calibration)
    write_json(work / "run_log.json", {"seconds": seconds, "layer_seconds": [r.seconds for r in reports]})
    (work / STATE).unlink()
    write_manifest(work, {"recipe": recipe.to_dict(), "source_files": identity["source"],
                          "calibration_sha256": identity["calibration_sha256"], "source_model": src.name})


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / max(1, len(d))
