"""One code path for 1..N processes (``torchrun --nproc_per_node=N script.py ...``).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a
single process and no process group is created. NCCL is used between GPUs,
gloo between CPU processes (which is how the tests run two ranks).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def any(self, flag: bool, device) -> bool:
        """True on every rank if ``flag`` is true on any rank (a collective call)."""
        if not self.distributed:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a collective call)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's ``obj`` in rank order (a collective call)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BN running statistics drift apart per rank)."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class LaggedAny:
    """``any(flag)`` over ranks, answered one call late, so that no step waits for it.

    Each call starts an all-reduce of this call's flag without waiting for it
    and returns the previous call's result: every rank reads the same answer
    at the same call, one step after the flag was raised. A blocking
    ``Context.any`` per step would make the host wait for the GPU to drain
    every step. On CUDA the answer is copied to pinned host memory on a side
    stream, behind an event: reading it waits for the reduction only, and the
    compute stream never waits for the other ranks. Use one per loop, as a
    context manager, on every rank.
    """

    def __init__(self, ctx: Context, device: torch.device):
        self.ctx = ctx
        self.cuda = device.type == "cuda"
        self.flag = torch.zeros((), device=device)
        self.host = torch.zeros((), pin_memory=self.cuda)
        self.side = torch.cuda.Stream(device) if self.cuda and ctx.distributed else None
        self.pending = None  # the previous call's (work, event)

    def __call__(self, flag: bool) -> bool:
        if not self.ctx.distributed:
            return flag
        previous = self._answer()  # also: the last reduction of self.flag has finished
        self.flag.fill_(float(flag))  # a kernel, not a host-to-device copy that would sync
        work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if self.cuda:
            with torch.cuda.stream(self.side):
                work.wait()  # the side stream waits for the reduction; the host does not
                self.host.copy_(self.flag, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.side)
        self.pending = (work, event)
        return previous

    def _answer(self) -> bool:
        if self.pending is None:
            return False
        work, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
            return bool(self.host.item())
        work.wait()
        return bool(self.flag.item())

    def __enter__(self) -> "LaggedAny":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # Finish the last reduction (its answer is dropped), but not while an exception
        # propagates: the other ranks may never have issued it.
        if exc_type is None:
            self._answer()


def init() -> Context:
    """This process's place among torchrun's; creates the process group unless one exists (prune.py
    holds one across its phases, each a training of its own)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    ctx = Context(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return ctx
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", ctx.local_rank))
    else:
        dist.init_process_group("gloo")
    return ctx


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
