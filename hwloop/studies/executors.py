"""Where the points of a sweep run: in this process, in local worker processes, or on Ray.

Every executor has one method that matters, :meth:`Executor.map_unordered`: it takes a
*top-level* (picklable) function and a list of tasks (plain picklable objects) and yields
``(index, result, error)`` as each task finishes, in completion order; exactly one of
``result`` and ``error`` is not ``None``. A task that raises is reported, not fatal: the sweep
writes the points that finished and names the ones that failed.

* :class:`SerialExecutor` runs tasks one after another in this process (``--workers 1``; tests
  that count calls).
* :class:`LocalExecutor` runs them in ``workers`` processes (``concurrent.futures``, spawned, not
  forked: forking a process that already ran torch's OpenMP pool can hang).
* :class:`RayExecutor` runs them as Ray tasks, on a local Ray instance or on a cluster
  (``address``); Ray is an optional extra: ``pip install .[ray]``.

Every worker calls ``torch.set_num_threads(1)`` (and sets ``OMP_NUM_THREADS=1``) before the
first task: one intra-op thread per process is the fastest way to use a machine with as many
processes as cores; more threads per process oversubscribe it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from hwloop.errors import HwloopError

__all__ = ["Executor", "SerialExecutor", "LocalExecutor", "RayExecutor", "make_executor",
           "one_thread", "ray_available"]

REPO_ROOT = Path(__file__).resolve().parents[2]

Outcome = tuple[int, Optional[Any], Optional[BaseException]]


def one_thread() -> None:
    """Make this process use one intra-op torch thread (call first thing in a worker)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _local_worker_init() -> None:
    """A local worker: one torch thread, and Ctrl-C is the parent's to handle (the parent ends
    the workers), so an interrupt prints one line, not a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    one_thread()


def _call_one_thread(fn: Callable[[Any], Any], task: Any) -> Any:
    """Run ``fn(task)`` with one torch thread (the wrapper Ray ships to its workers)."""
    one_thread()
    return fn(task)


class Executor:
    """Base class: runs a top-level function over tasks, yielding outcomes as they finish."""

    name = "base"
    workers = 1

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Outcome]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (idempotent)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"


class SerialExecutor(Executor):
    """Tasks one after another in this process. ``KeyboardInterrupt`` propagates at once."""

    name = "serial"

    def map_unordered(self, fn, tasks):
        for i, task in enumerate(tasks):
            try:
                result = fn(task)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the caller, not swallowed
                yield i, None, exc
            else:
                yield i, result, None


class LocalExecutor(Executor):
    """Tasks in ``workers`` local processes (default: the number of CPUs).

    Uses a spawn context, so ``fn`` must be importable by its module path (a top-level function
    of an installed or ``PYTHONPATH`` module) and tasks must pickle.
    """

    name = "local"

    def __init__(self, workers: Optional[int] = None):
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self._pool = None

    def _ensure_pool(self):
        if self._pool is None:
            # the children import hwloop from wherever this process did
            path = os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)
            os.environ["PYTHONPATH"] = path
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_local_worker_init)
        return self._pool

    def map_unordered(self, fn, tasks):
        pool = self._ensure_pool()
        futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                exc = fut.exception()
                yield (i, None, exc) if exc is not None else (i, fut.result(), None)
        except BaseException:
            for fut in futures:
                fut.cancel()
            self.close(wait=False)
            raise

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            if not wait:
                # interrupted: end the workers now; a finished point is already recorded, a
                # running one resumes from its checkpoint on the next run
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
            pool.shutdown(wait=wait, cancel_futures=True)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401  # optional extra: ray
    except ImportError:
        return False
    return True


class RayExecutor(Executor):
    """Tasks as Ray remote functions (one CPU each).

    Args:
        address: a running cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None``
            starts a local Ray instance with ``workers`` CPUs (or all of them).
        workers: CPUs of a local instance; ignored with ``address`` (the cluster decides).

    The same top-level point function runs remotely; the study code does not change. On a
    cluster every node needs hwloop installed (and the data set and model cache where the
    options point); a local instance gets this checkout on its workers' ``PYTHONPATH``.
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None):
        try:
            import ray  # optional extra: ray
        except ImportError:
            raise HwloopError("--executor ray needs Ray: pip install 'hwloop[ray]' "
                              "(or pip install 'ray[default]')") from None
        self._ray = ray
        self.address = address
        self._started = False
        if not ray.is_initialized():
            # a local instance sees what this process imports from (as spawned processes do)
            paths = [str(REPO_ROOT)] + ([p for p in sys.path if p and os.path.isdir(p)] if not address else [])
            paths += [os.environ.get("PYTHONPATH", "")]
            env = {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if p))}}
            kw: dict[str, Any] = {"runtime_env": env, "ignore_reinit_error": True,
                                  "include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=int(workers or os.cpu_count() or 1), **kw)
            self._started = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_call_one_thread)

    def map_unordered(self, fn, tasks):
        ray = self._ray
        refs = {self._remote.remote(fn, task): i for i, task in enumerate(tasks)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a RayTaskError wraps the cause
                        cause = getattr(exc, "cause", None)
                        yield i, None, cause if isinstance(cause, BaseException) else exc
                    else:
                        yield i, result, None
        except BaseException:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            raise

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False

    def describe(self) -> str:
        where = self.address or "local instance"
        return f"ray ({where}, {self.workers} CPUs)"


def make_executor(kind: str = "local", workers: Optional[int] = None,
                  ray_address: Optional[str] = None) -> Executor:
    """``kind`` is ``local`` (``workers == 1`` runs in this process), ``serial`` or ``ray``."""
    if kind == "ray":
        return RayExecutor(address=ray_address, workers=workers)
    if kind == "serial" or (kind == "local" and workers == 1):
        return SerialExecutor()
    if kind == "local":
        return LocalExecutor(workers)
    raise HwloopError(f"unknown executor {kind!r} (local, serial or ray)")
