"""Hydrological performance metrics (numpy) and differentiable training losses (torch).

Evaluation metrics
------------------
Every metric takes ``obs, sim`` of shape ``[time]`` or ``[basin, time]`` (time is
the last axis; numpy arrays, array-likes or torch tensors) and returns a ``float``
for ``[time]`` input or a ``numpy`` array ``[basin]`` for ``[basin, time]`` input.
Discharge is assumed in mm/day (any consistent unit works for the dimensionless
metrics; ``rmse`` is in the unit of the input).

Missing values: a time step where ``obs`` *or* ``sim`` is NaN is dropped for that
basin, so a metric on masked data equals the metric on the array with those
positions removed (except :func:`peak_timing`, which needs the time axis intact
and skips peaks whose window touches a gap).

A metric is NaN (never an exception, never a ``RuntimeWarning``) when it is
undefined for a basin: fewer than 2 valid steps, observations without variation
(for NSE, KGE, r, ...), zero observed mean (for ``beta``, ``pbias``, KGE), etc.

Training losses
---------------
:func:`nse_loss`, :func:`kge_loss` and :func:`mse_loss` take ``sim, obs`` tensors
``[basin, time]`` (NaN in ``obs`` = missing) and return a scalar tensor. Missing
observations are replaced with ``torch.where`` before any arithmetic, so NaN never
enters the autograd graph and gradients stay finite.

References
----------
* Nash & Sutcliffe (1970), J. Hydrol. 10(3).
* Gupta et al. (2009), J. Hydrol. 377, doi:10.1016/j.jhydrol.2009.08.003 (KGE).
* Kling et al. (2012), J. Hydrol. 424-425, doi:10.1016/j.jhydrol.2012.01.011 (KGE').
* Yilmaz et al. (2008), Water Resour. Res. 44, doi:10.1029/2007WR006716 (FDC signatures).
* Kratzert et al. (2019), HESS 23, doi:10.5194/hess-23-5089-2019 (NSE*, peak timing);
  neuralhydrology ``evaluation/metrics.py``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.signal import find_peaks

__all__ = [
    "nse",
    "log_nse",
    "kge",
    "kge_2012",
    "rmse",
    "pbias",
    "pearson_r",
    "alpha",
    "alpha_nse",
    "beta",
    "beta_nse",
    "fhv",
    "flv",
    "fms",
    "peak_timing",
    "calculate_metrics",
    "METRICS",
    "nse_loss",
    "kge_loss",
    "mse_loss",
    "LOSSES",
]

#: Minimum number of valid (obs and sim not NaN) steps for a metric to be defined.
MIN_VALID = 2

#: Default floor (mm/day) replacing zero / negative flows before taking logs in
#: :func:`flv` and :func:`fms` (same value as neuralhydrology).
LOG_FLOOR = 1e-6

Metric = Callable[..., "float | np.ndarray"]


# --------------------------------------------------------------------------- helpers


def _as_array(x: Any) -> np.ndarray:
    """float64 numpy copy of ``x`` (torch tensors are detached, moved to CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64)  # copy: callers must never see their input modified


