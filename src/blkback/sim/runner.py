"""Running many simulated hosts: in-process, on a process pool, or on Dask.

Every engine maps :func:`~blkback.sim.scenario.run_scenario` over scenario dicts and returns
the results **in input order** (so a sweep's output does not depend on which worker finished
first). ``progress(done, total)`` is called after each host.

Engines:

* ``serial``: this process, one host after another (tests, profiling).
* ``processes``: ``concurrent.futures.ProcessPoolExecutor`` (the standard library).
* ``dask``: Dask distributed. Without an address it starts an in-process ``LocalCluster``
  (worker processes, one thread each, no dashboard): nothing to set up. With
  ``scheduler="tcp://host:8786"`` it connects to a running cluster (``dask scheduler`` plus
  ``dask worker`` processes that can import ``blkback``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from blkback.sim.scenario import run_scenario

Progress = Callable[[int, int], None]
ENGINES = ("auto", "serial", "processes", "dask")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def dask_available() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def run_many(
    scenarios: Sequence[dict[str, Any]],
    *,
    engine: str = "auto",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Run every scenario; return their results in the same order."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    n_workers = workers or default_workers()
    if engine == "auto":
        if scheduler is not None:
            engine = "dask"
        elif len(scenarios) <= 1 or n_workers == 1:
            engine = "serial"
        else:
            engine = "dask" if dask_available() else "processes"
    if scheduler is not None and engine != "dask":
        raise ValueError("--scheduler needs the dask engine")
    if engine == "serial":
        return _run_serial(scenarios, progress)
    if engine == "processes":
        return _run_processes(scenarios, n_workers, progress)
    return _run_dask(scenarios, scheduler, n_workers, progress)


def _run_serial(
    scenarios: Sequence[dict[str, Any]], progress: Progress | None
) -> list[dict[str, Any]]:
    out = []
    for i, sc in enumerate(scenarios):
        out.append(run_scenario(sc))
        if progress:
            progress(i + 1, len(scenarios))
    return out


def _run_processes(
    scenarios: Sequence[dict[str, Any]], workers: int, progress: Progress | None
) -> list[dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: list[dict[str, Any] | None] = [None] * len(scenarios)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_scenario, sc): i for i, sc in enumerate(scenarios)}
        for done, fut in enumerate(as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if progress:
                progress(done, len(scenarios))
    return [r for r in results if r is not None]


def _run_dask(
    scenarios: Sequence[dict[str, Any]],
    scheduler: str | None,
    workers: int,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    import importlib

    # Dask's loggers default to INFO: follow the CLI's level (-v) instead.
    logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().level))
    dist: Any = importlib.import_module("distributed")  # untyped: keep it Any
    Client, LocalCluster, as_completed = dist.Client, dist.LocalCluster, dist.as_completed  # noqa: N806
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # teardown under load logs heartbeat errors
        )
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        futures = client.map(run_scenario, list(scenarios), pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[dict[str, Any] | None] = [None] * len(scenarios)
        for done, fut in enumerate(as_completed(futures), 1):
            results[index[fut.key]] = fut.result()
            if progress:
                progress(done, len(scenarios))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [r for r in results if r is not None]
