"""The compiled stepper against the default solver, in one process: equal results, then timings.

The problem of ``bench_solve.py`` (EXP-HYDRO M50 hybrid, synthetic forcing, float64,
dopri5 at rtol = atol = 1e-3). For each batch size: one solve with
``CheckpointedAdjoint(compile=True)`` (compiling it, untimed) and one eager
period-by-period solve, whose daily discharge must agree to rounding; then the median
forward and forward+backward seconds of three solves (after one untimed) of the
default ``CheckpointedAdjoint()`` and of the compiled one. On a GPU the peak is
``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_compiled.py --basins 16 64
    python3 benchmarks/bench_compiled.py --device cuda --basins 4096 256 64 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_diffrax import forcing as problem  # noqa: E402  (the benchmarks' one forcing generator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basins", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--years", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from adjointhydro import CheckpointedAdjoint, Forcing, solve
    from adjointhydro.models import exphydro_m50

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    print(f"# torch {torch.__version__}, {dev}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, "
          f"threads={args.threads}, float64, {args.years} year(s)")
    for B in args.basins:
        torch.manual_seed(0)
        fv, target = problem(B, args.years)
        forcing = Forcing(fv, ("P", "T", "PET")).to(device=dev)
        model = exphydro_m50(hidden=(16, 16)).to(dev)
        obs = torch.from_numpy(target).to(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            qc = solve(model, forcing, sensitivity=CheckpointedAdjoint(compile=True, parallel_forward=False)).discharge
            qe = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False)).discharge
        sync()
        diff = float(((qc - qe).abs() / qe.abs().clamp(min=1e-3)).max())
        print(f"{B} basins: compiling and both solves {time.perf_counter() - t0:.1f} s; "
              f"compiled against eager discharge, max relative difference {diff:.1e}")
        for name, make in (("checkpoint", lambda: CheckpointedAdjoint()),
                           ("compiled", lambda: CheckpointedAdjoint(compile=True, parallel_forward=False))):
            res = []
            for _ in range(4):
                model.zero_grad()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                sol = solve(model, forcing, sensitivity=make(), rtol=1e-3, atol=1e-3)
                sync()
                t1 = time.perf_counter()
                ((sol.discharge - obs) ** 2).mean().backward()
                sync()
                res.append((t1 - t0, time.perf_counter() - t0))
            fwd = statistics.median(r[0] for r in res[1:])
            tot = statistics.median(r[1] for r in res[1:])
            peak = f"  peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if cuda else ""
            print(f"  {name:10s} fwd {fwd:.3f} s  fwd+bwd {tot:.3f} s  {B * fv.shape[1] / tot:>12,.0f} basin-days/s"
                  f"  nfe {sol.stats['flux_evaluations']}{peak}")


if __name__ == "__main__":
    main()
