"""Side-by-side step timing for the benchmarks: variants run interleaved, repetition by repetition.

Interleaving puts every variant under the same machine load at the same moment, so a ratio
between two variants is fair on a shared machine even where the absolute times are not: each
ratio is taken per repetition, and its median and interquartile range are what the tables print.
"""
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], reps: int, steps_per_rep: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per repetition, after ``warmup`` steps each;
    prints each repetition's milliseconds as it ends (so a run cut short still says something)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times = {name: [] for name in steps}
    for rep in range(reps):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps_per_rep):
                step()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps_per_rep)
        print(f"  rep {rep + 1}/{reps} ms/step: " + ", ".join(f"{n} {1000 * times[n][-1]:.1f}" for n in steps),
              flush=True)
    return times


def ratio_to(times: list[float], reference: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the per-repetition time ratios."""
    ratios = sorted(t / r for t, r in zip(times, reference))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]