def _prepare(obs: Any, sim: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return ``obs, sim`` as ``[basin, time]`` float64 arrays and whether input was 1-D."""
    o, s = _as_array(obs), _as_array(sim)
    if o.shape != s.shape:
        raise ValueError(f"obs and sim must have the same shape, got {o.shape} and {s.shape}")
    if o.ndim == 1:
        return o[None, :], s[None, :], True
    if o.ndim == 2:
        return o, s, False
    raise ValueError(f"obs and sim must be [time] or [basin, time], got shape {o.shape}")


def _finish(out: np.ndarray, squeeze: bool) -> "float | np.ndarray":
    return float(out[0]) if squeeze else out


def _per_basin(func: Callable[[np.ndarray, np.ndarray], float], obs: Any, sim: Any) -> "float | np.ndarray":
    """Apply ``func(o, s)`` to the valid (paired non-NaN) values of every basin.

    Basins with fewer than :data:`MIN_VALID` valid steps get NaN without calling ``func``.
    """
    o, s, squeeze = _prepare(obs, sim)
    out = np.full(o.shape[0], np.nan)
    # errstate: the per-basin functions return NaN explicitly where undefined;
    # this only silences round-off edge cases (e.g. log of a floored value).
    with np.errstate(all="ignore"):
        for b in range(o.shape[0]):
            valid = ~(np.isnan(o[b]) | np.isnan(s[b]))
            if np.count_nonzero(valid) < MIN_VALID:
                continue
            out[b] = func(o[b, valid], s[b, valid])
    return _finish(out, squeeze)


def _is_constant(x: np.ndarray) -> bool:
    # Exact test on the values: a variance computed from a mean can be a tiny
    # non-zero round-off for constant data (e.g. [0.1]*5) and give garbage NSE.
    return bool(x.max() == x.min())


def _div(a: float, b: float) -> float:
    """``a / b``, NaN where ``b`` is zero or not finite (no warning)."""
    if b == 0 or not np.isfinite(b):
        return np.nan
    return float(a / b)


def _nse_1d(o: np.ndarray, s: np.ndarray) -> float:
    if _is_constant(o):
        return np.nan
    d = o - o.mean()
    return 1.0 - _div(np.sum((s - o) ** 2), np.sum(d * d))


def _r_1d(o: np.ndarray, s: np.ndarray) -> float:
    if _is_constant(o) or _is_constant(s):
        return np.nan  # correlation with a constant series is undefined
    do, ds = o - o.mean(), s - s.mean()
    r = _div(np.sum(do * ds), np.sqrt(np.sum(do * do) * np.sum(ds * ds)))
    return float(np.clip(r, -1.0, 1.0))  # round-off can give |r| slightly above 1


def _fdc(x: np.ndarray) -> np.ndarray:
    """Flow duration curve: flows sorted descending (index i ~ exceedance i/n)."""
    return np.sort(x)[::-1]


# --------------------------------------------------------------------------- metrics


def nse(obs: Any, sim: Any) -> "float | np.ndarray":
    """Nash-Sutcliffe efficiency.

    ``NSE = 1 - sum_t (s_t - o_t)^2 / sum_t (o_t - mean(o))^2`` (dimensionless,
    range (-inf, 1], 1 = perfect). NaN if the observations are constant.
    """
    return _per_basin(_nse_1d, obs, sim)


def log_nse(obs: Any, sim: Any, eps: float | None = None) -> "float | np.ndarray":
    """NSE of log-transformed flows, emphasising low flows.

    ``logNSE = NSE(log(o + eps), log(s + eps))`` with, by default,
    ``eps = 0.01 * mean(o)`` (mm/day; mean over the valid steps of each basin),
    which keeps zero flows finite without dominating the low-flow range.
    Negative values (in ``sim`` from a model, or in ``obs`` from bad data) are
    clipped to 0 first, since discharge cannot be negative. NaN if ``eps <= 0``
    (e.g. all observations zero) or the observations are constant.

    Args:
        eps: offset in mm/day; ``None`` for ``0.01 * mean(obs)`` per basin.
    """

    def f(o: np.ndarray, s: np.ndarray) -> float:
        o, s = np.maximum(o, 0.0), np.maximum(s, 0.0)
        e = 0.01 * o.mean() if eps is None else float(eps)
        if not e > 0:
            return np.nan
        return _nse_1d(np.log(o + e), np.log(s + e))

    return _per_basin(f, obs, sim)


def _kge_parts(o: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """(r, alpha, beta) of Gupta et al. (2009); population standard deviations."""
    r = _r_1d(o, s)
    a = _div(s.std(), o.std())
    b = _div(s.mean(), o.mean())
    return r, a, b


def kge(obs: Any, sim: Any) -> "float | np.ndarray":
    """Kling-Gupta efficiency (Gupta et al. 2009).

    ``KGE = 1 - sqrt((r - 1)^2 + (alpha - 1)^2 + (beta - 1)^2)`` with ``r`` the
    Pearson correlation, ``alpha = sigma_s / sigma_o`` and ``beta = mu_s / mu_o``
    (dimensionless, 1 = perfect). NaN if obs or sim is constant or ``mu_o = 0``.
    """

    def f(o: np.ndarray, s: np.ndarray) -> float:
        r, a, b = _kge_parts(o, s)
        return float(1.0 - np.sqrt((r - 1) ** 2 + (a - 1) ** 2 + (b - 1) ** 2))

    return _per_basin(f, obs, sim)


def kge_2012(obs: Any, sim: Any) -> "float | np.ndarray":
    """Modified Kling-Gupta efficiency KGE' (Kling et al. 2012).

    ``KGE' = 1 - sqrt((r - 1)^2 + (gamma - 1)^2 + (beta - 1)^2)`` with
    ``gamma = (sigma_s / mu_s) / (sigma_o / mu_o)`` (ratio of coefficients of
    variation, so bias and variability errors are not cross-correlated) and
    ``beta = mu_s / mu_o``. NaN if obs or sim is constant or a mean is 0.
    """

    def f(o: np.ndarray, s: np.ndarray) -> float:
        r = _r_1d(o, s)
        b = _div(s.mean(), o.mean())
        g = _div(_div(s.std(), s.mean()), _div(o.std(), o.mean()))
        return float(1.0 - np.sqrt((r - 1) ** 2 + (g - 1) ** 2 + (b - 1) ** 2))

    return _per_basin(f, obs, sim)


def rmse(obs: Any, sim: Any) -> "float | np.ndarray":
    """Root mean squared error ``sqrt(mean_t (s_t - o_t)^2)``, in mm/day (input unit)."""
    return _per_basin(lambda o, s: float(np.sqrt(np.mean((s - o) ** 2))), obs, sim)


def pbias(obs: Any, sim: Any) -> "float | np.ndarray":
    """Percent bias ``100 * sum_t (s_t - o_t) / sum_t o_t`` (%, positive = overestimation).

    NaN if ``sum(o) = 0``.
    """
    return _per_basin(lambda o, s: 100.0 * _div(np.sum(s - o), np.sum(o)), obs, sim)


def pearson_r(obs: Any, sim: Any) -> "float | np.ndarray":
    """Pearson correlation ``cov(o, s) / (sigma_o sigma_s)``; NaN if either is constant."""
    return _per_basin(_r_1d, obs, sim)


def alpha(obs: Any, sim: Any) -> "float | np.ndarray":
    """Variability ratio ``alpha = sigma_s / sigma_o`` (1 = perfect; NSE/KGE decomposition).

    NaN if the observations are constant. Same as neuralhydrology's ``alpha_nse``.
    """
    return _per_basin(lambda o, s: np.nan if _is_constant(o) else _div(s.std(), o.std()), obs, sim)


#: Alias with neuralhydrology's name for :func:`alpha`.
alpha_nse = alpha


def beta(obs: Any, sim: Any) -> "float | np.ndarray":
    """Mean ratio ``beta = mu_s / mu_o`` (1 = perfect; the KGE bias term). NaN if ``mu_o = 0``.

    Not to be confused with :func:`beta_nse`, the normalised difference.
    """
    return _per_basin(lambda o, s: _div(s.mean(), o.mean()), obs, sim)


def beta_nse(obs: Any, sim: Any) -> "float | np.ndarray":
    """Normalised mean difference ``(mu_s - mu_o) / sigma_o`` (0 = perfect).

    The bias term of the NSE decomposition (Gupta et al. 2009), as ``beta_nse``
    in neuralhydrology. NaN if the observations are constant.
    """
    return _per_basin(
        lambda o, s: np.nan if _is_constant(o) else _div(s.mean() - o.mean(), o.std()), obs, sim
    )


def fhv(obs: Any, sim: Any, h: float = 0.02) -> "float | np.ndarray":
    """Peak flow bias of the flow duration curve, %BiasFHV (Yilmaz et al. 2008).

    ``FHV = 100 * sum_{h} (s_h - o_h) / sum_{h} o_h`` over the ``H = round(h * n)``
    highest flows of each FDC (obs and sim sorted separately), at least one value
    (the maximum) for short series. Percent; positive = peaks overestimated.
    NaN if the high-flow segment of obs sums to 0.

    Args:
        h: fraction of the FDC taken as high flows (default 2 %).
    """
    if not 0 < h <= 1:
        raise ValueError(f"fhv: h must be in (0, 1], got {h}")

    def f(o: np.ndarray, s: np.ndarray) -> float:
        k = max(1, int(np.round(h * o.size)))
        oh, sh = _fdc(o)[:k], _fdc(s)[:k]
        return 100.0 * _div(np.sum(sh - oh), np.sum(oh))

    return _per_basin(f, obs, sim)


def flv(obs: Any, sim: Any, l: float = 0.3, floor: float = LOG_FLOOR) -> "float | np.ndarray":  # noqa: E741
    """Low flow bias of the flow duration curve, %BiasFLV (Yilmaz et al. 2008).

    On the lowest ``l`` fraction of each FDC (indices from ``round((1 - l) * n)``),
    in log space with ``L`` the minimum flow of the segment:

    ``FLV = -100 * (sum(log s_l - log s_L) - sum(log o_l - log o_L)) / sum(log o_l - log o_L)``

    Percent; the sign follows Yilmaz et al. (positive = simulated low-flow
    segment less steep than observed). Flows below ``floor`` (mm/day; zeros,
    and negative simulated values) are set to ``floor`` so the log is finite.
    NaN if the segment has fewer than 2 values or the observed segment is flat
    (denominator 0).

    Args:
        l: fraction of the FDC taken as low flows (default 30 %).
        floor: smallest flow used in the logarithm, mm/day (default 1e-6).
    """
    if not 0 < l <= 1:
        raise ValueError(f"flv: l must be in (0, 1], got {l}")
    if not floor > 0:
        raise ValueError(f"flv: floor must be > 0, got {floor}")

    def f(o: np.ndarray, s: np.ndarray) -> float:
        start = int(np.round((1 - l) * o.size))
        ol = np.log(np.maximum(_fdc(o)[start:], floor))
        sl = np.log(np.maximum(_fdc(s)[start:], floor))
        if ol.size < 2:
            return np.nan
        qol = np.sum(ol - ol.min())
        qsl = np.sum(sl - sl.min())
        return -100.0 * _div(qsl - qol, qol)

    return _per_basin(f, obs, sim)


def fms(
    obs: Any, sim: Any, lower: float = 0.2, upper: float = 0.7, floor: float = LOG_FLOOR
) -> "float | np.ndarray":
    """Bias of the FDC midsegment slope, %BiasFMS (Yilmaz et al. 2008).

    With ``m1``, ``m2`` the FDC flows at exceedance ``lower`` and ``upper``
    (indices ``round(lower * n)``, ``round(upper * n)`` of the descending FDC):

    ``FMS = 100 * ((log s_m1 - log s_m2) - (log o_m1 - log o_m2)) / (log o_m1 - log o_m2)``

    Percent; positive = simulated midsegment steeper (flashier) than observed.
    Flows below ``floor`` (mm/day) are set to ``floor`` before the log. NaN if
    the observed midsegment is flat.

    Args:
        lower, upper: exceedance probabilities bounding the midsegment (0 < lower < upper < 1).
        floor: smallest flow used in the logarithm, mm/day (default 1e-6).
    """
    if not 0 <= lower < upper < 1:
        raise ValueError(f"fms: need 0 <= lower < upper < 1, got lower={lower}, upper={upper}")
    if not floor > 0:
        raise ValueError(f"fms: floor must be > 0, got {floor}")

    def f(o: np.ndarray, s: np.ndarray) -> float:
        i1, i2 = int(np.round(lower * o.size)), int(np.round(upper * o.size))
        i2 = min(i2, o.size - 1)
        if i1 >= i2:
            return np.nan
        lo = np.log(np.maximum(_fdc(o)[[i1, i2]], floor))
        ls = np.log(np.maximum(_fdc(s)[[i1, i2]], floor))
        slope_o, slope_s = lo[0] - lo[1], ls[0] - ls[1]
        return 100.0 * _div(slope_s - slope_o, slope_o)

    return _per_basin(f, obs, sim)


def _peak_timing_1d(
    o: np.ndarray, s: np.ndarray, window: int, distance: int, prominence: float | None
) -> float:
    valid = ~(np.isnan(o) | np.isnan(s))
    idx = np.flatnonzero(valid)
    if idx.size < MIN_VALID:
        return np.nan
    ov = o[idx]  # find_peaks is not reliable with NaN: search the gap-free series
    prom = float(np.std(ov)) if prominence is None else float(prominence)
    if _is_constant(ov):
        return np.nan
    peaks, _ = find_peaks(ov, distance=distance, prominence=prom)
    n = o.size
    errors: list[int] = []
    for p in peaks:
        t = int(idx[p])  # position on the original time axis
        lo, hi = t - window, t + window
        # skip peaks near the ends or near missing values: the window would be
        # truncated or span more time than 2*window+1 steps
        if lo < 0 or hi >= n or not valid[lo : hi + 1].all():
            continue
        if s[t] > s[t - 1] and s[t] > s[t + 1]:
            offset = 0  # sim has its own peak at the observed peak time
        else:
            seg = s[lo : hi + 1]
            cand = np.flatnonzero(seg == seg.max()) - window
            offset = int(cand[np.argmin(np.abs(cand))])  # ties (flat top): closest to t
        errors.append(abs(offset))
    return float(np.mean(errors)) if errors else np.nan


def peak_timing(
    obs: Any,
    sim: Any,
    window: int = 3,
    distance: int = 100,
    prominence: float | None = None,
) -> "float | np.ndarray":
    """Mean absolute peak timing error, in time steps (Kratzert et al.; neuralhydrology).

    Observed peaks are found with ``scipy.signal.find_peaks(obs, distance=distance,
    prominence=prominence)`` on the valid steps; by default ``prominence`` is the
    standard deviation of the observations (mm/day) and ``distance = 100`` steps,
    so only major, well separated events count (daily data). For each observed
    peak at ``t``: if ``sim`` has a local maximum at ``t`` the error is 0,
    otherwise it is ``|t - argmax(sim[t - window : t + window + 1])|`` (the
    simulated maximum closest to ``t`` on ties). The metric is the mean error
    over peaks, in ``[0, window]``.

    Peaks whose window leaves the series or touches a missing step are skipped.
    NaN if no peak is evaluated (no major peak, or fewer than 2 valid steps).

    Args:
        window: half-width of the search window in steps (default 3 for daily data).
        distance: minimum distance between observed peaks, in steps (>= 1).
        prominence: minimum prominence of observed peaks, mm/day; ``None`` for std(obs).
    """
    if int(window) < 1:
        raise ValueError(f"peak_timing: window must be >= 1, got {window}")
    if int(distance) < 1:
        raise ValueError(f"peak_timing: distance must be >= 1, got {distance}")
    o, s, squeeze = _prepare(obs, sim)
    out = np.array([_peak_timing_1d(o[b], s[b], int(window), int(distance), prominence) for b in range(o.shape[0])])
    return _finish(out, squeeze)


#: All evaluation metrics by name (each called with its default arguments by
#: :func:`calculate_metrics`).
METRICS: dict[str, Metric] = {
    "nse": nse,
    "log_nse": log_nse,
    "kge": kge,
    "kge_2012": kge_2012,
    "rmse": rmse,
    "pbias": pbias,
    "pearson_r": pearson_r,
    "alpha": alpha,
    "beta": beta,
    "beta_nse": beta_nse,
    "fhv": fhv,
    "flv": flv,
    "fms": fms,
    "peak_timing": peak_timing,
}

# Other accepted names in calculate_metrics (results are reported under the name asked for).
_ALIASES: dict[str, str] = {"alpha_nse": "alpha", "r": "pearson_r", "kge2012": "kge_2012"}


def calculate_metrics(
    obs: Any, sim: Any, metrics: Sequence[str] | str | None = None
) -> dict[str, "float | np.ndarray"]:
    """Compute several metrics at once.

    Args:
        obs, sim: ``[time]`` or ``[basin, time]`` arrays (NaN = missing).
        metrics: names from :data:`METRICS` (or a single name); ``None`` for all.

    Returns:
        ``{name: value}`` with floats for ``[time]`` input, arrays ``[basin]`` otherwise.
    """
    if metrics is None:
        names: list[str] = list(METRICS)
    elif isinstance(metrics, str):
        names = [metrics]
    else:
        names = list(metrics)
    unknown = [n for n in names if n not in METRICS and n not in _ALIASES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    o, s, squeeze = _prepare(obs, sim)  # convert once and check shapes before any work
    if squeeze:
        o, s = o[0], s[0]
    return {n: METRICS[_ALIASES.get(n, n)](o, s) for n in names}


# --------------------------------------------------------------------------- losses


def _prepare_loss(sim: torch.Tensor, obs: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sim [basin, time]``, NaN-free ``obs`` (0 where missing) and the valid mask."""
    if not isinstance(sim, torch.Tensor) or not isinstance(obs, torch.Tensor):
        raise TypeError(f"{name}: sim and obs must be torch tensors")
    if sim.shape != obs.shape:
        raise ValueError(f"{name}: sim and obs must have the same shape, got {tuple(sim.shape)} and {tuple(obs.shape)}")
    if sim.ndim == 1:
        sim, obs = sim[None], obs[None]
    elif sim.ndim != 2:
        raise ValueError(f"{name}: expected [basin, time] tensors, got shape {tuple(sim.shape)}")
    obs = obs.to(device=sim.device, dtype=sim.dtype)
    valid = ~torch.isnan(obs)
    if not bool(valid.any()):
        raise ValueError(f"{name}: no valid (non-NaN) observation in any basin; cannot compute a loss")
    # Replace NaN before any arithmetic: NaN * 0 is NaN, and would poison gradients.
    obs0 = torch.where(valid, obs, torch.zeros_like(obs))
    return sim, obs0, valid


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with 0 (and a zero, not infinite, gradient) where ``x <= 0``."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _varies(obs0: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[basin] bool: at least two different valid observations (exact, as in the metrics)."""
    inf = torch.full_like(obs0, float("inf"))
    hi = torch.where(valid, obs0, -inf).amax(dim=-1)
    lo = torch.where(valid, obs0, inf).amin(dim=-1)
    return hi > lo


def nse_loss(
    sim: torch.Tensor,
    obs: torch.Tensor,
    basin_std: torch.Tensor | None = None,
    eps: float = 0.1,
) -> torch.Tensor:
    """Mean over basins of ``1 - NSE`` (differentiable), or the NSE* of Kratzert et al. (2019).

    Default (``basin_std=None``), per basin ``b`` over its valid steps:

    ``L_b = sum_t (s_t - o_t)^2 / sum_t (o_t - mean(o))^2 = 1 - NSE_b``

    and the loss is the mean of ``L_b`` over basins where NSE is defined (at
    least two different valid observations). Basins with only missing or
    constant observations contribute nothing.

    With ``basin_std`` (tensor ``[basin]``, std of each basin's discharge in
    mm/day, computed once on the *training period*):

    ``L_b = mean_t (s_t - o_t)^2 / (basin_std_b + eps)^2``

    averaged over basins with at least one valid step. The fixed per-basin scale
    avoids unstable denominators on short windows, and ``eps`` (mm/day) keeps
    nearly-dry basins from dominating.

    Args:
        sim: simulated discharge ``[basin, time]`` (or ``[time]``), mm/day; must be finite.
        obs: observed discharge, same shape; NaN = missing.
        basin_std: optional ``[basin]`` scales for NSE*.
        eps: NSE* stabiliser in mm/day (ignored without ``basin_std``).

    Raises:
        ValueError: no valid observation at all, or (default mode) no basin with a defined NSE.
    """
    sim, obs0, valid = _prepare_loss(sim, obs, "nse_loss")
    zero = torch.zeros_like(sim)
    err2 = torch.where(valid, (sim - obs0) ** 2, zero)
    n = valid.sum(dim=-1)
    if basin_std is not None:
        std = torch.as_tensor(basin_std, dtype=sim.dtype, device=sim.device).reshape(-1)
        if std.numel() != sim.shape[0]:
            raise ValueError(f"nse_loss: basin_std has {std.numel()} values for {sim.shape[0]} basins")
        has = n > 0
        per_basin = err2.sum(dim=-1) / n.clamp_min(1).to(sim.dtype) / (std + eps) ** 2
        return per_basin[has].mean()
    defined = _varies(obs0, valid)
    if not bool(defined.any()):
        raise ValueError(
            "nse_loss: NSE is undefined in every basin (each has fewer than 2 valid or only "
            "constant observations); use basin_std (NSE*) or mse_loss"
        )
    mean_o = obs0.sum(dim=-1, keepdim=True) / n.clamp_min(1).to(sim.dtype)[:, None]
    sst = torch.where(valid, (obs0 - mean_o) ** 2, zero).sum(dim=-1)
    return (err2.sum(dim=-1)[defined] / sst[defined]).mean()


def kge_loss(sim: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """Mean over basins of ``1 - KGE`` (Gupta et al. 2009), differentiable.

    Per basin over valid steps: ``1 - KGE = sqrt((r - 1)^2 + (alpha - 1)^2 + (beta - 1)^2)``,
    ``r = cov(o, s) / (sigma_o sigma_s)``, ``alpha = sigma_s / sigma_o``,
    ``beta = mu_s / mu_o`` (population statistics, as in :func:`kge`).
    Basins with missing or constant observations, or ``mu_o = 0``, contribute
    nothing. For a constant simulation ``r`` is taken as 0 (it is undefined) so
    the loss and its gradient stay finite; near that point the gradient of ``r``
    is large, as KGE itself is ill-conditioned there. At a perfect fit the
    gradient is 0 (not NaN).

    Args:
        sim: simulated discharge ``[basin, time]`` (or ``[time]``), mm/day; must be finite.
        obs: observed discharge, same shape; NaN = missing.

    Raises:
        ValueError: no valid observation at all, or no basin with a defined KGE.
    """
    sim, obs0, valid = _prepare_loss(sim, obs, "kge_loss")
    zero = torch.zeros_like(sim)
    n = valid.sum(dim=-1).clamp_min(1).to(sim.dtype)
    sim0 = torch.where(valid, sim, zero)
    mu_o = obs0.sum(dim=-1) / n
    mu_s = sim0.sum(dim=-1) / n
    do = torch.where(valid, obs0 - mu_o[:, None], zero)
    ds = torch.where(valid, sim - mu_s[:, None], zero)
    var_o = (do * do).sum(dim=-1) / n
    var_s = (ds * ds).sum(dim=-1) / n
    cov = (do * ds).sum(dim=-1) / n
    defined = _varies(obs0, valid) & (mu_o != 0)
    if not bool(defined.any()):
        raise ValueError(
            "kge_loss: KGE is undefined in every basin (fewer than 2 valid or constant "
            "observations, or zero observed mean)"
        )
    one = torch.ones_like(mu_o)
    # Substitute harmless values in undefined basins so no inf/NaN is ever formed.
    sig_o = torch.sqrt(torch.where(defined, var_o, one))
    mu_o_safe = torch.where(defined, mu_o, one)
    sig_s = _safe_sqrt(var_s)
    has_var = sig_s > 0
    r = torch.where(has_var, cov / (sig_o * torch.where(has_var, sig_s, one)), torch.zeros_like(cov))
    a = sig_s / sig_o
    b = mu_s / mu_o_safe
    ed = _safe_sqrt((r - 1) ** 2 + (a - 1) ** 2 + (b - 1) ** 2)
    return ed[defined].mean()


def mse_loss(sim: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """Masked mean squared error ``sum_valid (s - o)^2 / n_valid`` over all basins and steps, (mm/day)^2.

    Raises:
        ValueError: no valid observation at all.
    """
    sim, obs0, valid = _prepare_loss(sim, obs, "mse_loss")
    err2 = torch.where(valid, (sim - obs0) ** 2, torch.zeros_like(sim))
    return err2.sum() / valid.sum().to(sim.dtype)


#: Training losses by name.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "nse": nse_loss,
    "kge": kge_loss,
    "mse": mse_loss,
}
