"""Whole training runs: the automatic compile of a long run against the uncompiled solver.

The problem of ``bench_solve.py`` (EXP-HYDRO M50 hybrid, synthetic forcing, float64,
dopri5 at rtol = atol = 1e-3), trained by :func:`adjointhydro.training.train_hybrid`
for ``--epochs`` epochs (one Adam step each, on the whole record). "auto" passes the
sensitivity by name (``"checkpoint"``), which compiles the stepper where the run is long
enough (``training._AUTO_COMPILE_BASIN_DAYS``); "uncompiled" passes
``CheckpointedAdjoint()``. Wall seconds of the whole run, compilation included, from a
cold compiler cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``), and the final training loss
of each (equal to the solver tolerance: the default forward is parallel in time for
small batches, the compiled one period by period).

    python benchmarks/bench_train_run.py --basins 16 --years 2 --epochs 60
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

_CACHE = tempfile.mkdtemp(prefix="adjointhydro-bench-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE  # cold: the compilation is part of the run

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_diffrax import forcing as problem  # noqa: E402  (the benchmarks' one forcing generator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basins", type=int, nargs="+", default=[16])
    ap.add_argument("--years", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from adjointhydro import CheckpointedAdjoint, Forcing, training
    from adjointhydro.models import exphydro_m50

    print(f"# torch {torch.__version__}, threads={args.threads}, float64, {args.years} year(s), "
          f"{args.epochs} epochs; automatic compile from {training._AUTO_COMPILE_BASIN_DAYS:,} basin-days")
    print(f"{'basins':>6} {'basin-days':>11} {'run':>10} {'compiled':>8} {'seconds':>8} {'s/epoch':>8} "
          f"{'final loss':>12}")
    for B in args.basins:
        fv, target = problem(B, args.years)
        forcing = Forcing(fv, ("P", "T", "PET"))
        T = fv.shape[1]
        mask = np.arange(T) >= 30
        for name, sens in (("auto", "checkpoint"), ("uncompiled", CheckpointedAdjoint())):
            torch.manual_seed(0)
            model = exphydro_m50(hidden=(16, 16))
            chosen = training._long_run_sensitivity(sens, B, T, args.epochs, torch.device("cpu"))
            t0 = time.perf_counter()
            res = training.train_hybrid(model, forcing, target, train_mask=mask, loss="mse", epochs=args.epochs,
                                        lr=1e-3, patience=None, progress=False, sensitivity=sens)
            sec = time.perf_counter() - t0
            print(f"{B:>6} {B * T * args.epochs:>11,} {name:>10} {str(bool(getattr(chosen, 'compile', False))):>8} "
                  f"{sec:>8.1f} {sec / args.epochs:>8.3f} {res.history[-1]['train_loss']:>12.6g}")


if __name__ == "__main__":
    main()
