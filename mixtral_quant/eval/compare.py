"""How far a variant's predictions move from the baseline's, window by window in lockstep.

Both models see the same windows (see :mod:`mixtral_quant.eval.perplexity`); at every position
that predicts a scored token we measure

* KL(baseline || variant) = sum_v p_b(v) (log p_b(v) - log p_v(v)) of the next-token
  distributions, in nats, averaged over those positions;
* whether the top-1 prediction changed (share of positions);
* per MoE layer, whether the set of the K experts the router picks (top-K of its logits,
  K = num_experts_per_tok) is the same as the baseline's (share of positions: router agreement).
  A model without MoE layers (Mistral) has no router agreement: ``None``.

Shape legend: n scored positions of a window, V vocabulary, E experts, K active experts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.eval.perplexity import WindowOutput


@dataclass(frozen=True)
class Comparison:
    kl_mean: float  # nats per scored position
    top1_changed: float  # share of scored positions
    router_agreement: list[float] | None  # per MoE layer; None without MoE
    tokens: int  # scored positions compared
    windows: int

    @property
    def min_router_agreement(self) -> float | None:
        return min(self.router_agreement) if self.router_agreement else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kl_divergence(base_logits: torch.Tensor, var_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_var) per row of logits [n, V], in nats (float32)."""
    logp = F.log_softmax(base_logits.float(), dim=-1)  # [n, V]
    p = logp.exp()
    logp.sub_(F.log_softmax(var_logits.float(), dim=-1))  # log p - log q, in place: V is large
    return torch.linalg.vecdot(p, logp)


def expert_sets(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The chosen experts of each position as a sorted index row: logits [n, E] -> [n, K]."""
    return torch.topk(router_logits.float(), top_k, dim=-1).indices.sort(dim=-1).values


@dataclass(frozen=True)
class WindowComparison:
    """One window's sums: KL (nats), top-1 changes, positions, router agreements per MoE layer."""

    begin: int
    kl: float
    changed: int
    tokens: int
    agree: tuple[int, ...]


class ComparisonAccumulator:
    """Adds up the comparison of one window's outputs at a time; each window's sums are kept
    (``parts``) and added in window order, so windows compared on several ranks (:meth:`combine`)
    give the same floats as one process comparing them all."""

    def __init__(self, top_k: int | None) -> None:
        self.top_k = top_k
        self.parts: list[WindowComparison] = []

    def add(self, base: WindowOutput, var: WindowOutput) -> None:
        if base.window != var.window:
            raise MixtralQuantError(f"windows out of step: baseline {base.window}, variant {var.window}")
        if base.logits.shape != var.logits.shape:
            raise MixtralQuantError(
                f"baseline and variant logits differ in shape ({tuple(base.logits.shape)} vs "
                f"{tuple(var.logits.shape)}): compare models with the same vocabulary"
            )
        rows = base.window.scored_rows()
        b, v = base.logits[rows], var.logits[rows].to(base.logits.device)  # [n, V]
        kl = float(kl_divergence(b, v).double().sum())
        changed = int((b.argmax(-1) != v.argmax(-1)).sum())
        agree: list[int] = []
        if self.top_k is not None:
            if len(base.router_logits) != len(var.router_logits):
                raise MixtralQuantError(
                    f"baseline has {len(base.router_logits)} MoE layers, variant {len(var.router_logits)}"
                )
            for rb, rv in zip(base.router_logits, var.router_logits, strict=True):
                sb = expert_sets(rb[rows], self.top_k)
                sv = expert_sets(rv[rows].to(rb.device), self.top_k)
                agree.append(int((sb == sv).all(-1).sum()))
        self.parts.append(WindowComparison(base.window.begin, kl, changed, b.shape[0], tuple(agree)))

    def combine(self, parts: Iterable[list[WindowComparison]]) -> None:
        """Take every rank's windows (``parts`` of each, in any order) in place of this one's."""
        self.parts = [p for ps in parts for p in ps]

    def result(self) -> Comparison:
        kl, changed, tokens = 0.0, 0, 0
        agree: list[int] = []
        for p in sorted(self.parts, key=lambda p: p.begin):
            kl += p.kl
            changed += p.changed
            tokens += p.tokens
            agree = [a + b for a, b in zip(agree, p.agree, strict=True)] if agree else list(p.agree)
        if tokens == 0:
            raise MixtralQuantError("nothing was compared: the dataset produced no scored tokens")
        agreement = [a / tokens for a in agree] if self.top_k is not None else None
        return Comparison(
            kl_mean=kl / tokens,
            top1_changed=changed / tokens,
            router_agreement=agreement,
            tokens=tokens,
            windows=len(self.parts),
        )


def compare(
    baseline: Iterable[WindowOutput],
    variant: Iterable[WindowOutput],
    top_k: int | None,
    progress: bool = False,
    total: int | None = None,
) -> Comparison:
    """Compare two streams of window outputs in lockstep.

    ``top_k`` is the experts per token of a MoE model (router agreement needs router logits in
    both streams) or None for a dense model.
    """
    acc = ComparisonAccumulator(top_k)
    pairs = zip(baseline, variant, strict=True)
    for base, var in tqdm(pairs, total=total, desc="compare", disable=not progress, leave=False):
        acc.add(base, var)
    return acc.result()
