"""Accuracy of the benchmark solves: daily discharge against a tight reference.

The problem of ``bench_solve.py`` (EXP-HYDRO M50 hybrid, synthetic forcing, same
seed), solved with the benchmark's settings (dopri5, rtol = atol = 1e-3, checkpointed
adjoint) in float64 and float32, and by the plain torchdiffeq baseline, each compared
with a float64 solve at rtol = atol = 1e-10. Prints, per case: the relative error of
all daily discharge totals, ``||Q - Qref|| / ||Qref||``; the largest relative error of
one day among days with ``Qref > 0.01`` mm; the largest change of NSE against the
reference over basins (the reference series taken as observations, so NSE = 1 is
perfect); and the relative error of the loss gradient with respect to all weights.

    python benchmarks/bench_accuracy.py --basins 256 --years 1
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
    ap.add_argument("--basins", type=int, default=256)
    ap.add_argument("--years", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from adjointhydro import Forcing, solve
    from adjointhydro.models import exphydro_m50

    fv, obs_np = problem(args.basins, args.years)
    torch.manual_seed(0)
    model64 = exphydro_m50(hidden=(16, 16))

    def run(dtype, rtol, sens="checkpoint"):
        model = exphydro_m50(hidden=(16, 16), dtype=dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in model64.state_dict().items()})
        forcing = Forcing(fv, ("P", "T", "PET")).to(dtype=dtype)
        obs = torch.from_numpy(obs_np).to(dtype)
        t0 = time.perf_counter()
        sol = solve(model, forcing, rtol=rtol, atol=rtol, sensitivity=sens)
        loss = ((sol.discharge - obs) ** 2).mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        secs = time.perf_counter() - t0
        return sol.discharge.detach().double(), torch.cat([g.flatten() for g in grads]).double(), secs

    q_ref, g_ref, s_ref = run(torch.float64, 1e-10)
    print(f"# reference: float64, rtol = atol = 1e-10, {s_ref:.1f} s; {args.basins} basins x {args.years} years")
    print(f"{'case':>28} {'rel. L2 err Q':>14} {'max day rel err':>16} {'max |dNSE|':>11} {'grad rel err':>13}")
    wet = q_ref > 0.01
    denom = ((q_ref - q_ref.mean(1, keepdim=True)) ** 2).sum(1)
    for name, dtype, rtol, sens in (("float64, rtol 1e-3", torch.float64, 1e-3, "checkpoint"),
                                    ("float32, rtol 1e-3", torch.float32, 1e-3, "checkpoint"),
                                    ("float64, rtol 1e-6", torch.float64, 1e-6, "checkpoint")):
        q, g, _ = run(dtype, rtol, sens)
        l2 = float((q - q_ref).norm() / q_ref.norm())
        day = float(((q - q_ref).abs() / q_ref.abs())[wet].max())
        dnse = float((((q - q_ref) ** 2).sum(1) / denom).max())
        ge = float((g - g_ref).norm() / g_ref.norm())
        print(f"{name:>28} {l2:>14.2e} {day:>16.2e} {dnse:>11.2e} {ge:>13.2e}", flush=True)


if __name__ == "__main__":
    main()
