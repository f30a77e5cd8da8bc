"""Synthetic large-sample data for twin experiments: attributes -> parameters -> discharge.

:func:`make_synthetic_basins` draws ``N`` basins, each with a handful of static
catchment attributes, *true* EXP-HYDRO parameters given by a known smooth function of
those attributes (:func:`true_parameters`), daily forcing from a stochastic weather
generator (:func:`weather_generator`) and discharge simulated by EXP-HYDRO (with snow)
with :func:`adjointhydro.solve.solve`. Everything is deterministic given the seed.

It serves tests and benchmarks of regional training (:mod:`adjointhydro.regional`):
a network that maps attributes to parameters should recover :func:`true_parameters`
on basins it has never seen.

Attributes (all drawn independently and uniformly within the ranges below):

=================  ==========  ===============================================
name               units       role
=================  ==========  ===============================================
``latitude``       deg N       day length for Hamon PET, temperature seasonality
``elevation``      m           mean temperature (lapse rate 6.5 degC/km); Tmin, Tmax
``aridity``        \\-         mean PET / mean P (sets the precipitation amounts); f
``slope``          m/km        Qmax, f
``soil_depth``     m           Smax
``forest_frac``    \\-         Smax, Df
=================  ==========  ===============================================

Weather generator (per basin, daily):

* wet/dry days: a two-state Markov chain with ``P(wet | dry) = p01`` and
  ``P(wet | wet) = p11``, both seasonally modulated (wetter winters);
* rainfall amounts on wet days: gamma with shape 0.75 and a scale set so that the
  long-term mean precipitation is ``mean PET / aridity``;
* temperature: ``T = Tbar + A cos(2 pi (doy - 200)/365) + AR(1) noise`` (sd 3 degC,
  lag-1 correlation 0.7); ``Tbar = 18 degC`` at sea level and 35 N, falling 6.5 degC per km of elevation and
  0.5 degC per degree of latitude north of 35 N; ``A`` grows with latitude;
* PET: Hamon (:func:`adjointhydro.data.hamon_pet`) from ``T``, latitude and day of year.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .data import BasinDataset, day_of_year, hamon_pet
from .forcing import Forcing
from .models import exphydro
from .model import Model
from .solve import solve

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_RANGES",
    "SyntheticBasins",
    "make_synthetic_basins",
    "true_parameters",
    "weather_generator",
    "parameter_sensitivity",
    "twin_experiment",
    "TWIN_BOUNDS",
    "TWIN_FIXED",
]

#: Attribute names, in column order.
ATTRIBUTES = ("latitude", "elevation", "aridity", "slope", "soil_depth", "forest_frac")
#: (low, high, units) of each attribute's uniform distribution.
ATTRIBUTE_RANGES = {
    "latitude": (30.0, 50.0, "deg N"),
    "elevation": (50.0, 2500.0, "m"),
    "aridity": (0.4, 2.0, "-"),
    "slope": (1.0, 100.0, "m/km"),
    "soil_depth": (0.3, 2.0, "m"),
    "forest_frac": (0.0, 1.0, "-"),
}


#: Parameters held constant in :func:`true_parameters` and fixed in twin experiments.
TWIN_FIXED = {"Tmax": 1.0, "Tmin": -1.0}


def _unit(attributes: np.ndarray) -> dict[str, np.ndarray]:
    """Attributes ``[B, 6]`` -> name -> position in its range, 0..1."""
    a = np.asarray(attributes, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(ATTRIBUTES):
        raise ValueError(f"attributes must have shape [basin, {len(ATTRIBUTES)}] ({list(ATTRIBUTES)}), got {a.shape}")
    out = {}
    for j, n in enumerate(ATTRIBUTES):
        lo, hi, _ = ATTRIBUTE_RANGES[n]
        out[n] = (a[:, j] - lo) / (hi - lo)
    return out


def true_parameters(attributes: np.ndarray) -> np.ndarray:
    """The known attribute -> EXP-HYDRO parameter function, ``[B, 6]`` -> ``[B, 6]``.

    Columns follow :data:`adjointhydro.models.EXPHYDRO_PARAMETERS`
    (``f`` 1/mm, ``Smax`` mm, ``Qmax`` mm/day, ``Df`` mm/day/degC, ``Tmax`` degC,
    ``Tmin`` degC). Smooth, mildly nonlinear, and strictly inside the bounds::

        Smax = 150 + 850 * (0.65 s + 0.35 w)^1.2                 s: soil depth, w: forest fraction
        Qmax = 4 + 22 * sqrt(g) * (1 - 0.3 s)                     g: slope
        f    = 0.005 + 0.035 / (1 + exp(-4 (a - 0.5))) * (0.6 + 0.4 (1 - g))   a: aridity
        Df   = 1.0 + 2.5 (1 - 0.6 w) * (0.5 + 0.5 e)              e: elevation
        Tmax = 1.0,  Tmin = -1.0                                  (constants, see below)

    where every attribute is taken as its position in its range (0..1). The baseflow
    slope ``Qmax * f`` stays below about 1/day, so one-day fixed steps are stable.

    The snow thresholds are constant: the melt threshold ``Tmax`` trades off against the
    melt factor ``Df`` (``melt = Df (T - Tmax)``), so with both free neither can be
    recovered from discharge (:func:`parameter_sensitivity` with ``kind="profile"``);
    twin experiments fix them (:data:`TWIN_FIXED`) and learn the other four.
    """
    u = _unit(attributes)
    s, w, g, a, e = u["soil_depth"], u["forest_frac"], u["slope"], u["aridity"], u["elevation"]
    smax = 150.0 + 850.0 * (0.65 * s + 0.35 * w) ** 1.2
    qmax = 4.0 + 22.0 * np.sqrt(g) * (1.0 - 0.3 * s)
    f = 0.005 + 0.035 / (1.0 + np.exp(-4.0 * (a - 0.5))) * (0.6 + 0.4 * (1.0 - g))
    df = 1.0 + 2.5 * (1.0 - 0.6 * w) * (0.5 + 0.5 * e)
    tmax = np.full_like(e, TWIN_FIXED["Tmax"])
    tmin = np.full_like(e, TWIN_FIXED["Tmin"])
    return np.stack([f, smax, qmax, df, tmax, tmin], axis=1)


def weather_generator(
    attributes: np.ndarray, dates: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Daily forcing ``[B, T, 3]`` = (``P`` mm/day, ``T`` degC, ``PET`` mm/day) for each basin.

    See the module docstring for the model. ``attributes`` ``[B, 6]`` in :data:`ATTRIBUTES`
    order; ``dates`` regular daily ``datetime64[D]``; ``rng`` supplies every random number.
    """
    a = np.asarray(attributes, dtype=np.float64)
    B, T = a.shape[0], len(dates)
    lat, elev, arid = a[:, 0], a[:, 1], a[:, 2]
    doy = day_of_year(dates)
    season = np.cos(2 * np.pi * (doy - 200) / 365.0)  # +1 mid-July, -1 mid-January
    # temperature
    t_bar = 18.0 - 6.5 * elev / 1000.0 - 0.5 * (lat - 35.0)
    amp = 9.0 + 0.25 * (lat - 30.0)
    noise = np.empty((B, T))
    eps = rng.normal(0.0, 1.0, (B, T))
    rho, sd = 0.7, 3.0
    noise[:, 0] = sd * eps[:, 0]
    for t in range(1, T):
        noise[:, t] = rho * noise[:, t - 1] + sd * np.sqrt(1 - rho**2) * eps[:, t]
    temp = t_bar[:, None] + amp[:, None] * season[None] + noise
    pet = hamon_pet(temp, lat[:, None], doy[None])
    # wet/dry Markov chain, wetter in winter and in humid basins
    humid = np.clip(1.0 - (arid - 0.4) / 1.6, 0.0, 1.0)  # 1 humid .. 0 arid
    p01 = (0.20 + 0.15 * humid)[:, None] * (1.0 - 0.2 * season[None])
    p11 = (0.55 + 0.15 * humid)[:, None] * (1.0 - 0.1 * season[None])
    u = rng.random((B, T))
    wet = np.zeros((B, T), dtype=bool)
    wet[:, 0] = u[:, 0] < 0.4
    for t in range(1, T):
        wet[:, t] = np.where(wet[:, t - 1], u[:, t] < p11[:, t], u[:, t] < p01[:, t])
    shape = 0.75
    amounts = rng.gamma(shape, 1.0, (B, T))
    # scale so that mean P = mean PET / aridity, using the realised wet days and amounts
    raw = np.where(wet, amounts, 0.0)
    target = pet.mean(axis=1) / arid
    scale = target / np.maximum(raw.mean(axis=1), 1e-9)
    precip = raw * scale[:, None]
    return np.stack([precip, temp, pet], axis=-1)


