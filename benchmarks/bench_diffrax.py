"""Optional peer comparison: the EXP-HYDRO M50 hybrid of ``bench_solve.py`` in diffrax (JAX).

Needs only ``jax``, ``diffrax`` and ``numpy`` (not adjointhydro, not torch), so it can run
in its own environment::

    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax diffrax numpy
    /tmp/jaxenv/bin/python benchmarks/bench_diffrax.py --basins 1 64 256 --years 1 10

Same problem as ``bench_solve.py``: synthetic forcing from the same generator and seed,
snow and soil stores, melt and partition by temperature with smooth steps, ``et`` and
``Q`` from MLPs (16-16, tanh, softplus output, limited by soil), float64 (``--dtype``), dopri5 at
rtol = atol = 1e-3 with every day boundary a jump time, daily discharge totals carried
as an extra state, loss = mean squared error against a fixed series, gradient with
respect to the network weights and the physical parameters. Sensitivity: diffrax's
``RecursiveCheckpointAdjoint`` (memory-flat checkpointed backpropagation). Basins are
vectorised with ``jax.vmap`` (each basin its own step sizes). Times exclude the
one-off compilation, which is reported separately. Prints one JSON line per case when
``--json`` is given (``bench_solve.py --diffrax PYTHON`` uses that), else a table.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def forcing(B: int, years: int) -> tuple[np.ndarray, np.ndarray]:
    """The generator of bench_solve.py: [B, T, (P, T, PET)] and the target series."""
    T = 365 * years
    rng = np.random.default_rng(0)
    doy = np.arange(T) % 365
    season = np.cos(2 * np.pi * (doy - 200) / 365)
    temp = 8 + 14 * season[None] + rng.normal(0, 3, (B, T))
    prcp = rng.gamma(0.7, 7.0, (B, T)) * (rng.random((B, T)) < 0.45)
    pet = np.clip(2.2 + 1.8 * season, 0.1, None)[None].repeat(B, 0)
    return np.stack([prcp, temp, pet], -1), prcp * 0.4


def run(B: int, years: int, repeat: int, dtype: str = "float64") -> dict:
    import jax

    jax.config.update("jax_enable_x64", dtype == "float64")
    import diffrax
    import jax.numpy as jnp

    real = jnp.float64 if dtype == "float64" else jnp.float32

    fv, obs = forcing(B, years)
    T = fv.shape[1]
    key = jax.random.PRNGKey(0)

    def mlp(key, n_in):
        sizes = [n_in, 16, 16, 1]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            key, k1 = jax.random.split(key)
            lim = 1.0 / np.sqrt(a)
            layers.append((jax.random.uniform(k1, (b, a), minval=-lim, maxval=lim, dtype=real),
                           jnp.zeros(b, dtype=real)))
        w, b = layers[-1]
        layers[-1] = (w * 0.1, b)
        return key, layers

    key, net_et = mlp(key, 4)
    key, net_q = mlp(key, 2)
    theta = {"et": net_et, "q": net_q, "Df": jnp.array(2.67), "Tmax": jnp.array(0.176), "Tmin": jnp.array(-2.09)}
    loc_et = jnp.array([50.0, 500.0, 10.0, 2.0])
    sc_et = jnp.array([50.0, 500.0, 10.0, 2.0])
    loc_q = jnp.array([500.0, 3.0])
    sc_q = jnp.array([500.0, 5.0])

    def net(layers, x):
        for w, b in layers[:-1]:
            x = jnp.tanh(w @ x + b)
        w, b = layers[-1]
        return (w @ x + b)[0]

    def step(x):
        return jax.nn.sigmoid(10.0 * x)  # smooth_step with sharpness 5

    def rhs(t, z, args):
        th, f = args
        k = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, T - 1)
        P, Ta, PET = f[k, 0], f[k, 1], f[k, 2]
        snow, soil = z[0], z[1]
        snowfall = step(th["Tmin"] - Ta) * P
        rain = P - snowfall
        melt = step(Ta - th["Tmax"]) * step(snow) * jnp.minimum(snow, th["Df"] * (Ta - th["Tmax"]))
        lim = jax.nn.relu(soil)
        lim = lim / (lim + 1.0)
        et = jax.nn.softplus(net(th["et"], (jnp.stack([snow, soil, Ta, PET]) - loc_et) / sc_et)) * 1.5 / np.log(2) * lim
        q = jax.nn.softplus(net(th["q"], (jnp.stack([soil, P]) - loc_q) / sc_q)) * 1.0 / np.log(2) * lim
        return jnp.stack([snowfall - melt, rain + melt - et - q, q])

    ts = jnp.arange(T + 1, dtype=real)
    controller = diffrax.ClipStepSizeController(diffrax.PIDController(rtol=1e-3, atol=1e-3), jump_ts=ts[1:-1])

    def solve_one(th, f):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs), diffrax.Dopri5(), 0.0, float(T), None, jnp.array([0.0, 1709.0, 0.0], dtype=real),
            args=(th, f), saveat=diffrax.SaveAt(ts=ts), stepsize_controller=controller,
            adjoint=diffrax.RecursiveCheckpointAdjoint(), max_steps=64 * T,
        )
        return jnp.diff(sol.ys[:, 2]), sol.stats["num_steps"]

    fj = jnp.asarray(fv, dtype=real)
    oj = jnp.asarray(obs, dtype=real)

    @jax.jit
    def forward(th):
        q, steps = jax.vmap(solve_one, in_axes=(None, 0))(th, fj)
        return q, steps

    @jax.jit
    def loss_and_grad(th):
        def loss(th):
            q, _ = jax.vmap(solve_one, in_axes=(None, 0))(th, fj)
            return jnp.mean((q - oj) ** 2)
        return jax.value_and_grad(loss)(th)

    t0 = time.perf_counter()
    jax.block_until_ready(forward(theta))
    jax.block_until_ready(loss_and_grad(theta))
    compile_s = time.perf_counter() - t0
    res = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        q, steps = forward(theta)
        jax.block_until_ready(q)
        t1 = time.perf_counter()
        jax.block_until_ready(loss_and_grad(theta))
        t2 = time.perf_counter()
        # loss_and_grad solves forward itself: it alone is the forward+backward time
        res.append((t1 - t0, t2 - t1))
    res.sort(key=lambda r: r[1])
    fwd, tot = res[len(res) // 2]
    # each accepted or rejected dopri5 step costs 6 new evaluations (FSAL)
    nfe = int(6 * np.max(np.asarray(steps)))
    return dict(fwd=fwd, total=tot, nfe=nfe, compile_s=compile_s,
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basins", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--years", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON line per case (for bench_solve.py)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = ap.parse_args()
    if not args.json:
        print(f"{'basins':>6} {'years':>5} {'fwd s':>8} {'fwd+bwd s':>10} {'basin-days/s':>13} {'compile s':>10} {'peak MB':>8}")
    for years in args.years:
        for B in args.basins:
            r = run(B, years, args.repeat, args.dtype)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{B:>6} {years:>5} {r['fwd']:>8.2f} {r['total']:>10.2f} {B * 365 * years / r['total']:>13.0f} "
                      f"{r['compile_s']:>10.1f} {r['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
