"""Benchmark regional (many-basin) training on synthetic basins.

Three tables:

1. one training epoch (forward + backward over every basin, one Adam step per batch)
   over N synthetic basins x Y years for each sensitivity: seconds, peak memory
   (resident set growth, from ``resource.getrusage``, and the torch/python allocations
   traced by ``tracemalloc``), basin-days per second;
2. throughput against basins per batch (same epoch, checkpointed adjoint);
3. data-parallel training with 2 processes (gloo) against 1 process.

Defaults are small so that it finishes on a shared 2-core machine; the issue's sizes are::

    python benchmarks/bench_regional.py --basins 671 --years 10 --batch-sizes 32 128 671 --ddp-basins 671

Each epoch uses one-year windows (365 scored days after a 365-day warm-up) unless
``--full-record`` is given, in which case every batch is simulated over the whole record
(then basin-days = basins x years x 365).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

from adjointhydro import distributed as D  # noqa: E402
from adjointhydro.models import exphydro  # noqa: E402
from adjointhydro.regional import regional_hybrid, train_regional  # noqa: E402
from adjointhydro.synthetic import TWIN_BOUNDS, make_synthetic_basins  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one_epoch(ds, *, sensitivity: str, method: str, batch_size: int, full_record: bool, trace: bool,
              dtype: str = "float64") -> dict:
    """Time one training epoch of EXP-HYDRO dPL over the data set ``ds``."""
    T = ds.n_steps
    kw = dict(epochs=1, batch_size=batch_size, method=method, sensitivity=sensitivity, lr=1e-3,
              patience=None, hidden=(32, 32), parameter_bounds=TWIN_BOUNDS if method == "euler" else None,
              val_every=10**9, final_metrics=False,  # validation after the epoch is not timed
              dtype=getattr(torch, dtype))
    if full_record:
        kw.update(window=None, warmup=365)
    else:
        kw.update(window=365, warmup=365)
    rows = []
    if trace:
        tracemalloc.start()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    res = train_regional(exphydro(), ds, **kw)
    total = time.perf_counter() - t0
    peak_traced = tracemalloc.get_traced_memory()[1] / 2**20 if trace else float("nan")
    if trace:
        tracemalloc.stop()
    train_s = res.history[0]["train_seconds"]
    days = ds.n_basins * (T if full_record else min(T, 730))
    rows.append({
        "basins": ds.n_basins, "years": T // 365, "sensitivity": sensitivity, "method": method, "dtype": dtype,
        "batch": batch_size, "epoch_s": train_s, "total_s": total, "basin_days_per_s": days / train_s,
        "rss_growth_mb": _rss_mb() - rss0, "peak_rss_mb": _rss_mb(), "traced_peak_mb": peak_traced,
    })
    return rows[0]


def _ddp_model(spec: dict, ds):
    """EXP-HYDRO (cheap physics: per-step overhead dominates) or the M50 hybrid with
    attribute inputs (network fluxes: arithmetic dominates)."""
    if spec.get("model", "exphydro") == "hybrid":
        return regional_hybrid(list(ds.attribute_names), hidden=(16, 16))
    return exphydro()


def ddp_worker(rank: int, world: int, spec: dict, out: str) -> None:
    syn = make_synthetic_basins(spec["basins"], spec["years"], seed=0, method=spec["method"])
    kw = dict(epochs=1, batch_size=spec["batch"], method=spec["method"], sensitivity=spec["sensitivity"],
              lr=1e-3, patience=None, window=365, warmup=365, parameter_bounds=TWIN_BOUNDS, val_every=10**9,
              final_metrics=False)
    D.all_reduce_sum(torch.zeros(1))  # start together
    res = train_regional(_ddp_model(spec, syn.dataset), syn.dataset, **kw)
    if rank == 0:
        Path(out).write_text(json.dumps({"epoch_s": res.history[0]["train_seconds"]}))


def ddp_run(nprocs: int, spec: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        if nprocs == 1:
            syn = make_synthetic_basins(spec["basins"], spec["years"], seed=0, method=spec["method"])
            res = train_regional(_ddp_model(spec, syn.dataset), syn.dataset, epochs=1, batch_size=spec["batch"],
                                 method=spec["method"],
                                 sensitivity=spec["sensitivity"], lr=1e-3, patience=None, window=365, warmup=365,
                                 parameter_bounds=TWIN_BOUNDS, val_every=10**9, final_metrics=False)
            return res.history[0]["train_seconds"]
        D.spawn_local(ddp_worker, nprocs, spec, out)
        return json.loads(Path(out).read_text())["epoch_s"]


def _row_in_subprocess(h5: str, a, sensitivity: str, batch: int, dtype: str = "float64") -> dict:
    """One epoch in a fresh process, so that its peak resident memory is its own."""
    import subprocess

    cmd = [sys.executable, __file__, "--row", h5, sensitivity, str(batch), "--method", a.method,
           "--dtypes", dtype]
    if a.full_record:
        cmd.append("--full-record")
    if a.trace:
        cmd.append("--trace")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basins", type=int, default=64)
    ap.add_argument("--years", type=int, default=10)
    ap.add_argument("--method", default="euler", help="solver method (euler: one-day steps; dopri5: adaptive)")
    ap.add_argument("--sensitivities", nargs="+", default=["direct", "checkpoint", "adjoint"])
    ap.add_argument("--dtypes", nargs="+", default=["float64"], choices=["float64", "float32"],
                    help="floating types of the solves in table 1 (train_regional's dtype)")
    ap.add_argument("--batch", type=int, default=64, help="basins per batch of table 1")
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=[8, 32, 64])
    ap.add_argument("--ddp-basins", type=int, default=64)
    ap.add_argument("--ddp-years", type=int, default=2)
    ap.add_argument("--ddp-model", choices=["exphydro", "hybrid"], default="exphydro",
                    help="model of the DDP table (hybrid: M50 with attribute inputs)")
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--full-record", action="store_true", help="simulate the whole record in each batch")
    ap.add_argument("--trace", action="store_true", help="tracemalloc peak (slow: traces every allocation)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed for one row")
    ap.add_argument("--row", nargs=3, metavar=("H5", "SENSITIVITY", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.row:
        from adjointhydro.data import read_hdf5

        ds = read_hdf5(a.row[0])
        r = one_epoch(ds, sensitivity=a.row[1], method=a.method, batch_size=int(a.row[2]),
                      full_record=a.full_record, trace=a.trace, dtype=a.dtypes[0])
        print(json.dumps(r))
        return 0
    print(f"# bench_regional {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    syn = make_synthetic_basins(a.basins, a.years, seed=0, method=a.method)
    print(f"# generated {a.basins} basins x {a.years} years in {time.perf_counter() - t0:.1f} s", flush=True)
    from adjointhydro.data import write_hdf5

    tmpdir = tempfile.TemporaryDirectory()
    h5 = os.path.join(tmpdir.name, "synthetic.h5")
    write_hdf5(syn.dataset, h5)
    del syn
    print("\n| basins | years | sensitivity | method | dtype | basins/batch | epoch s | basin-days/s | peak RSS MB |")
    print("|---:|---:|---|---|---|---:|---:|---:|---:|")
    for s in a.sensitivities:
        for dt in a.dtypes:
            r = _row_in_subprocess(h5, a, s, a.batch, dt)
            if "error" in r:
                print(f"| {a.basins} | {a.years} | {s} | {a.method} | {dt} | {a.batch} | failed: {r['error']} | | |",
                      flush=True)
                continue
            print(f"| {r['basins']} | {r['years']} | {s} | {a.method} | {dt} | {r['batch']} | {r['epoch_s']:.1f} | "
                  f"{r['basin_days_per_s']:,.0f} | {r['peak_rss_mb']:.0f} |", flush=True)
    if a.batch_sizes:
        print("\n| basins/batch | epoch s | basin-days/s | peak RSS MB | sensitivity |")
        print("|---:|---:|---:|---:|---|")
        for bsz in a.batch_sizes:
            r = _row_in_subprocess(h5, a, "checkpoint", bsz)
            if "error" in r:
                print(f"| {bsz} | failed: {r['error']} | | | checkpoint |", flush=True)
                continue
            print(f"| {bsz} | {r['epoch_s']:.1f} | {r['basin_days_per_s']:,.0f} | {r['peak_rss_mb']:.0f} | "
                  f"checkpoint |", flush=True)
    if not a.no_ddp:
        spec = {"basins": a.ddp_basins, "years": a.ddp_years, "method": a.method, "batch": a.ddp_basins,
                "sensitivity": "checkpoint", "model": a.ddp_model}
        t1 = ddp_run(1, spec)
        t2 = ddp_run(2, spec)
        days = a.ddp_basins * min(730, a.ddp_years * 365)
        print("\n| model | method | processes | basins | epoch s | basin-days/s | speed-up |")
        print("|---|---|---:|---:|---:|---:|---:|")
        print(f"| {a.ddp_model} | {a.method} | 1 | {a.ddp_basins} | {t1:.1f} | {days / t1:,.0f} | 1.00 |")
        print(f"| {a.ddp_model} | {a.method} | 2 | {a.ddp_basins} | {t2:.1f} | {days / t2:,.0f} | {t1 / t2:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
