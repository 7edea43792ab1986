"""Persistent multi-process gloo workers shared by all distributed tests.

Starting a process that imports torch + megatron-core and joins gloo costs 15-30 s here, so each
world size gets one pool of processes per test session; a test sends a module-level function and
its arguments to every rank and gets back one result per rank. Each call re-initialises megatron's
model-parallel state for the layout it asks for (see `megatron_prune.runtime.init_runtime`).

A failure on one rank can leave the others blocked inside a collective, so a failed call tears the
pool down (it is restarted on next use) and re-raises the failing rank's traceback.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_main(rank: int, world_size: int, port: int, conn: Any, path: list[str]) -> None:
    sys.path[:] = path
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("WANDB_MODE", "offline")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    # 2 cores shared by every rank: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1 if world_size > 1 else 2)
    from megatron_prune.runtime import cpu, init_distributed

    cpu.activate()
    init_distributed("gloo")
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # report, then keep serving (the pool decides whether to restart)
            conn.send(("err", f"rank {rank}:\n{traceback.format_exc()}"))


class WorkerPool:
    def __init__(self, world_size: int, start_timeout: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world_size = world_size
        self.conns = []
        self.procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            # not daemonic: megatron's checkpoint writer starts a multiprocessing Manager
            proc = ctx.Process(target=_worker_main, args=(rank, world_size, port, child, list(sys.path)))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        atexit.register(self.close)
        for rank, conn in enumerate(self.conns):
            if not conn.poll(start_timeout):
                self.close()
                raise RuntimeError(f"worker {rank}/{world_size} did not start in {start_timeout}s")
            conn.recv()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 900.0, **kwargs: Any) -> list[Any]:
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        results: list[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for rank in sorted(pending):
                if self.conns[rank].poll(0.05):
                    status, value = self.conns[rank].recv()
                    pending.discard(rank)
                    if status == "ok":
                        results[rank] = value
                    else:
                        errors.append(value)
                        # the other ranks may be stuck in a collective: give them a moment
                        deadline = min(deadline, time.monotonic() + 20.0)
            if not self.alive():
                break
        if errors or pending:
            self.close()
            detail = "\n".join(errors) or f"ranks {sorted(pending)} timed out or died"
            raise RuntimeError(f"distributed call {fn.__name__} failed:\n{detail}")
        return results

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.procs, self.conns = [], []


class Pools:
    """Pools by world size, at most `max_alive` at a time (each process holds ~0.5-1 GB)."""

    def __init__(self, max_alive: int = 2) -> None:
        self.max_alive = max_alive
        self.pools: OrderedDict[int, WorkerPool] = OrderedDict()

    def get(self, world_size: int) -> WorkerPool:
        pool = self.pools.pop(world_size, None)
        if pool is None or not pool.alive() or not pool.procs:
            if pool is not None:
                pool.close()
            while len(self.pools) >= self.max_alive:
                _, old = self.pools.popitem(last=False)
                old.close()
            pool = WorkerPool(world_size)
        self.pools[world_size] = pool
        return pool

    def run(self, world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        pool = self.get(world_size)
        try:
            return pool.run(fn, *args, **kwargs)
        finally:
            if not pool.procs:
                self.pools.pop(world_size, None)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
