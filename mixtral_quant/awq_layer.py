"""AWQ inside the layer-sequential driver: search each folding point's scales on the layer's calibration
inputs and fold them into the layer before its linears are quantized (the maths: quant/awq.py and
quant/awq_fold.py).

Attention first, on the layer's inputs: the input norm's scales over q/k/v, then v -> o (one scale per
key/value channel, shared by the query heads that read it). The MLP after attention is quantized, on the
MoE block's inputs: the post-attention norm's scales over the router and every expert's w1/w3, each
expert's error counted on the tokens the router sends it, then each expert's w3 -> w2 on its own tokens.
An expert that got no tokens keeps its weights as they are (scale 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mixtral_quant.layer_inputs import expert_input
from mixtral_quant.model import Expert
from mixtral_quant.quant.awq import ScaleGroup, channel_rms, search_scale
from mixtral_quant.quant.awq_fold import fold_norm, fold_up_down, fold_value_output
from mixtral_quant.quant.gptq import HessianAccumulator

if TYPE_CHECKING:
    from mixtral_quant.calibrate import LayerQuantizer


def _group(weights: list[torch.Tensor], acc: HessianAccumulator) -> ScaleGroup:
    return ScaleGroup(weights, acc.hessian / 2, acc.count)


def fold_attention(q: LayerQuantizer, h: torch.Tensor, fake_quant: Any) -> None:
    """Input norm -> q/k/v, then v -> o, searched on the layer's inputs ``h`` and folded."""
    layer, attn = q.layer, q.layer.self_attn
    acc = q.inputs.hessian_of(h, layer.input_layernorm)
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    s, alpha, _ = search_scale([_group([m.weight for m in qkv], acc)], channel_rms(acc.hessian), fake_quant)
    fold_norm(layer.input_layernorm, qkv, s)
    q.changed.add("input_layernorm.weight")
    q.report.awq_alpha["input_layernorm"] = alpha
    cfg = attn.cfg
    acc_o = q.inputs.capture(h, {"o": attn.o_proj}, q.inputs.attn_out)["o"]
    per_kv = channel_rms(acc_o.hessian).view(cfg.num_key_value_heads, cfg.n_rep, cfg.head_dim).mean(1).reshape(-1)

    def expand(s_kv: torch.Tensor) -> torch.Tensor:
        return s_kv.view(cfg.num_key_value_heads, cfg.head_dim).repeat_interleave(cfg.n_rep, dim=0).reshape(-1)

    s, alpha, _ = search_scale([_group([attn.o_proj.weight], acc_o)], per_kv, fake_quant, expand=expand)
    fold_value_output(attn, s)
    q.report.awq_alpha["v_proj->o_proj"] = alpha


def fold_experts(q: LayerQuantizer, mlp_in: torch.Tensor, fake_quant: Any) -> torch.Tensor:
    """Post-attention norm -> router and every expert's w1/w3 (searched on the MoE block's inputs
    ``mlp_in``), then each expert's w3 -> w2; returns the MoE block's inputs under the folded norm."""
    layer, moe = q.layer, q.layer.block_sparse_moe
    assert moe is not None
    experts: list[Expert] = list(moe.experts)  # type: ignore[arg-type]
    routed = q.inputs.capture_routed(mlp_in, list(range(len(experts))), expert_input)
    groups = [_group([experts[int(e)].w1.weight, experts[int(e)].w3.weight], acc) for e, acc in routed.items()]
    every = q.inputs.hessian_of(mlp_in, lambda x: x)
    s, alpha, _ = search_scale(groups, channel_rms(every.hessian), fake_quant)
    readers = [moe.gate, *(x.w1 for x in experts), *(x.w3 for x in experts)]
    fold_norm(layer.post_attention_layernorm, readers, s)  # the router's weight takes s too: same experts
    q.changed.update({"post_attention_layernorm.weight", "block_sparse_moe.gate.weight"})
    q.report.awq_alpha["post_attention_layernorm"] = alpha
    mlp_in = torch.cat(q.inputs.each_chunk(mlp_in, lambda x: x / s.to(x.device, x.dtype)))  # under the folded norm
    for e, expert in enumerate(experts):
        acc = q.inputs.capture_routed(mlp_in, [e], Expert.hidden).get(str(e))
        if acc is None or acc.count == 0:
            continue
        s_e, alpha, _ = search_scale([_group([expert.w2.weight], acc)], channel_rms(acc.hessian), fake_quant)
        fold_up_down(expert, s_e)
        q.report.awq_alpha[f"experts.{e}.w3->w2"] = alpha
    return mlp_in
