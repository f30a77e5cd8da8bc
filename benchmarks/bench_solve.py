"""Solve and gradient throughput of the EXP-HYDRO M50 hybrid, per sensitivity.

Prints a table: basins x years, sensitivity, forward seconds, forward+backward
seconds, flux evaluations (calls of the right-hand side, each over a whole batch),
basin-days per second (forward+backward) and peak resident memory, next to a
plain torchdiffeq ``odeint_adjoint`` dopri5 baseline measured in the same run
(forcing looked up at each time, one step size for the whole batch, no jump
handling). Each case runs in its own process so that peak memory is its own.

    python benchmarks/bench_solve.py                 # the full grid
    python benchmarks/bench_solve.py --basins 1 64 --years 1 --repeat 3
    python benchmarks/bench_solve.py --device cuda --basins 256 --years 1   # on a GPU

Sensitivities: ``torchdiffeq`` (the baseline), ``checkpoint`` (the default
``CheckpointedAdjoint()``), ``checkpoint-compiled`` (``CheckpointedAdjoint(compile=True)``:
the period-by-period forward's step compiled; compilation untimed, as diffrax's),
``checkpoint-seq`` and ``checkpoint-par`` (its forward pass forced sequential, or
parallel in time with 2**20 rows in flight), ``adjoint``, ``direct``. The first 20-day solve and gradient of each process is not timed.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

CASE = r'''
import json, resource, sys, time
import torch
torch.set_num_threads({threads})
torch.manual_seed(0)
from adjointhydro import Forcing, solve, CheckpointedAdjoint
from adjointhydro.models import exphydro_m50

B, years, sens, repeat = {basins}, {years}, "{sens}", {repeat}
device = torch.device("{device}")
dtype = getattr(torch, "{dtype}")
cuda = device.type == "cuda"
T = 365 * years
sys.path.insert(0, {bench_dir!r})
from bench_diffrax import forcing as synthetic_forcing  # the benchmarks' one generator
fv, target = synthetic_forcing(B, years)
forcing = Forcing(fv, ("P", "T", "PET")).to(dtype=dtype, device=device)
model = exphydro_m50(hidden=(16, 16), dtype=dtype).to(device)
obs = torch.from_numpy(target).to(device=device, dtype=dtype)

def sync():
    if cuda:
        torch.cuda.synchronize()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def baseline_run(backward):
    import torchdiffeq
    fv = forcing.values
    params = model.physical_parameters().expand(B, -1)
    class RHS(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.m = model; self.n = 0
        def forward(self, t, z):
            self.n += 1
            k = torch.clamp(torch.floor(t).long(), 0, T - 1)
            f = fv[:, k]
            from adjointhydro.fluxes import Vars
            F = model.fluxes(z[:, :2], Vars(zip(("P", "T", "PET"), f.unbind(-1))),
                             Vars(zip(model.parameter_names, params.unbind(-1))))
            return torch.cat([F @ model.wiring_matrix, F], -1)
    rhs = RHS()
    z0 = torch.cat([model.initial_state(Vars(zip(model.parameter_names, params.unbind(-1))), B, dtype),
                    torch.zeros(B, 5, dtype=dtype, device=device)], -1)
    t = torch.arange(T + 1, dtype=dtype, device=device)
    z = torchdiffeq.odeint_adjoint(rhs, z0, t, rtol=1e-3, atol=1e-3, method="dopri5",
                                   adjoint_params=tuple(p for p in model.parameters() if p is not model.raw))
    q = (z[1:, :, 6] - z[:-1, :, 6]).T
    t1 = time.perf_counter()
    if backward:
        ((q - obs) ** 2).mean().backward()
    return q, rhs.n

from adjointhydro.fluxes import Vars
# first-call costs (lazy imports, kernel loading) untimed, as diffrax's compilation
w = solve(model, forcing.select(steps=slice(0, 20)), sensitivity="checkpoint")
w.discharge.sum().backward()
if sens == "checkpoint-compiled":  # compilation untimed too (the whole record: every stretch's shape)
    with torch.no_grad():
        solve(model, forcing, sensitivity=CheckpointedAdjoint(compile=True))
model.zero_grad()
res = []
for r in range(repeat):
    model.zero_grad()
    t0 = time.perf_counter()
    if sens == "torchdiffeq":
        q, nfe = baseline_run(False)
        sync()
        t1 = time.perf_counter()
        ((q - obs) ** 2).mean().backward()
    else:
        sensitivity = {{"checkpoint": CheckpointedAdjoint(),
                       "checkpoint-seq": CheckpointedAdjoint(parallel_forward=False),
                       "checkpoint-par": CheckpointedAdjoint(parallel_forward=True, max_rows=1 << 20),
                       "checkpoint-compiled": CheckpointedAdjoint(compile=True)}}.get(sens, sens)
        sol = solve(model, forcing, sensitivity=sensitivity, rtol=1e-3, atol=1e-3)
        sync()
        t1 = time.perf_counter()
        ((sol.discharge - obs) ** 2).mean().backward()
        nfe = sol.stats["flux_evaluations"]
    sync()
    t2 = time.perf_counter()
    res.append((t1 - t0, t2 - t0, nfe))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if cuda:  # GPU memory, not the process's
    rss, rss0 = torch.cuda.max_memory_allocated() / 1024, 0
res.sort(key=lambda x: x[1])
fwd, tot, nfe = res[len(res) // 2]
print(json.dumps(dict(fwd=fwd, total=tot, nfe=nfe, peak_mb=rss / 1024, base_mb=rss0 / 1024)))
'''


def run_case(basins: int, years: int, sens: str, repeat: int, threads: int, timeout: float,
             device: str = "cpu", dtype: str = "float64") -> dict:
    import os
    code = CASE.format(basins=basins, years=years, sens=sens, repeat=repeat, threads=threads, device=device,
                       dtype=dtype, bench_dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"> {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_diffrax(python: str, basins: int, years: int, repeat: int, timeout: float, dtype: str = "float64",
                threads: int = 1) -> dict:
    """The same problem in diffrax (bench_diffrax.py), with a Python that has jax and diffrax."""
    import os
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_diffrax.py")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    try:
        out = subprocess.run([python, script, "--basins", str(basins), "--years", str(years), "--repeat",
                              str(repeat), "--json", "--dtype", dtype], capture_output=True, text=True, timeout=timeout, env=env)
    except (subprocess.TimeoutExpired, OSError) as e:
        return {"error": f"> {timeout:.0f} s" if isinstance(e, subprocess.TimeoutExpired) else str(e)[:60]}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basins", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--years", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--sensitivities", nargs="+",
                    default=["torchdiffeq", "checkpoint", "checkpoint-seq", "adjoint", "direct"])
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                    help="precision of model, forcing and state (both libraries)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per case before it is skipped")
    ap.add_argument("--device", default="cpu", help="torch device of the solves, e.g. cuda (peak MB is then "
                    "the GPU's peak allocation)")
    ap.add_argument("--diffrax", metavar="PYTHON", default=None,
                    help="also run the diffrax version (bench_diffrax.py) with this Python, which must have "
                         "jax and diffrax; compile time excluded")
    args = ap.parse_args()
    import torch

    dev = args.device
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name()})"
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"python {platform.python_version()}  torch {torch.__version__}  threads={args.threads}  device={dev}  {args.dtype}")
    print(f"{'basins':>6} {'years':>5} {'sensitivity':>15} {'fwd s':>8} {'fwd+bwd s':>10} {'nfe':>7} "
          f"{'basin-days/s':>13} {'peak MB':>8} {'x baseline':>10}")
    for years in args.years:
        for basins in args.basins:
            base = None
            cases = list(args.sensitivities) + (["diffrax"] if args.diffrax else [])
            for sens in cases:
                if sens == "diffrax":
                    r = run_diffrax(args.diffrax, basins, years, args.repeat, args.timeout, args.dtype, args.threads)
                else:
                    r = run_case(basins, years, sens, args.repeat, args.threads, args.timeout, args.device,
                                 args.dtype)
                if "error" in r:
                    print(f"{basins:>6} {years:>5} {sens:>15} {r['error']:>40}", flush=True)
                    continue
                bd = basins * 365 * years / r["total"]
                if sens == "torchdiffeq":
                    base = r["total"]
                ratio = f"{base / r['total']:.1f}" if base else "-"
                print(f"{basins:>6} {years:>5} {sens:>15} {r['fwd']:>8.2f} {r['total']:>10.2f} {r['nfe']:>7d} "
                      f"{bd:>13.0f} {r['peak_mb']:>8.0f} {ratio:>10}", flush=True)


if __name__ == "__main__":
    main()
