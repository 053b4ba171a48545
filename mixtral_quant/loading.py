"""Load any model folder (fp16/bf16 checkpoint or quantized artifact) into the reference model.

The model is built on the meta device and each module is filled from the checkpoint one tensor
at a time; a linear whose stored tensors carry a quantization method's names becomes that
method's runtime module. Every expected tensor must be there with its exact shape and every
stored tensor must be used, so a partial or foreign checkpoint fails with its name, never with a
randomly initialised weight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .artifact import check_source
from .checkpoint import CheckpointReader, check_tensor, load_config, quantization_config, resolve_model
from .config import MixtralConfig
from .errors import CheckpointError
from .model import DecoderLayer, MixtralForCausalLM
from .quant import read_scheme
from .quant.base import Method
from .sizes import check_fits, parameter_counts, tensor_shapes
from .stored_linear import quantized_tensors


def check_layout(reader: CheckpointReader, cfg: MixtralConfig) -> None:
    """The checkpoint has the config's last layer and, for Mixtral, its last expert, and no layer past
    them: a config that claims far more layers or experts than the files hold fails here, before any
    module is built."""
    names = reader.names
    last = cfg.num_hidden_layers - 1
    wanted = [f"model.layers.{last}.input_layernorm.weight"]
    if cfg.moe is not None:
        wanted.append(f"model.layers.{last}.block_sparse_moe.experts.{cfg.moe.num_local_experts - 1}.w2.")
    for prefix in wanted:
        if not any(n.startswith(prefix) for n in names):
            raise CheckpointError(
                f"{reader.folder} has no tensor {prefix.rstrip('.')}: its config.json says {cfg.num_hidden_layers} "
                f"layers and {cfg.num_experts} experts, more than the checkpoint holds")
    beyond = f"model.layers.{cfg.num_hidden_layers}."
    if any(n.startswith(beyond) for n in names):
        raise CheckpointError(f"{reader.folder} holds layer {cfg.num_hidden_layers}, but its config.json says "
                              f"{cfg.num_hidden_layers} layers")


def load_model(
    folder: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    no_verify: bool = False,
) -> MixtralForCausalLM:
    """Build the reference model from a folder; quantized linears become runtime modules.

    A folder with a manifest.json (an artifact this tool wrote) is verified first, each file hashed
    once: a file changed since it was written is an IntegrityError that names it. A quantized folder
    without a manifest is refused unless ``no_verify``.
    """
    path = resolve_model(folder)
    cfg = load_config(path)
    qc = quantization_config(path)
    check_source(path, quantized=bool(qc), no_verify=no_verify)
    scheme = read_scheme(qc) if qc else None
    with CheckpointReader(path) as reader:
        check_layout(reader, cfg)
        if scheme is None:
            nbytes = sum(parameter_counts(cfg).values()) * dtype.itemsize
            check_fits(f"{path.name} in {str(dtype).removeprefix('torch.')}", nbytes, torch.device(device),
                       "evaluate it with --layer-sequential, or use a smaller dtype")
        with torch.device("meta"):
            model = MixtralForCausalLM(cfg)
        present = set(reader.names)
        used: set[str] = set()
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                method = scheme.method_for(name) if scheme is not None else None
                _load_linear(model, name, module, reader, method, dtype, device, used)
            elif isinstance(module, nn.Embedding) or name.endswith("norm"):
                pname = f"{name}.weight"
                shape = tuple(module.weight.shape)
                t = _get(reader, pname, shape, dtype, device, path)
                module.weight = nn.Parameter(t, requires_grad=False)
                used.add(pname)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        unexpected = sorted(present - used)
        if unexpected:
            raise CheckpointError(
                f"{path} holds tensors the {cfg.model_type} config has no place for: {', '.join(unexpected[:5])}"
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            )
    model.eval()
    return model


def _get(
    reader: CheckpointReader, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
    folder: Path,
) -> torch.Tensor:
    return _checked(reader, name, shape, folder).to(device=device, dtype=dtype)


def _checked(reader: CheckpointReader, name: str, shape: tuple[int, ...], folder: Path) -> torch.Tensor:
    """A float tensor as stored, present, of the config's shape, finite."""
    if name not in reader.where:
        raise CheckpointError(f"tensor {name} is missing from {folder}")
    t = reader.get(name)
    check_tensor(name, t, shape, folder)
    if not t.is_floating_point():
        raise CheckpointError(f"tensor {name} in {folder} is {t.dtype}, expected a float weight")
    return t


def check_checkpoint(reader: CheckpointReader, cfg: MixtralConfig) -> None:
    """A 16-bit checkpoint holds every tensor the config needs, shaped, float and finite, and nothing else.

    Reads each tensor once, one at a time: ``quantize`` runs it before writing anything,
    so a damaged source fails at once, naming the tensor, rather than hours into a run.
    """
    check_layout(reader, cfg)
    expected = dict(tensor_shapes(cfg))
    if cfg.tie_word_embeddings and "lm_head.weight" not in reader.where:
        del expected["lm_head.weight"]
    unexpected = sorted(set(reader.names) - set(expected))
    if unexpected:
        raise CheckpointError(f"{reader.folder} holds tensors the {cfg.model_type} config has no place for: "
                              f"{', '.join(unexpected[:3])}" + (" and more" if len(unexpected) > 3 else ""))
    for name, shape in expected.items():
        _checked(reader, name, shape, reader.folder)


