"""Ranks of a torch.distributed run: who owns which unit of work, and the few collectives we use.

Launched by torchrun (``torchrun --nproc-per-node N -m mixtral_quant quantize ...``), every process reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from its environment and joins one process group: gloo on the
CPU, NCCL on CUDA (each rank on GPU ``LOCAL_RANK``). Without torchrun there is one rank and every
collective is the identity, so the single-process path is the same code.

Work is split by unit index: unit ``k`` (an expert of a layer, a layer's attention, an evaluation
window, a variant's speed run) belongs to rank ``k % world``. Results travel as pickled Python objects
(``broadcast_object_list`` / ``all_gather_object``): quantized tensors are exact bytes, so a rank that
receives an expert's codes holds the same tensors as the rank that computed them.

A collective waits at most ``MIXTRAL_QUANT_TIMEOUT`` seconds (default 600): a rank that died or hangs
ends every other rank with one :class:`RankError` line instead of a hang; ``--resume`` continues from the
last layer rank 0 committed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import MixtralQuantError

T = TypeVar("T")
TIMEOUT_ENV = "MIXTRAL_QUANT_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class RankError(MixtralQuantError):
    """A collective failed: another rank died, hung past the timeout, or the group could not form."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world``; ``Ranks()`` is the single-process run."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes files, reports and progress bars."""
        return self.rank == 0

    def owner(self, unit: int) -> int:
        return unit % self.world

    def mine(self, unit: int) -> bool:
        return self.owner(unit) == self.rank

    def share(self, value: T | None, owner: int, what: str) -> T:
        """``value`` as computed on rank ``owner`` (others pass None), on every rank."""
        if self.world == 1:
            assert value is not None
            return value
        box = [value if self.rank == owner else None]
        _collective(lambda: dist.broadcast_object_list(box, src=owner), what)
        return box[0]  # type: ignore[return-value]

    def gather(self, value: T, what: str) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        _collective(lambda: dist.all_gather_object(out, value), what)
        return out

    def from_main(self, work: Callable[[], T], what: str) -> T:
        """``work()`` run on rank 0 only (checks, writes), its result on every rank; a failure there
        is raised on every rank (the same error class and line on the others), so no rank waits for
        a rank 0 that has given up."""
        if self.world == 1:
            return work()
        result: T | None = None
        failure: BaseException | None = None
        if self.main:
            try:
                result = work()
            except Exception as e:  # handed to the other ranks, then raised here too
                failure = e
        kind = type(failure) if isinstance(failure, MixtralQuantError) else MixtralQuantError
        told = self.share((result, None if failure is None else (kind, str(failure))) if self.main else None, 0, what)
        if failure is not None:
            raise failure
        if told[1] is not None:
            raise told[1][0](told[1][1])
        return told[0]  # type: ignore[return-value]

    def barrier(self, what: str) -> None:
        if self.world > 1:
            _collective(dist.barrier, what)

    def close(self) -> None:
        """Leave the process group after a finished command (NCCL warns at exit otherwise)."""
        if self.world > 1 and dist.is_initialized():
            self.barrier("finishing")
            dist.destroy_process_group()


SINGLE = Ranks()


def _collective(call: Callable[[], object], what: str) -> None:
    try:
        call()
    except (RuntimeError, dist.DistError) as e:  # gloo/NCCL: a peer closed its connection or the wait timed out
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankError(f"rank {dist.get_rank()} of {dist.get_world_size()} lost the other ranks while {what} "
                        f"({first[:200]}); finished layers are kept: rerun with --resume") from None


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise MixtralQuantError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds (> 0)")
    return value


def ranks_from_env(device: torch.device) -> Ranks:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (once per process), else the single rank.
    On CUDA each rank takes GPU ``LOCAL_RANK`` and NCCL; on the CPU, gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
        except (RuntimeError, ValueError, dist.DistError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankError(f"could not join the {world}-rank process group ({first[:200]}): "
                            "launch with torchrun") from None
    signal.signal(signal.SIGTERM, _terminated)
    return Ranks(dist.get_rank(), dist.get_world_size())


def _terminated(signum: int, _frame: object) -> None:
    """torchrun ends every rank with SIGTERM when one fails: say so in one line, not a traceback."""
    rank = dist.get_rank() if dist.is_initialized() else "?"
    raise RankError(f"rank {rank} stopped by {signal.Signals(signum).name}: the launcher ends every rank when one "
                    "fails (its report names the rank); finished layers are kept: rerun with --resume")