@dataclass
class SyntheticBasins:
    """Output of :func:`make_synthetic_basins`.

    Attributes:
        dataset: a :class:`~adjointhydro.data.BasinDataset` with forcing ``P``, ``T``,
            ``PET``, observation ``Q`` (mm/day, NaN where dropped) and the attributes.
        true_parameters: ``[B, 6]`` physical EXP-HYDRO parameters used for ``Q``.
        parameter_names: their names (``f``, ``Smax``, ``Qmax``, ``Df``, ``Tmax``, ``Tmin``).
        discharge: the simulated discharge without noise or gaps ``[B, T]`` (mm/day).
        mass_balance_error: per basin, storage change minus net inflow over the record (mm).
        seed: the seed used.
    """

    dataset: BasinDataset
    true_parameters: np.ndarray
    parameter_names: tuple[str, ...]
    discharge: np.ndarray
    mass_balance_error: np.ndarray
    seed: int

    @property
    def forcing(self) -> Forcing:
        """The ``P``, ``T``, ``PET`` forcing as a :class:`Forcing`."""
        return self.dataset.to_forcing(["P", "T", "PET"])

    @property
    def observed(self) -> np.ndarray:
        """Observed discharge ``[B, T]`` (mm/day, NaN = missing)."""
        return self.dataset.observed("Q")

    @property
    def attributes(self) -> np.ndarray:
        return self.dataset.attributes


