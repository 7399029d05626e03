"""Independent training runs side by side: the reference models, the
cross-fitting folds.

On a CPU the training step of a small model does not use two cores well: on
the 2-core machine one shufflenet step ran at 644 images/s on 2 threads and
459 on 1, while two 1-thread runs side by side made 866 together. So runs
that do not depend on each other go to ``train.parallel_runs`` processes,
each with its share of the cores as torch threads. A run's result depends on
its thread count (reductions are summed in another order), not on which
process or in which order it ran. On a GPU, keep ``parallel_runs: 1``.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("parallel")


def _init_worker(threads: int, level: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")


def run_threads(parallel_runs: int) -> int:
    """Torch threads of each of ``parallel_runs`` runs sharing this machine."""
    return max(1, torch.get_num_threads() // max(1, parallel_runs))


def map_runs(fn: Callable[..., Any], calls: Sequence[tuple], parallel_runs: int) -> list[Any]:
    """``[fn(*args) for args in calls]``, up to ``parallel_runs`` at a time in
    spawned processes (``fn`` and its arguments must pickle; a fork after
    torch has started its thread pools is unsafe). In this process, one after
    another, when ``parallel_runs`` is 1, there is one call, or under
    torchrun (the ranks already share the machine). The first error stops the
    other runs and is raised here."""
    if parallel_runs <= 1 or len(calls) <= 1 or dist.is_initialized():
        return [fn(*args) for args in calls]
    jobs = min(parallel_runs, len(calls))
    threads = run_threads(jobs)
    log.info("%d runs, %d at a time, %d torch thread(s) each", len(calls), jobs, threads)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads, logging.getLogger().getEffectiveLevel())) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        try:
            return [f.result() for f in futures]
        except BaseException:  # an error, or SIGTERM (SystemExit): do not wait for the other runs
            for f in futures:
                f.cancel()
            for process in list(getattr(pool, "_processes", {}).values()):  # no public way to stop a running task
                process.terminate()
            raise
