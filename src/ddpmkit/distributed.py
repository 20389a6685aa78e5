"""Multi-process helpers: torchrun detection, the process group, failures of peers and distributed sampling.

`torchrun --nproc_per_node N -m ddpmkit.cli train ...` (or `ddpm train` started by torchrun)
sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` reads them and joins the process group: NCCL with
one GPU per process (cuda:LOCAL_RANK) or gloo on CPU. Multi-node runs use the same command
with torchrun's rendezvous flags (--nnodes, --rdzv-endpoint, ...).

Every collective is bounded by a timeout (env DDPMKIT_DDP_TIMEOUT, seconds, default 600), and a
peer that crashes, is killed or stops answering becomes a one-line DdpmError on the others
instead of a hang (`translate_errors`). With NCCL, PyTorch's watchdog may instead end a stuck
process itself once the timeout passes (TORCH_NCCL_ASYNC_ERROR_HANDLING).

Rank-awareness lives here, in train.py and in checkpoint.py only. (How the processes of a run
share the random draws of the loss is the trainer's business: see train.py.)
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import DdpmError

TIMEOUT_ENV = "DDPMKIT_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def timeout_seconds() -> float:
    """The collective timeout in seconds, from DDPMKIT_DDP_TIMEOUT (default 600)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DdpmError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds (default {DEFAULT_TIMEOUT_S:g})")
    return value


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DdpmError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start the run with torchrun") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise DdpmError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank}")
    return rank, world, local_rank


@dataclass
class Context:
    """Where this process stands in a run: its rank among `world` processes and its device.

    `device` is None for a single-process run (the trainer then resolves --device itself).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on at least one (a MAX all-reduce)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            on_gpu = self.device is not None and self.device.type == "cuda"
            dist.barrier(device_ids=[self.device.index]) if on_gpu else dist.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Let local rank 0 of each machine run the block (e.g. build a file cache) before the others."""
        if self.enabled and self.local_rank != 0:
            self.barrier()
        yield
        if self.enabled and self.local_rank == 0:
            self.barrier()

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every process unless all processes hold the same (picklable) `value`."""
        if not self.enabled:
            return
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        differing = [r for r, v in enumerate(values) if v != values[0]]
        if differing:
            raise DdpmError(f"process {differing[0]} sees a different {what} than process 0 "
                            f"({values[differing[0]]!r} vs {values[0]!r}); start every process with the same "
                            "options, and on several machines put --workdir on a shared file system")

    def close(self) -> None:
        """Leave the process group if `setup` created it."""
        if self.owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self.owns_group = False


def _device_for(name: str, local_rank: int) -> torch.device:
    """The device of process LOCAL_RANK: cuda:LOCAL_RANK on GPU machines, else the CPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DdpmError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                            "start at most one process per GPU (--nproc_per_node)")
        return torch.device("cuda", local_rank)
    if name == "cuda":
        raise DdpmError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    if name in ("auto", "cpu"):
        return torch.device("cpu")
    raise DdpmError(f"--device {name} does not work under torchrun: use auto or cuda (process k takes "
                    "cuda:LOCAL_RANK, NCCL) or cpu (gloo)")


def setup(device_name: str = "auto") -> Context:
    """Join the torchrun process group when WORLD_SIZE > 1; a plain Context otherwise.

    A process group that the caller created already is used as it is (and left open).
    """
    if dist.is_available() and dist.is_initialized():
        device = _device_for(device_name, int(os.environ.get("LOCAL_RANK", "0")))
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)
    rank, world, local_rank = env_world()
    if world == 1:
        return Context()
    if not dist.is_available():
        raise DdpmError("this PyTorch build has no torch.distributed; install a standard build to train with torchrun")
    device = _device_for(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = Context(rank, world, local_rank, device)
    timeout = timeout_seconds()
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout),
                                device_id=device if device.type == "cuda" else None)
    except (ValueError, RuntimeError) as exc:  # missing MASTER_ADDR, unreachable or late peers, ...
        raise DdpmError(f"process {rank} of {world} could not join the process group ({backend}): {_one_line(exc)}; "
                        f"start the run with torchrun (or set MASTER_ADDR and MASTER_PORT) and make sure every "
                        f"process starts within {timeout:g} s ({TIMEOUT_ENV})") from None
    ctx.owns_group = True
    return ctx