def make_synthetic_basins(
    n_basins: int,
    years: int = 5,
    seed: int = 0,
    *,
    start: str = "2000-01-01",
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    noise: float = 0.0,
    missing_fraction: float = 0.0,
    model: Model | None = None,
) -> SyntheticBasins:
    """Draw ``n_basins`` synthetic basins: attributes, true parameters, forcing, discharge.

    Args:
        n_basins: number of basins (ids ``syn0000``, ``syn0001`` ...).
        years: record length in years of 365 days (the dates are real calendar days
            from ``start``, so ``years * 365`` days).
        seed: seed of every random draw; the same seed gives identical output.
        method, rtol, atol: solver of the "true" discharge (:func:`adjointhydro.solve.solve`);
            a twin experiment that trains with the same method has no model error.
        noise: multiplicative log-normal observation noise (sd of log Q; 0 = none).
        missing_fraction: fraction of observations set to NaN at random days (gaps).
        model: the true model; default :func:`adjointhydro.models.exphydro` (snow on).

    Returns:
        a :class:`SyntheticBasins`.

    Raises:
        ValueError: for non-positive sizes or fractions outside [0, 1).
    """
    if int(n_basins) < 1:
        raise ValueError(f"n_basins must be at least 1, got {n_basins}")
    if int(years) < 1:
        raise ValueError(f"years must be at least 1, got {years}")
    if not 0.0 <= missing_fraction < 1.0:
        raise ValueError(f"missing_fraction must be in [0, 1), got {missing_fraction}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(int(seed))
    B, T = int(n_basins), int(years) * 365
    dates = np.datetime64(start, "D") + np.arange(T)
    attrs = np.stack(
        [rng.uniform(ATTRIBUTE_RANGES[n][0], ATTRIBUTE_RANGES[n][1], B) for n in ATTRIBUTES], axis=1
    )
    forcing = weather_generator(attrs, dates, rng)
    params = true_parameters(attrs)
    model = model if model is not None else exphydro(snow=True)
    f = Forcing(forcing, ("P", "T", "PET"), ("mm/day", "degC", "mm/day"), dates=dates,
                basins=tuple(f"syn{i:04d}" for i in range(B)), source=f"synthetic(seed={seed})")
    with torch.no_grad():
        sol = solve(model, f, parameters=torch.as_tensor(params), method=method, rtol=rtol, atol=atol,
                    sensitivity="direct")
    q = sol.discharge.numpy().astype(np.float64)
    mb = sol.mass_balance_error().numpy()
    obs = q.copy()
    if noise > 0:
        obs = obs * np.exp(rng.normal(-0.5 * noise**2, noise, obs.shape))
    if missing_fraction > 0:
        obs[rng.random(obs.shape) < missing_fraction] = np.nan
    ds = BasinDataset(
        basins=list(f.basins), dates=dates, forcing=forcing, forcing_names=["P", "T", "PET"],
        forcing_units=["mm/day", "degC", "mm/day"], observations=obs[:, :, None],
        observation_names=["Q"], observation_units=["mm/day"], attributes=attrs,
        attribute_names=list(ATTRIBUTES), source=f"synthetic(seed={seed})",
    )
    return SyntheticBasins(ds, params, tuple(model.parameter_names), q, mb, int(seed))


def parameter_sensitivity(
    model: Model,
    forcing: Forcing,
    parameters: np.ndarray | torch.Tensor,
    *,
    step: float = 0.1,
    warmup: int = 365,
    kind: str = "marginal",
    free: Sequence[str] | None = None,
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> dict[str, np.ndarray]:
    """How much discharge responds to each parameter, per basin (a practical identifiability test).

    ``kind="marginal"``: each parameter is moved by ``step`` of its range (towards the
    middle of the range, so the move stays inside the bounds) while the others are held;
    the sensitivity is ``1 - NSE`` of the perturbed discharge against the unperturbed one,
    after ``warmup`` days.

    ``kind="profile"``: the same move, but the other parameters may compensate
    (linearised): with ``J`` the finite-difference Jacobian of discharge with respect to
    the parameters in units of their ranges and ``F = J^T J / SST`` (``SST`` the sum of
    squared deviations of the reference discharge), the sensitivity is
    ``step^2 / (F^-1)_jj``. It is small for a parameter that trades off against others
    (collinearity, e.g. the melt factor ``Df`` against the melt threshold ``Tmax``), even
    if moving it alone changes the discharge: such a parameter cannot be recovered from
    discharge, whatever the method (Brun et al. 2001, WRR 37, 1015-1030). ``free``: the
    parameters that may compensate (default all; parameters known or fixed are left out).

    Returns:
        name -> ``[basin]`` array of ``1 - NSE`` between perturbed and reference discharge.
    """
    if kind not in ("marginal", "profile"):
        raise ValueError(f"kind must be 'marginal' or 'profile', got {kind!r}")
    p0 = torch.as_tensor(parameters, dtype=torch.float64)
    low, high = model.param_low, model.param_high

    def run(p: torch.Tensor) -> torch.Tensor:
        return solve(model, forcing, parameters=p, method=method, rtol=rtol, atol=atol,
                     sensitivity="direct").discharge[:, warmup:]

    with torch.no_grad():
        ref = run(p0)
        sst = ((ref - ref.mean(-1, keepdim=True)) ** 2).sum(-1)
        out = {}
        if kind == "marginal":
            for j, name in enumerate(model.parameter_names):
                p = p0.clone()
                mid = 0.5 * (low[j] + high[j])
                direction = torch.where(p[:, j] < mid, 1.0, -1.0).to(p.dtype)
                p[:, j] = p[:, j] + direction * step * (high[j] - low[j])
                out[name] = (((run(p) - ref) ** 2).sum(-1) / sst).numpy()
            return out
        names = list(model.parameter_names) if free is None else [n for n in model.parameter_names if n in free]
        cols = []
        h = 0.01
        for j in (model.parameter_names.index(n) for n in names):
            width = high[j] - low[j]
            up, dn = p0.clone(), p0.clone()
            up[:, j] = torch.clamp(p0[:, j] + h * width, max=high[j])
            dn[:, j] = torch.clamp(p0[:, j] - h * width, min=low[j])
            cols.append((run(up) - run(dn)) / ((up[:, j] - dn[:, j]) / width)[:, None])
        J = torch.stack(cols, -1)  # [B, T, P], per unit of range
        F = J.transpose(1, 2) @ J / sst[:, None, None]
        ridge = 1e-12 * F.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
        Finv = torch.linalg.inv(F + ridge[:, None, None] * torch.eye(F.shape[-1], dtype=F.dtype))
        for j, name in enumerate(names):
            out[name] = (step**2 / Finv[:, j, j]).numpy()
    return out


def attribute_table(names: Sequence[str] = ATTRIBUTES) -> str:
    """A Markdown table of the attribute ranges (for reports)."""
    rows = ["| attribute | low | high | units |", "|---|---:|---:|---|"]
    for n in names:
        lo, hi, u = ATTRIBUTE_RANGES[n]
        rows.append(f"| {n} | {lo:g} | {hi:g} | {u} |")
    return "\n".join(rows)


#: Narrower parameter bounds used by the twin experiments: with one-day fixed steps
#: (``method="euler"``) the baseflow slope ``Qmax * f`` must stay below 2/day for a
#: stable solve; these still contain every value of :func:`true_parameters` with margin.
TWIN_BOUNDS = {"f": (1e-4, 0.06), "Qmax": (0.5, 30.0)}


def twin_experiment(
    n_basins: int = 200,
    n_train: int = 150,
    years: int = 4,
    *,
    seed: int = 0,
    epochs: int = 100,
    batch_size: int = 50,
    lr: float = 1e-2,
    method: str = "euler",
    sensitivity: str = "direct",
    hidden: Sequence[int] = (32, 32),
    noise: float = 0.0,
    identifiable_threshold: float = 0.02,
    val_every: int = 1,
    window: int | None = None,
    progress: bool = False,
) -> dict:
    """Twin experiment at scale: learn the attribute -> parameter map on ``n_train`` basins,
    test it on the ``n_basins - n_train`` held-out ones.

    Year 1 is warm-up, years 2 .. ``years - 1`` train, the last year validates (early
    stopping; with ``years=2`` the second year trains and there is no validation period). With ``window=None`` (default) every mini-batch is simulated from the start
    of the record, so its states match those of the true run; with ``window`` days, each
    batch starts a 365-day warm-up from the model's initial state (soil at ``Smax``,
    no snow) at a random date, which the true run did not do: a small model error. Held-out basins are simulated over
    the whole record from their attributes alone and scored after the warm-up year.

    The snow thresholds are fixed at their (constant) true values (:data:`TWIN_FIXED`);
    the network learns ``f``, ``Smax``, ``Qmax`` and ``Df``.

    Identifiability (per basin, :func:`parameter_sensitivity` with ``kind="profile"``,
    a move of 10 % of the range that the other learned parameters may compensate, linearised):
    a parameter counts as identifiable in a basin when the move still changes the
    discharge by ``1 - NSE >= identifiable_threshold``; it is *identifiable* when this
    holds in at least half of the held-out basins, and its R2 is computed over the basins
    where it holds (``r2_all``: over every held-out basin). ``identifiable_fraction_marginal``
    gives the fractions for moves of one parameter alone (no compensation).

    Returns:
        a dict with ``nse_heldout`` (per basin), ``nse_heldout_median``, ``nse_prior_median``
        (the untrained network, i.e. default parameters), ``r2`` and ``r2_all`` (name -> value),
        ``identifiable`` (name -> bool), ``identifiable_fraction``, ``epochs_run``,
        ``best_epoch``, ``seconds``, ``settings``.
    """
    import time

    from .regional import AttributeParameters, evaluate_regional, r_squared, train_regional

    t0 = time.perf_counter()
    if not 1 <= n_train < n_basins:
        raise ValueError(f"need 1 <= n_train < n_basins, got n_train={n_train}, n_basins={n_basins}")
    if years < 2:
        raise ValueError(f"the twin needs at least 2 years (warm-up, training), got {years}")
    syn = make_synthetic_basins(n_basins, years, seed=seed, method=method, noise=noise)
    ds = syn.dataset
    T = ds.n_steps
    k = np.arange(T)
    if years >= 3:
        train_mask = (k >= 365) & (k < T - 365)
        val_mask = k >= T - 365
    else:  # two years: train on the second, no separate validation period
        train_mask, val_mask = k >= 365, None
    score = k >= 365
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(n_basins)
    tr_idx, te_idx = np.sort(order[:n_train]), np.sort(order[n_train:])
    train = ds.select_basins([ds.basins[i] for i in tr_idx])
    test = ds.select_basins([ds.basins[i] for i in te_idx])
    model = exphydro(snow=True)
    res = train_regional(
        model, train, train_mask=train_mask, val_mask=val_mask, epochs=epochs, batch_size=batch_size,
        window=window, warmup=365, lr=lr, lr_schedule="cosine", patience=None, seed=seed, method=method,
        sensitivity=sensitivity, hidden=hidden, parameter_bounds=TWIN_BOUNDS, start="middle",
        fixed_parameters=TWIN_FIXED,
        val_every=val_every, progress=progress,
    )
    net = res.network
    met, _ = evaluate_regional(model, net, test, periods={"test": score}, metrics=("nse", "kge"), method=method)
    nse_test = np.array([met[b]["test"]["nse"] for b in test.basins])
    torch.manual_seed(seed)
    prior = AttributeParameters(model, net.attribute_names, hidden=hidden, bounds=TWIN_BOUNDS, start="middle",
                                fixed=TWIN_FIXED)
    prior.fit_normalisation(train.attributes)
    pmet, _ = evaluate_regional(model, prior, test, periods={"test": score}, metrics=("nse",), method=method)
    nse_prior = np.array([pmet[b]["test"]["nse"] for b in test.basins])
    with torch.no_grad():
        est = net(test.attributes).numpy()
    truth = syn.true_parameters[te_idx]
    ftest = test.to_forcing(["P", "T", "PET"])
    learned = [n for n in syn.parameter_names if n not in TWIN_FIXED]
    sens = parameter_sensitivity(model, ftest, truth, method=method, warmup=365, kind="profile", free=learned)
    marg = parameter_sensitivity(model, ftest, truth, method=method, warmup=365, kind="marginal")
    r2, r2_all, ident, frac, frac_m = {}, {}, {}, {}, {}
    for j, name in enumerate(syn.parameter_names):
        if name not in learned:
            continue
        ok = sens[name] >= identifiable_threshold
        frac[name] = float(ok.mean())
        frac_m[name] = float((marg[name] >= identifiable_threshold).mean())
        ident[name] = bool(ok.mean() >= 0.5)
        r2_all[name] = r_squared(truth[:, j], est[:, j])
        r2[name] = r_squared(truth[ok, j], est[ok, j]) if ok.sum() >= 3 else float("nan")
    return {
        "nse_heldout": nse_test, "nse_heldout_median": float(np.median(nse_test)),
        "nse_prior_median": float(np.median(nse_prior)), "r2": r2, "r2_all": r2_all,
        "identifiable": ident, "identifiable_fraction": frac,
        "identifiable_fraction_marginal": frac_m, "epochs_run": len(res.history),
        "best_epoch": res.best_epoch, "best_val_loss": res.best_val_loss,
        "train_nse_median": res.summary("nse")["train"]["median"],
        "seconds": time.perf_counter() - t0,
        "settings": {"n_basins": n_basins, "n_train": n_train, "years": years, "seed": seed, "epochs": epochs,
                     "batch_size": batch_size, "lr": lr, "method": method, "sensitivity": sensitivity,
                     "hidden": list(hidden), "noise": noise, "window": window},
    }
