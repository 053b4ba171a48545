"""A decoder layer run over the calibration activations, chunk by chunk, and the Hessians of the inputs
its linears receive: the part of layer-sequential calibration that computes, not the part that
decides (mixtral_quant/calibrate.py).

Routed experts' inputs are computed from the router's choice (:meth:`LayerInputs.capture_routed`), the
rows the MoE block would hand each expert, without running the other experts: at Mixtral-8x7B's
shapes a pass for one expert's w2 Hessian then costs one expert, not the whole block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .cache import attention_context
from .config import MixtralConfig
from .model import DecoderLayer, Expert
from .quant import HessianAccumulator


class LayerInputs:
    """Runs ``layer`` over activations ``[B, S, M]`` in chunks of ``chunk`` sequences on ``device``."""

    def __init__(self, layer: DecoderLayer, cfg: MixtralConfig, device: torch.device, chunk: int = 8) -> None:
        self.layer, self.cfg, self.device, self.chunk = layer, cfg, device, chunk
        self._ctx: dict[int, Any] = {}

    def ctx(self, b: int, s: int) -> Any:
        if b not in self._ctx:
            self._ctx[b] = attention_context(self.cfg, b, s, None, 0, torch.float32, self.device)
        return self._ctx[b]

    def each_chunk(self, h: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> list[torch.Tensor]:
        outs = []
        for start in range(0, h.shape[0], self.chunk):
            y = fn(h[start : start + self.chunk].to(self.device))
            if y is not None:
                outs.append(y.to("cpu"))
        return outs

    def attn_out(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer.self_attn(self.layer.input_layernorm(x), self.ctx(x.shape[0], x.shape[1]), None)

    def mlp_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.post_attention_layernorm(self.attn_out(x))

    def hessian_of(self, h: torch.Tensor, inputs: Callable[[torch.Tensor], torch.Tensor]) -> HessianAccumulator:
        acc: HessianAccumulator | None = None
        for start in range(0, h.shape[0], self.chunk):
            x = inputs(h[start : start + self.chunk].to(self.device))
            if acc is None:
                acc = HessianAccumulator(x.shape[-1], device=self.device)
            acc.add(x)
        assert acc is not None
        return acc

    def capture(self, h: torch.Tensor, modules: Mapping[str, nn.Module], run: Callable[[torch.Tensor], Any]
                ) -> dict[str, HessianAccumulator]:
        """Hessians of the inputs each module receives while ``run`` goes over the activations."""
        accs: dict[str, HessianAccumulator] = {}

        def hook(name: str) -> Callable[..., None]:
            def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0]
                if name not in accs:
                    accs[name] = HessianAccumulator(x.shape[-1], device=self.device)
                accs[name].add(x)
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        def consume(x: torch.Tensor) -> None:
            run(x)

        try:
            self.each_chunk(h, consume)
        finally:
            for handle in handles:
                handle.remove()
        return accs

    def capture_routed(self, h: torch.Tensor, experts: list[int], inputs: Callable[[Expert, torch.Tensor], torch.Tensor]
                       ) -> dict[str, HessianAccumulator]:  # fmt: skip
        """Hessians of ``inputs(expert, x)`` for each of ``experts``, ``x`` the rows of the MoE block's
        inputs ``h`` the router sends it, chunk by chunk: what a hook on the expert would see while
        the block runs, without running the other experts. An expert that gets no token is absent."""
        moe = self.layer.block_sparse_moe
        assert moe is not None
        accs: dict[str, HessianAccumulator] = {}

        def consume(x: torch.Tensor) -> None:
            flat = x.reshape(-1, x.shape[-1])
            routed = moe.routed_tokens(flat)
            for e in experts:
                if e in routed:
                    y = inputs(moe.experts[e], flat[routed[e]])  # type: ignore[arg-type]
                    accs.setdefault(str(e), HessianAccumulator(y.shape[-1], device=self.device)).add(y)

        self.each_chunk(h, consume)
        return accs


def expert_input(_expert: Expert, x: torch.Tensor) -> torch.Tensor:
    """w1's (and w3's) input: the routed rows themselves."""
    return x
