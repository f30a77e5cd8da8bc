"""A/B timing of the working tree against an earlier commit, in one process.

The development machines are shared and their speed drifts by 10-30% within an hour, so
two benchmark runs minutes apart do not tell a 10% change from noise. This script
imports both versions side by side (the old one extracted with ``git archive`` under
another package name), checks that they compute the same daily discharge and gradient,
and alternates their runs, so that drift hits both alike. Prints medians and minima of
the forward solve (no graph) and of forward + backward, for the EXP-HYDRO M50 hybrid on
the synthetic forcing of ``bench_solve.py``::

    python benchmarks/bench_ab.py HEAD~1 --basins 256 --days 365 --repeat 4
    python benchmarks/bench_ab.py fad26f3 --dtype float32 --days 90
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_diffrax import forcing as synthetic_forcing  # noqa: E402  (the benchmarks' one generator)


def old_package(rev: str, where: str) -> str:
    """Extract ``adjointhydro/`` at ``rev`` into ``where`` as package ``adjointhydro_ab_old``."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True,
                          check=True).stdout.strip()
    data = subprocess.run(["git", "archive", "--format=tar", rev, "adjointhydro"], cwd=root,
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(where, filter="data")
    os.rename(os.path.join(where, "adjointhydro"), os.path.join(where, "adjointhydro_ab_old"))
    return "adjointhydro_ab_old"


def cases(pkg_name: str, fv: np.ndarray, obs: torch.Tensor, dtype: torch.dtype):
    pkg = importlib.import_module(pkg_name)
    models = importlib.import_module(pkg_name + ".models")
    torch.manual_seed(0)
    model = models.exphydro_m50(dtype=dtype)
    forcing = pkg.Forcing(fv, ("P", "T", "PET")).to(dtype=dtype)

    def forward():
        with torch.no_grad():
            return pkg.solve(model, forcing, rtol=1e-3, atol=1e-3).discharge

    def forward_backward():
        model.zero_grad()
        sol = pkg.solve(model, forcing, rtol=1e-3, atol=1e-3)
        ((sol.discharge - obs) ** 2).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    return forward, forward_backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the earlier commit (any git revision)")
    ap.add_argument("--basins", type=int, default=256)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--repeat", type=int, default=4, help="runs of each version per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    fv, target = synthetic_forcing(args.basins, max(1, -(-args.days // 365)))
    fv = fv[:, : args.days]
    obs = torch.from_numpy(target[:, : args.days]).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        old_name = old_package(args.rev, tmp)
        sys.path.insert(0, tmp)
        sys.path.insert(0, os.path.dirname(HERE))  # the working tree's adjointhydro
        runs = {"old": cases(old_name, fv, obs, dtype), "new": cases("adjointhydro", fv, obs, dtype)}
        q_old, q_new = runs["old"][0](), runs["new"][0]()
        g_old, g_new = runs["old"][1](), runs["new"][1]()
        dq = float((q_old - q_new).abs().max() / q_old.abs().max())
        dg = float((g_old - g_new).abs().max() / g_old.abs().max())
        print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.rev} (old) vs working tree (new)  {args.basins} basins x "
              f"{args.days} days  {args.dtype}  torch {torch.__version__}")
        print(f"# largest relative difference: daily discharge {dq:.1e}, gradient {dg:.1e}")
        print(f"{'measure':>12} {'old median':>11} {'new median':>11} {'old min':>8} {'new min':>8} {'old/new':>8}")
        for k, label in ((0, "forward"), (1, "fwd+bwd")):
            t = {"old": [], "new": []}
            for r in range(args.repeat):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    t0 = time.perf_counter()
                    runs[name][k]()
                    t[name].append(time.perf_counter() - t0)
            mo, mn = float(np.median(t["old"])), float(np.median(t["new"]))
            print(f"{label:>12} {mo:>11.3f} {mn:>11.3f} {min(t['old']):>8.3f} {min(t['new']):>8.3f} {mo / mn:>8.2f}")


if __name__ == "__main__":
    main()
