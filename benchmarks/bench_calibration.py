"""Leaf River M0 calibration: adjoint gradients (Adam, L-BFGS) against differential evolution.

EXP-HYDRO without snow on the vendored Leaf River record (warm-up 1957, calibration
1958-1977, test 1978-1987), loss 1 - NSE on the calibration period, the same model,
data and solver (dopri5, rtol = atol = 1e-3) for every method:

* ``adam``  -- :func:`adjointhydro.training.calibrate`, Adam on the logit-scaled
  parameters, ``--starts`` random starts solved as one batch, checkpointed adjoint;
* ``lbfgs`` -- the same with L-BFGS (strong-Wolfe line search);
* ``de``    -- :func:`adjointhydro.training.calibrate_de`, scipy's
  ``differential_evolution`` whose population is solved as one batch (no gradients).

Prints one table: final train (calibration) NSE, test NSE, wall seconds, model runs
(basin-runs: rows of every solve, a gradient evaluation counting one per row) and
batched solves, then the seconds and model runs each method needed to FIRST reach a
common train-NSE threshold (default: the best final train NSE of DE minus 0.005).
``--json FILE`` writes the histories (best train NSE after each iteration/generation
against seconds and model runs).

    python benchmarks/bench_calibration.py                        # adam, lbfgs, de
    python benchmarks/bench_calibration.py --methods lbfgs de --de-generations 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

WARMUP, TRAIN, TEST = ("1957-01-01", "1957-12-31"), ("1958-01-01", "1977-12-31"), ("1978-01-01", "1987-12-31")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["adam", "lbfgs", "de"], choices=["adam", "lbfgs", "de"])
    ap.add_argument("--starts", type=int, default=None,
                    help="random starts of the adjoint methods (default: adam 4, lbfgs 3)")
    ap.add_argument("--adam-iterations", type=int, default=30)
    ap.add_argument("--adam-lr", type=float, default=0.1)
    ap.add_argument("--lbfgs-iterations", type=int, default=20)
    ap.add_argument("--de-generations", type=int, default=30, help="DE generations after the initial population")
    ap.add_argument("--de-popsize", type=int, default=15, help="scipy popsize (members = popsize x 3 parameters)")
    ap.add_argument("--forward", choices=["parallel", "sequential"], default="parallel",
                    help="forward pass of the adjoint methods' checkpointed adjoint: parallel-in-time "
                         "(automatic rule, used for small batches) or sequential")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=None,
                    help="train NSE to reach (default: DE's final train NSE - 0.005, else 0.69)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the histories to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from adjointhydro import solve
    from adjointhydro.data import load_leaf_river
    from adjointhydro.metrics import calculate_metrics
    from adjointhydro.models import exphydro
    from adjointhydro.solve import CheckpointedAdjoint
    from adjointhydro.training import calibrate, calibrate_de

    ds = load_leaf_river()
    cal = ds.period(WARMUP[0], TRAIN[1])
    forcing = cal.to_forcing(["P", "PET"])
    observed = cal.observed("Q")
    dates = np.asarray(cal.dates).astype("datetime64[D]")
    train_mask = dates >= np.datetime64(TRAIN[0])
    full = ds.period(WARMUP[0], TEST[1])
    full_forcing = full.to_forcing(["P", "PET"])
    full_obs = full.observed("Q")
    fdates = np.asarray(full.dates).astype("datetime64[D]")
    test_mask = fdates >= np.datetime64(TEST[0])
    trainf_mask = (fdates >= np.datetime64(TRAIN[0])) & ~test_mask
    solver = dict(method="dopri5", rtol=1e-3, atol=1e-3)
    model = exphydro(snow=False, smoothing=5.0)

    def scores(params: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            sol = solve(model, full_forcing, parameters=params, sensitivity="direct", **solver)
        q = sol.discharge.numpy()[0]
        tr = calculate_metrics(full_obs[0, trainf_mask], q[trainf_mask], ["nse"])["nse"]
        te = calculate_metrics(full_obs[0, test_mask], q[test_mask], ["nse"])["nse"]
        return float(tr), float(te)

    sens = CheckpointedAdjoint(parallel_forward=None if args.forward == "parallel" else False)
    results = {}
    for m in args.methods:
        print(f"[{time.strftime('%H:%M:%S')}] {m} ...", file=sys.stderr, flush=True)
        if m == "de":
            r = calibrate_de(model, forcing, observed, score_mask=train_mask, loss="nse",
                             popsize=args.de_popsize, maxiter=args.de_generations, seed=args.seed, **solver)
            label = f"differential evolution (pop {args.de_popsize * 3}, {len(r.history) - 1} gen.)"
        else:
            n = args.starts or (4 if m == "adam" else 3)
            kw = dict(lr=args.adam_lr, iterations=args.adam_iterations) if m == "adam" else dict(
                iterations=args.lbfgs_iterations)
            r = calibrate(model, forcing, observed, score_mask=train_mask, loss="nse", optimizer=m,
                          n_starts=n, seed=args.seed, sensitivity=sens, **kw, **solver)
            label = (f"adjoint Adam ({n} starts, {len(r.history) - 1} it.)" if m == "adam"
                     else f"adjoint L-BFGS ({n} starts, {len(r.history)} it.)")
        tr, te = scores(r.parameters)
        results[m] = {
            "label": label,
            "train_nse": 1.0 - float(r.loss[0]),
            "train_nse_check": tr,
            "test_nse": te,
            "seconds": r.seconds,
            "model_runs": r.n_model_runs,
            "solves": r.n_solves,
            "failed_solves": r.n_failed_solves,
            "parameters": dict(zip(r.parameter_names, r.parameters[0].tolist())),
            "history": [{"nse": 1.0 - h["loss"], "seconds": h["seconds"], "model_runs": h["model_runs"]}
                        for h in r.history],
        }
        print(f"[{time.strftime('%H:%M:%S')}] {m}: train NSE {results[m]['train_nse']:.4f}, test NSE {te:.4f}, "
              f"{r.seconds:.0f} s, {r.n_model_runs} model runs; "
              + ", ".join(f"{k}={v:.4g}" for k, v in results[m]["parameters"].items()), file=sys.stderr, flush=True)

    if args.threshold is not None:
        thr, why = args.threshold, "given"
    elif "de" in results:
        thr, why = results["de"]["train_nse"] - 0.005, "DE final - 0.005"
    else:
        thr, why = 0.69, "default"

    def first(h: list[dict]) -> tuple[float | None, int | None]:
        for x in h:
            if x["nse"] >= thr:
                return x["seconds"], x["model_runs"]
        return None, None

    def fmt(v, spec):
        return "n/r" if v is None else format(v, spec)

    print()
    print(f"Leaf River, EXP-HYDRO without snow, dopri5 rtol=atol=1e-3; calibration {TRAIN[0][:4]}-{TRAIN[1][:4]} "
          f"(warm-up 1957), test {TEST[0][:4]}-{TEST[1][:4]}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"threshold: train NSE >= {thr:.4f} ({why}); n/r = not reached")
    print()
    print("| method | train NSE | test NSE | wall s | model runs | solves | s to threshold | runs to threshold |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        s, n = first(r["history"])
        r["seconds_to_threshold"], r["runs_to_threshold"] = s, n
        print(f"| {r['label']} | {r['train_nse']:.4f} | {r['test_nse']:.4f} | {r['seconds']:.1f} | "
              f"{r['model_runs']} | {r['solves']} | {fmt(s, '.1f')} | {fmt(n, 'd')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threshold": thr, "threshold_rule": why, "results": results,
                       "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d")}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