# --- failures of peers -----------------------------------------------------------------------

_COMM_WORDS = re.compile(r"gloo|nccl|connection|timed out|timeout|socket|peer|rendezvous|store|broken pipe",
                         re.IGNORECASE)


def _is_comm_error(exc: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_COMM_WORDS.search(str(exc)))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)  # gloo's "[/path/pair.cc:537] " prefix
    text = text.split(". This is typically")[0].rstrip(".")
    return (text[:200] + "...") if len(text) > 200 else text


@contextlib.contextmanager
def translate_errors(ctx: Context, during: str = "training") -> Iterator[None]:
    """Turn a failed or timed-out collective into a one-line DdpmError naming this process."""
    try:
        yield
    except DdpmError:
        raise
    except Exception as exc:
        if not ctx.enabled or not _is_comm_error(exc):
            raise
        raise DdpmError(
            f"process {ctx.rank} of {ctx.world} stopped while {during}: {_one_line(exc)}. Another process "
            f"crashed, was killed or did not answer within {timeout_seconds():g} s ({TIMEOUT_ENV}); "
            "see that process's output for the cause") from None


# --- distributed sampling --------------------------------------------------------------------

def sample_chunks(n: int, batch_size: int, world: int, rank: int) -> list[tuple[int, int]]:
    """(first index, count) of the batches process `rank` draws: batch k holds samples
    k*batch_size.. and goes to process k % world, so the batches are those of one process."""
    starts = range(0, n, batch_size)
    return [(s, min(batch_size, n - s)) for k, s in enumerate(starts) if k % world == rank]


def generate_distributed(diffusion, model: torch.nn.Module, n: int, *, batch_size: int | None = None,
                         seed: int | None = None, first_index: int = 0, dst: int | None = None,
                         progress: bool = True, **kwargs) -> torch.Tensor | None:
    """`diffusion.generate(model, n, ...)` with the batches split over the processes of the group.

    Samples are seeded per index (image k depends only on (seed, first_index + k)), so the result
    is the single-process one: bit for bit against `generate(..., batch_size=batch_size)` with the
    same device type, since every batch is drawn whole by one process; with another batch size,
    up to float rounding. The batch size defaults to ceil(n / world), at most 64. Returns the (n, C,
    H, W) tensor on every process, or with `dst` set only on process `dst` (None elsewhere), which
    sends less data when n is large. A failure on any process raises DdpmError on all of them.
    Outside a process group this is `diffusion.generate`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return diffusion.generate(model, n, batch_size=batch_size, seed=seed, first_index=first_index,
                                  progress=progress, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = Context(rank, world, device=diffusion.device)
    with translate_errors(ctx, "sampling"):
        if seed is None:  # one seed for all processes, drawn by process 0
            box = [int(torch.randint(0, 2**62, ()).item()) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            seed = box[0]
        batch_size = batch_size or max(1, min(64, -(-n // world)))
        parts, error = [], None
        try:
            for start, count in sample_chunks(n, batch_size, world, rank):
                x = diffusion.generate(model, count, batch_size=count, seed=seed, first_index=first_index + start,
                                       progress=progress and rank == 0, **kwargs)
                parts.append((start, x))
        except Exception as exc:  # reported to every process below instead of leaving them waiting
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        errors: list[Any] = [None] * world
        dist.all_gather_object(errors, error)
        for r, e in enumerate(errors):
            if e is not None:
                raise DdpmError(f"sampling failed on process {r}: {e}")
        if dst is None:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, parts)
        else:
            gathered = [None] * world if rank == dst else None
            dist.gather_object(parts, gathered, dst=dst)
            if rank != dst:
                return None
    chunks = sorted((c for part in gathered for c in part), key=lambda c: c[0])
    return torch.cat([x for _, x in chunks])