def _load_linear(
    model: MixtralForCausalLM,
    name: str,
    module: nn.Linear,
    reader: CheckpointReader,
    method: Method | None,
    dtype: torch.dtype,
    device: torch.device | str,
    used: set[str],
) -> None:
    if name == "lm_head" and model.cfg.tie_word_embeddings and "lm_head.weight" not in reader.where:
        return
    out_f, in_f = module.out_features, module.in_features
    tensors = quantized_tensors(reader, method, name)
    if tensors is not None:
        assert method is not None
        used.update(f"{name}.{suffix}" for suffix in tensors)
        quantized = method.make_module(tensors, in_f, out_f).to(device)
        model.set_submodule(name, quantized)
        return
    weight = _get(reader, f"{name}.weight", (out_f, in_f), dtype, device, reader.folder)
    module.weight = nn.Parameter(weight, requires_grad=False)
    used.add(f"{name}.weight")


def new_model(cfg: MixtralConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> MixtralForCausalLM:
    """A freshly initialised model (normal(0, initializer_range) weights, unit norms): tests and references."""
    gen = torch.Generator().manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.initializer_range)
    return model.to(dtype).eval()


class StoredLinear(nn.Linear):
    """A linear whose weight stays in its checkpoint dtype (bf16, fp16) and is cast to the input's
    dtype on each call. Widening a float is exact, so the output equals the widened layer's bit for
    bit, while the layer holds half the bytes: a quantization run keeps one bf16 decoder layer (2.9 GB
    for Mixtral-8x7B) rather than its float32 copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def load_layer(
    reader: CheckpointReader, cfg: MixtralConfig, i: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", keep_linears_stored: bool = False,
    defer: Callable[[str], bool] | None = None,
) -> DecoderLayer:
    """Decoder layer i of a float checkpoint, strictly (every tensor present, shaped, finite, used).

    With ``keep_linears_stored`` a linear stored narrower than ``dtype`` stays as stored, a
    :class:`StoredLinear` that computes in ``dtype``; norms are always ``dtype``. A linear for which
    ``defer(name)`` holds is not read: its weight stays on the meta device until
    :func:`load_linears` reads it (quantization reads each expert just before its turn).
    """
    with torch.device("meta"):
        layer = DecoderLayer(cfg, i)
    prefix = f"model.layers.{i}."
    expected = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    stored = [n[len(prefix):] for n in reader.names if n.startswith(prefix)]
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise CheckpointError(f"{reader.folder} holds tensors the config has no place for: {prefix}{unexpected[0]}")
    linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    deferred = {n for n in linears if defer is not None and defer(n)}
    state = {rel: shape for rel, shape in expected.items() if rel.rsplit(".", 1)[0] not in deferred}
    _load_into(reader, layer, prefix, state, linears, dtype, device, keep_linears_stored)
    unread = sorted({n.rsplit(".", 1)[0] for n, t in layer.state_dict().items() if t.is_meta} - deferred)
    assert not unread, unread
    return layer.requires_grad_(False).eval()


def load_linears(reader: CheckpointReader, layer: DecoderLayer, names: list[str], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", keep_linears_stored: bool = False) -> None:  # fmt: skip
    """Read the linears ``names`` of a layer that :func:`load_layer` deferred (checked the same way)."""
    prefix = f"model.layers.{layer.self_attn.layer_idx}."
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    state = {rel: shapes[rel] for rel in shapes if rel.rsplit(".", 1)[0] in names}
    _load_into(reader, layer, prefix, state, set(names), dtype, device, keep_linears_stored)
    layer.requires_grad_(False)


def _load_into(reader: CheckpointReader, layer: nn.Module, prefix: str, shapes: dict[str, tuple[int, ...]],
               linears: set[str], dtype: torch.dtype, device: torch.device | str, keep_linears_stored: bool
               ) -> None:  # fmt: skip
    state = {}
    narrow: list[str] = []
    for rel, shape in shapes.items():
        t = _checked(reader, prefix + rel, shape, reader.folder)
        module = rel.rsplit(".", 1)[0]
        if keep_linears_stored and module in linears and t.element_size() < dtype.itemsize:
            narrow.append(module)
            state[rel] = t.to(device)
        else:
            state[rel] = t.to(device=device, dtype=dtype)
        del t
    layer.load_state_dict(state, assign=True, strict=False)
    for name in narrow:
        old = layer.get_submodule(name)
        assert isinstance(old, nn.Linear)
        with torch.device("meta"):
            new = StoredLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight, new.bias = old.weight, old.bias
        layer.set_submodule(name, new)
