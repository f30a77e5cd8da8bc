"""Data-parallel regional training with :mod:`torch.distributed` (gloo on CPU, NCCL on GPU).

:func:`adjointhydro.regional.train_regional` uses these helpers whenever a process
group is initialised: every mini-batch of basins is split into contiguous shards, one
per process; each process simulates its shard and backpropagates its part of the
batch loss (the sum of its basins' losses divided by the number of basins scored in
the whole batch); :func:`all_reduce_gradients` then *sums* the gradients, so every
process takes exactly the step one process would take on the whole batch, and the
loss trajectory is the same as a single-process run (up to floating-point summation
order). Only rank 0 writes checkpoints and run folders. (This is what
``DistributedDataParallel`` does with gradient averaging; the explicit all-reduce is
used because the network fluxes of a hybrid get their gradients from the solver's
custom backward pass, outside the module hooks DDP relies on.)

Start it with ``torchrun``. A regional run configuration trains through the usual CLI
(same run folder as one process, written by rank 0)::

    torchrun --standalone --nproc_per_node=2 -m adjointhydro train config.toml

or, without a configuration, two processes on one machine::

    torchrun --standalone --nproc_per_node=2 -m adjointhydro.distributed \\
        --synthetic 64 --years 3 --epochs 5 --method euler --out runs/ddp

or from a data set written by :func:`adjointhydro.data.write_hdf5`::

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD_NODE:29500 -m adjointhydro.distributed --data camels.h5 ...

See ``docs/regional.md`` for a SLURM example.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "cleanup",
    "tear_down_after",
    "is_distributed",
    "rank",
    "world_size",
    "broadcast_object",
    "launched_by_torchrun",
    "shard",
    "all_reduce_sum",
    "all_reduce_gradients",
    "free_port",
    "spawn_local",
    "main",
]


def is_distributed() -> bool:
    """Whether a :mod:`torch.distributed` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(
    backend: str | None = None, init_method: str | None = None,
    rank_: int | None = None, world_size_: int | None = None,
) -> tuple[int, int, torch.device]:
    """Initialise the process group (once) and return ``(rank, world_size, device)``.

    With no arguments it reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
    and ``MASTER_PORT`` set by ``torchrun`` (``init_method="env://"``). The backend is
    NCCL when CUDA is available (each process on ``cuda:LOCAL_RANK``), else gloo.
    Without ``torchrun`` variables and without ``init_method`` it returns ``(0, 1, cpu)``
    and does nothing (a single process).
    """
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if is_distributed():
        lr = int(os.environ.get("LOCAL_RANK", 0))
        return rank(), world_size(), torch.device(f"cuda:{lr}") if use_cuda else torch.device("cpu")
    if init_method is None and "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs: dict[str, Any] = {"backend": backend, "init_method": init_method or "env://"}
    if rank_ is not None:
        kwargs["rank"] = int(rank_)
    if world_size_ is not None:
        kwargs["world_size"] = int(world_size_)
    dist.init_process_group(**kwargs)
    device = torch.device("cpu")
    if backend == "nccl":
        lr = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(lr)
        device = torch.device(f"cuda:{lr}")
    return dist.get_rank(), dist.get_world_size(), device


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src``, in every process (itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cleanup(wait_for_all: bool = False) -> None:
    """Destroy the process group if there is one.

    With ``wait_for_all`` (after a run that succeeded everywhere) the processes first meet
    at a barrier, so that none tears its connections down while another still uses them:
    a worker that left while rank 0 was writing the run folder was seen to abort in
    gloo's teardown ("terminate called without an active exception"), about once in ten
    runs. After a failure there is no barrier (the others may never reach it).
    """
    if is_distributed():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def tear_down_after(active: bool = True) -> Iterator[None]:
    """On leaving, :func:`cleanup`: with the barrier after success, without it after a failure."""
    try:
        yield
    except BaseException:
        if active:
            cleanup()
        raise
    if active:
        cleanup(wait_for_all=True)


def shard(items: Sequence[Any], rank_: int, world: int) -> list:
    """The contiguous part of ``items`` for ``rank_`` of ``world`` (sizes differ by at most 1)."""
    items = list(items)
    n = len(items)
    lo = (n * rank_) // world
    hi = (n * (rank_ + 1)) // world
    return items[lo:hi]


def _all_reduce_sum_(t: torch.Tensor) -> None:
    """In-place sum over processes; NCCL reduces CUDA tensors only, so CPU tensors
    (the regional solve runs on the CPU) travel through this process's GPU."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        t.copy_(on_gpu.to(t.device))
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over processes (``t`` itself without a process group). Returns a new tensor."""
    out = t.detach().clone()
    if is_distributed():
        _all_reduce_sum_(out)
    return out


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the ``.grad`` of ``params`` over processes, in place (one flattened all-reduce).

    Every process must call it with the same parameters in the same order; a missing
    gradient counts as zero.
    """
    if not is_distributed():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    _all_reduce_sum_(flat)
    k = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[k:k + n].view_as(g))
        k += n


def free_port() -> int:
    """A free TCP port on localhost (for a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_entry(rk: int, world: int, init_file: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", f"file://{init_file}", rk, world)
    with tear_down_after():
        fn(rk, world, *args)


def spawn_local(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` local processes with a gloo group.

    The group is initialised through a temporary file (no TCP port needed). ``fn`` must be
    importable (a module-level function). Used by tests and the benchmark; for real runs
    use ``torchrun``.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        mp.spawn(_spawn_entry, args=(nprocs, init_file, fn, args), nprocs=int(nprocs), join=True)


def regional_worker(rk: int, world: int, spec: dict, result_file: str | None) -> None:
    """Train on synthetic basins (``spec``: :func:`make_synthetic_basins` and
    :func:`train_regional` settings); rank 0 writes the history as JSON to ``result_file``."""
    import time

    from .models import exphydro
    from .regional import train_regional
    from .synthetic import make_synthetic_basins

    syn = make_synthetic_basins(spec["basins"], spec["years"], seed=spec.get("data_seed", 0),
                                method=spec.get("method", "euler"))
    kw = dict(spec.get("train", {}))
    kw.setdefault("method", spec.get("method", "euler"))
    t0 = time.perf_counter()
    res = train_regional(exphydro(), syn.dataset, **kw)
    seconds = time.perf_counter() - t0
    if rk == 0 and result_file:
        Path(result_file).write_text(json.dumps({
            "history": res.history, "world_size": res.world_size, "seconds": seconds,
            "best_val_loss": res.best_val_loss,
        }))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line for ``torchrun ... -m adjointhydro.distributed``: regional training of
    EXP-HYDRO (parameters from attributes) on an HDF5 data set or synthetic basins."""
    ap = argparse.ArgumentParser(prog="python -m adjointhydro.distributed", description=main.__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="HDF5 data set (adjointhydro.data.write_hdf5) with P, T, PET, Q, attributes")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic basins (adjointhydro.synthetic)")
    ap.add_argument("--years", type=int, default=3, help="record length of synthetic basins (years)")
    ap.add_argument("--attributes", nargs="*", default=None, help="attribute names (default: all)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--window", type=int, default=365)
    ap.add_argument("--warmup", type=int, default=365)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--loss", default="nse")
    ap.add_argument("--method", default="dopri5")
    ap.add_argument("--sensitivity", default="checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run folder (written by rank 0)")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rk, world, _ = init_distributed()
    with tear_down_after():
        from .data import read_hdf5
        from .models import exphydro
        from .regional import train_regional
        from .synthetic import make_synthetic_basins

        from .synthetic import TWIN_BOUNDS

        extra: dict = {}
        if a.data:
            ds = read_hdf5(a.data)
        else:
            ds = make_synthetic_basins(a.synthetic, a.years, seed=a.seed, method=a.method).dataset
            extra["parameter_bounds"] = TWIN_BOUNDS  # keeps fixed one-day steps stable
        res = train_regional(
            exphydro(), ds, attribute_names=a.attributes, epochs=a.epochs, batch_size=a.batch_size, **extra,
            window=a.window, warmup=a.warmup, lr=a.lr, loss=a.loss, method=a.method,
            sensitivity=a.sensitivity, seed=a.seed, out_dir=a.out, progress=True,
        )
        if rk == 0:
            s = res.summary("nse")
            print(json.dumps({"world_size": world, "best_epoch": res.best_epoch,
                              "best_val_loss": res.best_val_loss, "nse": s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
