"""Gradient time inside a training loop: warm-started against cold Newton forward passes.

The problem of ``bench_solve.py`` (EXP-HYDRO M50 hybrid, synthetic forcing, same seed,
float64, dopri5 at rtol = atol = 1e-3). An Adam loop (lr 1e-3) takes ``--steps``
steps; each step is one solve, the mean squared error and its gradient. "cold" gives
every step a new ``CheckpointedAdjoint()``, as ``bench_solve.py`` does (one solve on
its own, what the comparison with diffrax measures); "warm" keeps one instance for the
loop, as :func:`adjointhydro.training.train` does, so that each Newton forward pass
(up to 32 basins on a CPU) starts from the previous step's trajectory; "compiled"
keeps one ``CheckpointedAdjoint(compile=True)`` (compiled once, in the untimed first
steps: a training loop changes values, not shapes). Prints the median seconds per step
(the first two steps untimed) and the final loss of each, which must agree: neither
changes the solution.

    python benchmarks/bench_training_loop.py --basins 1 16 --steps 12
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_diffrax import forcing as problem  # noqa: E402  (the benchmarks' one forcing generator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basins", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--years", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from adjointhydro import CheckpointedAdjoint, Forcing, solve
    from adjointhydro.models import exphydro_m50

    print(f"# torch {torch.__version__}, threads={args.threads}, float64, {args.years} year(s), "
          f"{args.steps} Adam steps")
    print(f"{'basins':>6} {'forward':>8} {'median s/step':>14} {'basin-days/s':>13} {'final loss':>12}")
    for B in args.basins:
        fv, target = problem(B, args.years)
        forcing = Forcing(fv, ("P", "T", "PET"))
        obs = torch.from_numpy(target)
        for mode in ("cold", "warm", "compiled"):
            torch.manual_seed(0)
            model = exphydro_m50()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            kept = CheckpointedAdjoint(compile=mode == "compiled")
            times = []
            for _ in range(args.steps):
                sens = CheckpointedAdjoint() if mode == "cold" else kept
                opt.zero_grad()
                t0 = time.perf_counter()
                loss = ((solve(model, forcing, sensitivity=sens).discharge - obs) ** 2).mean()
                loss.backward()
                times.append(time.perf_counter() - t0)
                opt.step()
            times = sorted(times[2:])
            med = times[len(times) // 2]
            print(f"{B:>6} {mode:>8} {med:>14.3f} {B * fv.shape[1] / med:>13,.0f} {float(loss.detach()):>12.6f}")


if __name__ == "__main__":
    main()
