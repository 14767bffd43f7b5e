"""Calibration over several processes with ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Launched by ``torchrun --nproc-per-node N -m optimum_lowrank.cli optimize ...`` (or with
``--nnodes``), every rank runs the same recipe:

1. :func:`init_distributed` joins the process group torchrun describes in the
   environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), with the recipe's
   ``execution.timeout_s`` as the timeout of every collective;
2. :meth:`Ranks.agree` compares a hash of the recipe and the model on every rank: a
   mismatch is a :class:`~optimum_lowrank.errors.DistributedError` on every rank;
3. each rank runs its share of the calibration windows (:meth:`Ranks.shard`) through
   the blocks; the statistics the passes collect are sums over tokens, so
   :meth:`Ranks.reduce_collected` (``all_reduce``, SUM) makes them equal on every rank
   to the single-process ones, up to float64 rounding;
4. :meth:`Ranks.map_layers` spreads the per-layer decompositions over the ranks and
   gathers the results (``all_gather_object``);
5. only rank 0 writes (see :mod:`optimum_lowrank.execution.sequential`).

A rank that dies or stops answering makes the others fail within ``timeout_s`` with a
DistributedError naming the step (gloo usually notices a closed connection at once);
rank 0 writes its output through :func:`optimum_lowrank.output.staging`, so nothing
half-written is left.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from optimum_lowrank.errors import DataError, DistributedError
from optimum_lowrank.linalg.whitening import InputStatistics

__all__ = ["Ranks", "checked_output", "digest", "init_distributed", "joined", "world_size_from_env"]


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@dataclass
class Ranks:
    """This process's place in a multi-process run.

    Attributes
    ----------
    rank, world_size, local_rank : int
    backend : {"gloo", "nccl"}
    timeout_s : float
        Timeout of every collective, seconds.
    owns_group : bool
        Whether :func:`init_distributed` created the process group (and :meth:`close` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.world_size} processes ({self.backend}); this is rank {self.rank}"

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into a DistributedError naming ``what``."""
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed: another rank stopped or did not answer "
                f"within execution.timeout_s={self.timeout_s:g} s ({first}); nothing was written"
            ) from err

    def agree(self, digest: str, what: str) -> None:
        """Check that every rank computed the same ``digest`` of ``what``.

        Raises
        ------
        DistributedError
            On every rank, naming the ranks whose digest differs from rank 0's.
        """
        gathered: list[Any] = [None] * self.world_size
        with self.collective(f"comparing the {what} across ranks"):
            dist.all_gather_object(gathered, digest)
        odd = [r for r, d in enumerate(gathered) if d != gathered[0]]
        if odd:
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: the ranks disagree on the {what}: rank(s) {', '.join(map(str, odd))} "
                f"hash {gathered[odd[0]][:12]}, rank 0 hashes {gathered[0][:12]}; start every rank with the same recipe and model"
            )

    def share_outcome(self, problem: str | None, what: str) -> None:
        """Rank 0's ``problem`` (None: fine) reaches every rank; a problem raises everywhere.

        Raises
        ------
        DistributedError
            On ranks other than 0 when rank 0 reported a problem (rank 0 raises its own error).
        """
        box = [problem if self.is_main else None]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None and not self.is_main:
            raise DistributedError(f"rank {self.rank} of {self.world_size}: rank 0 stopped at {what}: {box[0]}")

    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's calibration windows: rows ``rank, rank + world_size, ...`` of ``ids`` (num_samples, seq_len).

        Raises
        ------
        DataError
            Fewer windows than ranks (a rank would have none).
        """
        if ids.shape[0] < self.world_size:
            raise DataError(f"{ids.shape[0]} calibration windows cannot be split over {self.world_size} ranks; "
                            "raise calibration.num_samples or use fewer processes")
        return ids[self.rank :: self.world_size]

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over ranks in place."""
        with self.collective("summing calibration statistics"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def reduce_collected(self, collected: Any) -> None:
        """Sum what a pass's block collector recorded over ranks: each distinct
        :class:`InputStatistics` value of a dict, in the order of its keys.

        Raises
        ------
        DistributedError
            ``collected`` is of a kind this engine cannot sum (the pass would see one rank's share).
        """
        if collected is None:
            return
        if not isinstance(collected, dict):
            raise DistributedError(f"cannot sum a {type(collected).__name__} over ranks; a block collector must yield a dict of InputStatistics")
        seen: set[int] = set()
        for name in sorted(collected):
            value = collected[name]
            if value is None or id(value) in seen:
                continue
            if not isinstance(value, InputStatistics):
                raise DistributedError(f"{name}: cannot sum a {type(value).__name__} over ranks (InputStatistics only)")
            seen.add(id(value))
            value.reduce(self.all_reduce)

    def map_layers(self, names: list[str], fn: Callable[[str], Any]) -> dict[str, Any]:
        """``{name: fn(name)}``: rank ``r`` computes names ``r, r + world_size, ...``; the results are gathered on every rank."""
        mine = {name: fn(name) for name in names[self.rank :: self.world_size]}
        gathered: list[Any] = [None] * self.world_size
        with self.collective("gathering per-layer factors"):
            dist.all_gather_object(gathered, mine)
        merged: dict[str, Any] = {}
        for part in gathered:
            merged.update(part)
        return {name: merged[name] for name in names}

    def barrier(self, what: str) -> None:
        with self.collective(what):
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(timeout_s: float, device: torch.device) -> Ranks | None:
    """Join the process group torchrun describes in the environment; None for a single process.

    Parameters
    ----------
    timeout_s : float
        Timeout of every collective (``init_process_group(timeout=...)``), seconds.
    device : torch.device
        ``cuda`` selects NCCL (and ``torch.cuda.set_device``), the CPU gloo.

    Raises
    ------
    DistributedError
        ``WORLD_SIZE`` > 1 but the rendezvous fails (``MASTER_ADDR`` / ``MASTER_PORT`` missing,
        a rank not reachable within the timeout).
    """
    world = world_size_from_env()
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), timeout_s, owns_group=False)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the run with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {rank} of {world}: joining the process group ({backend}) failed within {timeout_s:g} s: "
                               f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__}") from err
    return Ranks(rank, world, local, backend, timeout_s)


def digest(*parts: bytes | str) -> str:
    """SHA-256 of ``parts`` (each length-prefixed), hex."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@contextmanager
def joined(timeout_s: float, device: torch.device) -> Iterator[Ranks | None]:
    """:func:`init_distributed` for the body; the process group is destroyed at exit (None: one process)."""
    ranks = init_distributed(timeout_s, device)
    try:
        yield ranks
    finally:
        if ranks is not None:
            ranks.close()


def checked_output(check: Callable[[], Any], ranks: Ranks | None) -> Any:
    """Run ``check`` (the output-folder check) on rank 0 only and share its outcome.

    Returns what ``check`` returned on rank 0, None elsewhere (other ranks write nothing).

    Raises
    ------
    LowRankError
        Rank 0: whatever ``check`` raised. Other ranks: DistributedError quoting it.
    """
    if ranks is None:
        return check()
    result, problem = None, None
    if ranks.is_main:
        try:
            result = check()
        except Exception as err:
            problem = str(err)
            ranks.share_outcome(problem, "the output check")
            raise
    ranks.share_outcome(problem, "the output check")
    return result
