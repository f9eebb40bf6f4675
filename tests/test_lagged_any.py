"""utils.distributed.LaggedAny: the cross-rank stop vote, read one step late.

Two gloo processes vote; each call must return the previous call's
any-over-ranks on both ranks alike, and a run of votes must leave no
reduction unfinished (a later collective still lines up).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.distributed import Context, LaggedAny

# Rank r raises its flag at these calls (0-based).
RAISED = {0: {4}, 1: {1, 2, 7}}
CALLS = 9


@pytest.fixture
def unused_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, device, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctx = Context(rank, 2, 0)
        answers = []
        with LaggedAny(ctx, torch.device(device)) as vote:
            for call in range(CALLS):
                answers.append(vote(call in RAISED[rank]))
                if call % 3 == 1:  # a blocking collective while a vote is pending, as _check_finite does
                    assert ctx.any(call == 4 and rank == 1, torch.device("cpu")) is (call == 4)
        after = torch.tensor(float(rank + 1))
        dist.all_reduce(after)  # the last vote was finished: this reduction is not mixed up with it
        results[rank] = (answers, after.item())
    finally:
        dist.destroy_process_group()


def test_votes_are_answered_one_call_late_on_every_rank(unused_tcp_port, device):
    """On CUDA (gloo reduces CUDA tensors too, so both ranks can share one GPU) the answer
    travels through the side stream, the pinned buffer and the event."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(unused_tcp_port, device.type, results), nprocs=2, join=True)
    expected = [False] + [(call in RAISED[0] or call in RAISED[1]) for call in range(CALLS - 1)]
    assert results[0] == results[1] == (expected, 3.0)


def test_single_process_answers_at_once():
    vote = LaggedAny(Context(), torch.device("cpu"))
    assert vote(True) is True and vote(False) is False
