"""Regional training: one model for many basins, parameters learned from catchment attributes.

Differentiable parameter learning (dPL; Tsai et al. 2021, Feng et al. 2022): a network
:class:`AttributeParameters` maps the normalised static attributes of every basin to
the physical parameters of a process model, each within its bounds. The network is
trained end to end through the ODE solver (adjoint / checkpointed sensitivities)
against the observed discharge of many basins at once, so a basin it has never seen
gets parameters from its attributes alone (prediction in ungauged basins, PUB).
Selected parameters may vary in time (``dynamic_parameters``, after Feng et al. 2022):
their daily value comes from a second network of the attributes and the trailing means
of recent forcing, and reaches the solver as a piecewise-constant daily series.

Entry points:

* :func:`train_regional` -- mini-batches of basins x time windows, a warm-up that is
  simulated but not scored, NSE* / KGE / MSE losses that ignore missing observations,
  Adam, seeded and reproducible, early stopping on a validation period, atomic
  checkpoints, a run folder with per-basin metrics; data-parallel across processes
  when :mod:`torch.distributed` is initialised (:mod:`adjointhydro.distributed`).
* :func:`evaluate_regional` -- per-basin metrics for named periods.
* :func:`cross_validate_basins` -- k-fold cross-validation over basins (PUB), with
  temporal splits inside each fold.
* :func:`regional_hybrid` -- EXP-HYDRO M50 whose networks also read the attributes
  (passed as constant forcing variables ``attr_<name>``).
* :func:`metric_summary`, :func:`plot_metric_cdf` -- distribution of per-basin metrics.

Loss ``"nse"`` is the NSE* of Kratzert et al. (2019): per basin ``b`` over its scored,
non-missing steps, ``mean_t (s_t - o_t)^2 / (sigma_b + eps)^2`` with ``sigma_b`` the std
of the basin's observed discharge over the whole training period (fixed, so short
windows do not give unstable denominators) and ``eps = 0.1`` mm/day; the batch loss is
the mean over basins with at least one scored observation. ``"kge"``: ``1 - KGE`` per
basin and window; ``"mse"``: mean squared error per basin, (mm/day)^2.

References: Tsai et al. (2021) Nat. Commun. 12, 5988; Feng et al. (2022) WRR 58,
e2022WR032404; Kratzert et al. (2019) HESS 23, 5089-5110.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time as _time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed as _dist
from .data import BasinDataset
from .fluxes import NeuralFlux
from .forcing import Forcing
from .metrics import calculate_metrics
from .model import Model
from .models import exphydro
from .training import _as_mask as _time_mask
from .training import _atomic_save  # one atomic checkpoint writer for the package
from ._io import atomic_path, atomic_write_text
from ._io import jsonable as _json_safe
from .solve import solve

__all__ = [
    "AttributeParameters",
    "RegionalResult",
    "CrossValidationResult",
    "train_regional",
    "evaluate_regional",
    "cross_validate_basins",
    "regional_hybrid",
    "attribute_forcing",
    "trailing_mean",
    "write_dynamic_parameters",
    "metric_summary",
    "plot_metric_cdf",
    "r_squared",
    "REGIONAL_LOSSES",
    "ATTRIBUTE_PREFIX",
]

#: Loss names accepted by :func:`train_regional`.
REGIONAL_LOSSES = ("nse", "kge", "mse")
#: Forcing variables named ``attr_<attribute>`` carry (normalised) static attributes.
ATTRIBUTE_PREFIX = "attr_"
#: Metrics reported per basin by default.
DEFAULT_METRICS = ("nse", "kge", "rmse", "pbias")


# ----------------------------------------------------------------- the network
def _parameter_mlp(n_in: int, hidden: Sequence[int], activation, dropout: float, bias: torch.Tensor,
                   dtype: torch.dtype) -> nn.Sequential:
    """MLP whose last layer starts at zero weights and ``bias`` (logits of the starting
    parameter values), so an untrained network gives the same values for every basin."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, int(h)), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(float(dropout)))
        width = int(h)
    with warnings.catch_warnings():  # every parameter fixed or dynamic: an empty (unused) layer
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        last = nn.Linear(width, len(bias))
    layers.append(last)
    net = nn.Sequential(*layers).to(dtype)  # before the bias is set: no rounding through float32
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias)
    return net


class AttributeParameters(nn.Module):
    """MLP from static catchment attributes ``[B, A]`` to physical parameters ``[B, P]``.

    ``p = low + (high - low) * sigmoid(MLP((a - mean) / std))`` for each of the model's
    parameters, so every output lies within its :class:`~adjointhydro.model.Parameter`
    bounds. The normalisation (``mean``, ``std`` per attribute) is fitted on the training
    basins (:meth:`fit_normalisation`) and saved with the weights. The last layer starts
    at zero weights and a bias that gives each parameter's default value, so the
    untrained network is the default-parameter model.

    **Dynamic parameters** (``dynamic``; dPL with time-varying parameters after Feng et
    al. 2022): the value of such a parameter on day ``t`` is
    ``low + (high - low) * sigmoid(MLP_dyn([(a - mean) / std, (m_t - mu) / sd]))`` where
    ``m_t`` are the trailing means of the ``dynamic_inputs`` forcing variables over the
    ``lookback`` days up to and including day ``t`` (causal: no later day enters; fewer
    days at the start of a record) and ``mu``, ``sd`` their normalisation, fitted with the
    attributes. A second network (``MLP_dyn``, ``dynamic_hidden`` layers) gives the
    dynamic parameters; like the first it starts at their default values, constant in
    time. :meth:`dynamic_series` gives the daily values ``[basin, day, D]``, which
    :func:`~adjointhydro.solve.solve` takes as ``dynamic_parameters`` (piecewise constant
    over each day, like forcing). :meth:`forward` still returns every parameter, the
    dynamic ones at mean recent forcing (normalised summaries zero): a typical value.

    Args:
        model: the process model whose parameters are learned.
        attribute_names: the attributes the network reads, in column order.
        hidden: widths of the hidden layers.
        activation: hidden activation.
        dropout: dropout probability after each hidden layer (0 = none).
        fixed: parameters held at a value instead of learned (name -> physical value).
        bounds: narrower bounds for some parameters (name -> (low, high)), within the
            model's; e.g. to keep fixed-step solvers stable (``Qmax * f`` below 2/day for
            one-day Euler steps) or to encode prior knowledge.
        start: initial output: ``"default"`` (each parameter's default, clipped into
            ``bounds``) or ``"middle"`` (the middle of each range).
        dtype: floating type of the weights (float64 by default, like the solver).
        dynamic: parameters that vary in time (names; default none: all static).
        dynamic_inputs: forcing variables whose recent means drive them (default: the
            model's forcing variables, e.g. ``P``, ``T``, ``PET``; any variable of the
            data may be named; ignored without ``dynamic``).
        lookback: days of the trailing means (>= 1; 1 = the day's own forcing).
        dynamic_hidden: hidden layers of the dynamic network (default ``hidden``).
    """

    def __init__(
        self,
        model: Model,
        attribute_names: Sequence[str],
        hidden: Sequence[int] = (32, 32),
        activation: type[nn.Module] = nn.Tanh,
        dropout: float = 0.0,
        fixed: Mapping[str, float] | None = None,
        bounds: Mapping[str, tuple[float, float]] | None = None,
        start: str = "default",
        dtype: torch.dtype = torch.float64,
        dynamic: Sequence[str] = (),
        dynamic_inputs: Sequence[str] | None = None,
        lookback: int = 30,
        dynamic_hidden: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        names = [str(a) for a in attribute_names]
        if not names:
            raise ValueError("AttributeParameters needs at least one attribute")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate attribute names {names}")
        if not model.parameter_names:
            raise ValueError(f"model {model.name!r} has no physical parameters to learn")
        self.attribute_names = tuple(names)
        self.parameter_names = tuple(model.parameter_names)
        fixed = dict(fixed or {})
        unknown = set(fixed) - set(self.parameter_names)
        if unknown:
            raise ValueError(f"fixed parameters {sorted(unknown)} are not parameters of {model.name!r}: "
                             f"{list(self.parameter_names)}")
        self.fixed_names = tuple(n for n in self.parameter_names if n in fixed)
        low = model.param_low.to(dtype).clone()
        high = model.param_high.to(dtype).clone()
        for n, (lo, hi) in dict(bounds or {}).items():
            if n not in self.parameter_names:
                raise ValueError(f"bounds given for {n!r}, which is not a parameter of {model.name!r}: "
                                 f"{list(self.parameter_names)}")
            j = self.parameter_names.index(n)
            if not float(low[j]) <= float(lo) < float(hi) <= float(high[j]):
                raise ValueError(f"bounds of {n} ({lo}, {hi}) must be increasing and within the model's "
                                 f"[{float(low[j])}, {float(high[j])}]")
            low[j], high[j] = float(lo), float(hi)
        if start not in ("default", "middle"):
            raise ValueError(f"start must be 'default' or 'middle', got {start!r}")
        dyn, dyn_inputs, lookback = _check_dynamic(model, self.parameter_names, fixed, dynamic, dynamic_inputs,
                                                   lookback)
        self.dynamic_names = dyn
        self.dynamic_inputs = dyn_inputs
        self.lookback = lookback
        self.register_buffer("low", low.clone())
        self.register_buffer("high", high.clone())
        self.register_buffer("attr_mean", torch.zeros(len(names), dtype=dtype))
        self.register_buffer("attr_std", torch.ones(len(names), dtype=dtype))
        learned = [j for j, n in enumerate(self.parameter_names) if n not in fixed and n not in dyn]
        self.register_buffer("learned_index", torch.tensor(learned, dtype=torch.long))
        fixed_values = model.physical_parameters().detach()[0].to(dtype).clone()
        if start == "middle":
            fixed_values = 0.5 * (low + high)
        fixed_values = torch.minimum(torch.maximum(fixed_values, low), high)
        for n, v in fixed.items():
            j = self.parameter_names.index(n)
            if not float(low[j]) <= float(v) <= float(high[j]):
                raise ValueError(f"fixed {n} = {v} is outside its bounds [{float(low[j])}, {float(high[j])}]")
            fixed_values[j] = float(v)
        self.register_buffer("fixed_values", fixed_values)
        u = ((fixed_values - low) / (high - low)).clamp(1e-3, 1 - 1e-3)
        self.net = _parameter_mlp(len(names), hidden, activation, dropout, (torch.log(u) - torch.log1p(-u))[learned],
                                  dtype)
        if dyn:
            # built (and its buffers registered) only when used: a static network keeps
            # its state_dict, its random draws and so its results unchanged
            jd = [self.parameter_names.index(n) for n in dyn]
            self.register_buffer("dynamic_index", torch.tensor(jd, dtype=torch.long))
            self.register_buffer("summary_mean", torch.zeros(len(dyn_inputs), dtype=dtype))
            self.register_buffer("summary_std", torch.ones(len(dyn_inputs), dtype=dtype))
            self.dynamic_net = _parameter_mlp(
                len(names) + len(dyn_inputs), hidden if dynamic_hidden is None else dynamic_hidden, activation,
                dropout, (torch.log(u) - torch.log1p(-u))[jd], dtype,
            )

    @property
    def n_attributes(self) -> int:
        return len(self.attribute_names)

    @property
    def is_dynamic(self) -> bool:
        """Whether some parameters vary in time."""
        return bool(self.dynamic_names)

    def fit_normalisation(
        self, attributes: np.ndarray | torch.Tensor, basins: Sequence[str] | None = None,
        summaries: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Set the per-attribute mean and std from the (training) basins' attributes ``[B, A]``.

        ``summaries``: for a network with dynamic parameters, the trailing means
        ``[B, T, K]`` of the training basins (:meth:`forcing_summaries`), whose mean and
        std over basins and days normalise the dynamic network's forcing inputs
        (left unchanged when ``None``).

        Raises:
            ValueError: NaN attributes (naming basins and attributes), summaries of the wrong shape.
        """
        a = _check_attributes(attributes, self.attribute_names, basins)
        mean = a.mean(axis=0)
        std = a.std(axis=0)
        std = np.where(std > 0, std, 1.0)  # a constant attribute carries no information
        with torch.no_grad():
            self.attr_mean.copy_(torch.as_tensor(mean, dtype=self.attr_mean.dtype))
            self.attr_std.copy_(torch.as_tensor(std, dtype=self.attr_std.dtype))
        if summaries is not None and self.is_dynamic:
            m = torch.as_tensor(summaries, dtype=self.summary_mean.dtype).detach()
            if m.ndim != 3 or m.shape[-1] != len(self.dynamic_inputs):
                raise ValueError(f"summaries must have shape [basin, time, {len(self.dynamic_inputs)}] "
                                 f"({list(self.dynamic_inputs)}), got {tuple(m.shape)}")
            flat = m.reshape(-1, m.shape[-1])
            sd = flat.std(dim=0, unbiased=False)
            with torch.no_grad():
                self.summary_mean.copy_(flat.mean(dim=0))
                self.summary_std.copy_(torch.where(sd > 0, sd, torch.ones_like(sd)))

    def forcing_summaries(self, forcing: Forcing) -> torch.Tensor:
        """Trailing means ``[B, T, K]`` of the ``dynamic_inputs`` over ``lookback`` days (causal),
        in the forcing's units (:func:`trailing_mean`).

        Raises:
            ValueError: a dynamic input the forcing lacks (naming it and the forcing's variables).
        """
        if not self.is_dynamic:
            raise ValueError("this network has no dynamic parameters")
        _require_dynamic_inputs(self.dynamic_inputs, forcing.names, forcing.source)
        x = forcing.values[..., [forcing.index(n) for n in self.dynamic_inputs]]
        return trailing_mean(x.to(self.summary_mean.dtype), self.lookback)

    def normalise(self, attributes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(a - mean) / std`` as a tensor of the network's dtype."""
        a = torch.as_tensor(attributes, dtype=self.attr_mean.dtype, device=self.attr_mean.device)
        if a.ndim != 2 or a.shape[1] != self.n_attributes:
            raise ValueError(f"attributes must have shape [basin, {self.n_attributes}] "
                             f"({list(self.attribute_names)}), got {tuple(a.shape)}")
        return (a - self.attr_mean) / self.attr_std

    def forward(self, attributes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Physical parameters ``[B, P]`` (within bounds) from raw attributes ``[B, A]``.

        Dynamic parameters are given at mean recent forcing (normalised summaries zero).
        """
        x = self.normalise(attributes)
        u = torch.sigmoid(self.net(x))
        out = self.fixed_values.expand(x.shape[0], -1).clone()
        j = self.learned_index
        out[:, j] = self.low[j] + (self.high[j] - self.low[j]) * u
        if self.is_dynamic:
            z = torch.zeros(x.shape[0], len(self.dynamic_inputs), dtype=x.dtype, device=x.device)
            jd = self.dynamic_index
            ud = torch.sigmoid(self.dynamic_net(torch.cat([x, z], dim=-1)))
            out[:, jd] = self.low[jd] + (self.high[jd] - self.low[jd]) * ud
        return out

    def dynamic_series(self, attributes: torch.Tensor | np.ndarray, summaries: torch.Tensor) -> torch.Tensor:
        """Daily values ``[B, T, D]`` of the dynamic parameters (``dynamic_names`` order, within bounds)
        from raw attributes ``[B, A]`` and raw trailing means ``[B, T, K]`` (:meth:`forcing_summaries`)."""
        if not self.is_dynamic:
            raise ValueError("this network has no dynamic parameters")
        x = self.normalise(attributes)
        m = torch.as_tensor(summaries, dtype=x.dtype, device=x.device)
        if m.ndim != 3 or m.shape[0] != x.shape[0] or m.shape[2] != len(self.dynamic_inputs):
            raise ValueError(f"summaries must have shape [{x.shape[0]}, time, {len(self.dynamic_inputs)}] "
                             f"({list(self.dynamic_inputs)}), got {tuple(m.shape)}")
        z = (m - self.summary_mean) / self.summary_std
        inp = torch.cat([x[:, None, :].expand(-1, m.shape[1], -1), z], dim=-1)
        jd = self.dynamic_index
        return self.low[jd] + (self.high[jd] - self.low[jd]) * torch.sigmoid(self.dynamic_net(inp))


def trailing_mean(values: torch.Tensor, lookback: int) -> torch.Tensor:
    """Causal trailing mean over time of ``values`` ``[B, T, K]``: day ``t`` averages days
    ``max(0, t - lookback + 1) .. t`` (fewer days at the start of the record), so no later
    day enters. Computed from a float64 cumulative sum (exact enough for decades of days)."""
    L = int(lookback)
    if L < 1:
        raise ValueError(f"lookback must be at least 1 day, got {lookback}")
    x = torch.as_tensor(values)
    c = torch.cumsum(x.to(torch.float64), dim=1)
    c = torch.cat([torch.zeros_like(c[:, :1]), c], dim=1)  # c[:, t] = sum of days < t
    T = x.shape[1]
    hi = torch.arange(1, T + 1, device=x.device)
    lo = (hi - L).clamp(min=0)
    n = (hi - lo).to(torch.float64)
    return ((c[:, hi] - c[:, lo]) / n[None, :, None]).to(x.dtype)


def _check_dynamic(
    model: Model, parameter_names: Sequence[str], fixed: Mapping[str, float], dynamic: Sequence[str],
    dynamic_inputs: Sequence[str] | None, lookback: Any,
) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Validated dynamic parameter names (model order), inputs and lookback (clear errors)."""
    if isinstance(dynamic, str):
        dynamic = (dynamic,)
    dyn = [str(n) for n in dynamic]
    unknown = [n for n in dyn if n not in parameter_names]
    if unknown:
        raise ValueError(f"dynamic parameter(s) {unknown} are not parameters of {model.name!r}: "
                         f"{list(parameter_names)}")
    if len(set(dyn)) != len(dyn):
        raise ValueError(f"dynamic parameters named twice: {dyn}")
    both = [n for n in dyn if n in fixed]
    if both:
        raise ValueError(f"parameter(s) {both} cannot be both fixed and dynamic")
    if isinstance(lookback, bool) or not isinstance(lookback, (int, np.integer)) or int(lookback) < 1:
        raise ValueError(f"lookback (days of the trailing forcing means of dynamic parameters) must be a "
                         f"whole number >= 1, got {lookback!r}")
    if dynamic_inputs is None:
        inputs = [n for n in model.forcing_names if not n.startswith(ATTRIBUTE_PREFIX)]
    else:
        # (ignored without dynamic parameters, so a switch between the two needs one change)
        inputs = [dynamic_inputs] if isinstance(dynamic_inputs, str) else [str(n) for n in dynamic_inputs]
    if dyn and not inputs:
        raise ValueError("no dynamic inputs: name the forcing variables whose recent means drive the "
                         "dynamic parameters (dynamic_inputs, e.g. ['P', 'T', 'PET'])")
    if len(set(inputs)) != len(inputs):
        raise ValueError(f"dynamic inputs named twice: {inputs}")
    order = tuple(n for n in parameter_names if n in dyn)
    return order, (tuple(inputs) if order else ()), int(lookback)


def _check_attributes(
    attributes: np.ndarray | torch.Tensor, names: Sequence[str], basins: Sequence[str] | None = None
) -> np.ndarray:
    """Attributes as float64 ``[B, A]``; a clear error for a wrong shape or NaN values."""
    if isinstance(attributes, torch.Tensor):
        attributes = attributes.detach().cpu().numpy()
    a = np.asarray(attributes, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(names):
        raise ValueError(f"attributes must have shape [basin, {len(names)}] ({list(names)}), got {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        ids = list(basins) if basins is not None else [str(i) for i in range(a.shape[0])]
        listing = "; ".join(
            f"basin {ids[i]!r}: {', '.join(names[j] for j in np.nonzero(bad[i])[0])}"
            for i in np.nonzero(bad.any(axis=1))[0][:10]
        )
        raise ValueError(
            f"missing (NaN) or infinite attribute values in {int(bad.any(axis=1).sum())} basin(s): {listing}. "
            f"A parameter network needs every attribute of every basin: fill them (e.g. with a "
            f"regional mean) or leave those basins or attributes out."
        )
    return a


# ---------------------------------------------------------- hybrid with attributes
def attribute_forcing(forcing: Forcing, normalised: torch.Tensor | np.ndarray, names: Sequence[str]) -> Forcing:
    """``forcing`` plus one constant variable ``attr_<name>`` per attribute (values ``[B, A]``)."""
    a = torch.as_tensor(normalised, dtype=forcing.values.dtype)
    if a.shape != (forcing.n_basins, len(names)):
        raise ValueError(f"attributes must have shape [{forcing.n_basins}, {len(names)}], got {tuple(a.shape)}")
    extra = a[:, None, :].expand(-1, forcing.n_steps, -1)
    return Forcing(
        torch.cat([forcing.values, extra], dim=-1),
        forcing.names + tuple(ATTRIBUTE_PREFIX + n for n in names),
        forcing.units + ("-",) * len(names), forcing.dates, forcing.basins, forcing.interpolation,
        forcing.source, forcing.step,
    )


def regional_hybrid(
    attribute_names: Sequence[str],
    snow: bool = True,
    smoothing: float | None = 5.0,
    hidden: tuple[int, ...] = (16, 16),
    soil_scale: float = 1000.0,
    dtype: torch.dtype = torch.float64,
) -> Model:
    """EXP-HYDRO M50 whose ``et`` and ``Q`` networks also read static attributes.

    The attributes enter as constant forcing variables ``attr_<name>`` (already
    normalised: :func:`train_regional` adds them from the parameter network's
    normalisation), so the same network weights serve every basin and adapt to its
    attributes. The remaining physical parameters (``Smax`` for the initial state,
    the snow parameters) come from an :class:`AttributeParameters` network.
    """
    base = exphydro(snow=snow, smoothing=smoothing)
    attr = [ATTRIBUTE_PREFIX + str(n) for n in attribute_names]
    if not attr:
        raise ValueError("regional_hybrid needs at least one attribute")
    model = Model(
        copy.deepcopy(list(base.stores)), copy.deepcopy(list(base.flux_modules)),
        forcing=tuple(base.forcing_names) + tuple(attr), parameters=base.parameters_spec,
        discharge=base.discharge_fluxes, name=base.name,
    )
    et_inputs = (["snow", "soil", "T", "PET"] if snow else ["soil", "PET"]) + attr
    loc = {"soil": soil_scale / 2, "snow": 50.0, "T": 10.0, "PET": 2.0, "P": 3.0}
    scale = {"soil": soil_scale / 2, "snow": 50.0, "T": 10.0, "PET": 2.0, "P": 5.0}
    model = model.replace_flux(
        NeuralFlux("et", et_inputs, hidden=hidden, input_loc=loc, input_scale=scale,
                   output_scale=1.5, limit_by="soil", limit_scale=1.0)
    ).replace_flux(
        NeuralFlux("Q", ["soil", "P"] + attr, hidden=hidden, input_loc=loc, input_scale=scale,
                   output_scale=1.0, limit_by="soil", limit_scale=1.0)
    )
    model.name = "EXP-HYDRO M50 with attributes" + ("" if snow else " (no snow)")
    return model.to(dtype)


def _attribute_inputs(model: Model) -> list[str]:
    return [n[len(ATTRIBUTE_PREFIX):] for n in model.forcing_names if n.startswith(ATTRIBUTE_PREFIX)]


# --------------------------------------------------------------------- input data
@dataclass
class _Data:
    forcing: Forcing  # the model's physical forcing variables only
    observed: np.ndarray  # [B, T]
    attributes: np.ndarray  # [B, A] in network order
    attribute_names: tuple[str, ...]
    # trailing means [B, T, K] of the dynamic inputs over the whole record (None: static
    # network); windows slice them, so each window sees the forcing before its start
    summaries: torch.Tensor | None = None

    @property
    def basins(self) -> tuple[str, ...]:
        return self.forcing.basins

    def subset(self, idx: Sequence[int]) -> "_Data":
        idx = list(idx)
        return _Data(self.forcing.select(idx), self.observed[idx], self.attributes[idx], self.attribute_names,
                     None if self.summaries is None else self.summaries[idx])


def _as_data(
    model: Model, data: BasinDataset | Forcing, observed: Any, attributes: Any,
    attribute_names: Sequence[str] | None, observation: str = "Q", network: AttributeParameters | None = None,
) -> _Data:
    """Validate and unpack the data (before any solve); with a dynamic ``network``, also the
    trailing means of its dynamic inputs (raw units)."""
    fnames = [n for n in model.forcing_names if not n.startswith(ATTRIBUTE_PREFIX)]
    if isinstance(data, BasinDataset):
        if observed is None:
            observed = data.observed(observation)
        names = list(attribute_names) if attribute_names is not None else list(data.attribute_names)
        missing = [n for n in names if n not in data.attribute_names]
        if missing:
            raise ValueError(f"{data.source}: attribute(s) {missing} not in the data; available: {data.attribute_names}")
        if attributes is None:
            attributes = np.stack([data.attribute(n) for n in names], axis=1) if names else None
        forcing = data.to_forcing(fnames)
    elif isinstance(data, Forcing):
        missing = [n for n in fnames if n not in data.names]
        if missing:
            raise ValueError(f"{data.source}: model {model.name!r} needs forcing {fnames}, missing {missing}")
        forcing = data.select(steps=None) if list(data.names) == fnames else Forcing(
            data.values[..., [data.index(n) for n in fnames]], tuple(fnames),
            tuple(data.units[data.index(n)] for n in fnames), data.dates, data.basins, data.interpolation,
            data.source, data.step,
        )
        if observed is None:
            raise ValueError("observed discharge [basin, time] is needed with a Forcing")
        if attributes is None or attribute_names is None:
            raise ValueError("attributes [basin, attribute] and attribute_names are needed with a Forcing")
        names = list(attribute_names)
    else:
        raise TypeError(f"data must be a BasinDataset or a Forcing, got {type(data).__name__}")
    B, T = forcing.n_basins, forcing.n_steps
    if isinstance(observed, torch.Tensor):
        observed = observed.detach().cpu().numpy()
    o = np.asarray(observed, dtype=np.float64)
    if o.ndim == 3 and o.shape[2] == 1:
        o = o[:, :, 0]
    if o.shape != (B, T):
        raise ValueError(f"{forcing.source}: observed has shape {o.shape} but the forcing is [basin={B}, time={T}]")
    if np.isinf(o).any():
        b, t = np.argwhere(np.isinf(o))[0]
        raise ValueError(f"{forcing.source}: infinite observed discharge for basin {forcing.basins[b]!r} at "
                         f"{forcing.date_str(int(t))}; use NaN for missing values")
    if not names:
        raise ValueError(f"{forcing.source}: no attributes to learn parameters from")
    a = _check_attributes(attributes, names, forcing.basins)
    summaries = _forcing_summaries(network, data) if network is not None and network.is_dynamic else None
    return _Data(forcing, o, a, tuple(names), summaries)


def _require_dynamic_inputs(inputs: Sequence[str], have: Sequence[str], source: str) -> None:
    """Raise, naming the data source and its variables, if a dynamic input is not in the forcing."""
    missing = [n for n in inputs if n not in have]
    if missing:
        raise ValueError(f"{source}: dynamic input(s) {missing} not in the forcing; available: {list(have)}")


def _forcing_summaries(network: AttributeParameters, data: BasinDataset | Forcing) -> torch.Tensor:
    """Trailing means ``[B, T, K]`` of the network's dynamic inputs, read from ``data``
    (any of its forcing variables, not only the model's)."""
    inputs = list(network.dynamic_inputs)
    _require_dynamic_inputs(inputs, data.forcing_names if isinstance(data, BasinDataset) else data.names,
                            data.source)
    src = data.to_forcing(inputs) if isinstance(data, BasinDataset) else data
    return network.forcing_summaries(src)


def _as_mask(mask: Any, T: int, what: str) -> np.ndarray:
    """:func:`training._as_mask` (bool ``[time]``, None = all), and not empty."""
    m = _time_mask(mask, T, what)
    if not m.any():
        raise ValueError(f"{what} selects no time step")
    return m


def _period_str(forcing: Forcing, mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)
    return f"{forcing.date_str(int(idx[0]))}..{forcing.date_str(int(idx[-1]))}"


def _check_scored(d: _Data, mask: np.ndarray, what: str, loss: str) -> None:
    """Every basin needs enough non-missing observations in the period (named error otherwise)."""
    scored = np.where(mask[None], d.observed, np.nan)
    n = (~np.isnan(scored)).sum(axis=1)
    need = 1 if loss == "mse" else 2
    bad = np.nonzero(n < need)[0]
    if bad.size:
        listing = ", ".join(f"{d.basins[i]!r} ({n[i]})" for i in bad[:10])
        raise ValueError(
            f"{len(bad)} basin(s) have fewer than {need} non-missing observations in the {what} period "
            f"{_period_str(d.forcing, mask)}: {listing}. Leave them out of training or choose another period."
        )
    if loss in ("nse", "kge"):
        with np.errstate(invalid="ignore"):
            const = np.nanmax(scored, axis=1) == np.nanmin(scored, axis=1)
        if const.any():
            i = int(np.nonzero(const)[0][0])
            raise ValueError(f"basin {d.basins[i]!r}: observed discharge is constant in the {what} period "
                             f"{_period_str(d.forcing, mask)}; {loss} is undefined there")


# ------------------------------------------------------------------------ losses
def _basin_losses(sim: torch.Tensor, obs: torch.Tensor, loss: str, scale: torch.Tensor | None,
                  eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-basin losses ``[B]`` and a bool ``[B]`` of basins with a defined loss (NaN obs = not scored)."""
    valid = ~torch.isnan(obs)
    o = torch.where(valid, obs, torch.zeros_like(obs))
    zero = torch.zeros_like(sim)
    n = valid.sum(-1)
    nf = n.clamp_min(1).to(sim.dtype)
    if loss in ("nse", "mse"):
        err2 = torch.where(valid, (sim - o) ** 2, zero).sum(-1) / nf
        if loss == "mse":
            return err2, n > 0
        return err2 / (scale + eps) ** 2, n > 0
    # kge
    s0 = torch.where(valid, sim, zero)
    mu_o, mu_s = o.sum(-1) / nf, s0.sum(-1) / nf
    do = torch.where(valid, o - mu_o[:, None], zero)
    ds = torch.where(valid, sim - mu_s[:, None], zero)
    var_o, var_s, cov = (do * do).sum(-1) / nf, (ds * ds).sum(-1) / nf, (do * ds).sum(-1) / nf
    defined = (n > 1) & (var_o > 0) & (mu_o != 0)
    one = torch.ones_like(mu_o)
    sig_o = torch.sqrt(torch.where(defined, var_o, one))
    pos = var_s > 0
    sig_s = torch.where(pos, torch.sqrt(torch.where(pos, var_s, one)), torch.zeros_like(var_s))
    r = torch.where(pos, cov / (sig_o * torch.where(pos, sig_s, one)), torch.zeros_like(cov))
    e = (r - 1) ** 2 + (sig_s / sig_o - 1) ** 2 + (mu_s / torch.where(defined, mu_o, one) - 1) ** 2
    ep = e > 0
    ed = torch.where(ep, torch.sqrt(torch.where(ep, e, one)), torch.zeros_like(e))
    return torch.where(defined, ed, torch.zeros_like(ed)), defined


# ------------------------------------------------------------------ simulation
def _simulate(
    model: Model, network: AttributeParameters, d: _Data, steps: slice | None, *,
    method: str, rtol: float, atol: float, sensitivity: Any, basins: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Discharge ``[b, t]`` of the chosen basins over ``steps``, parameters from the network
    (solved as ``dtype``; default :func:`~adjointhydro.solve.solve`'s)."""
    idx = list(range(len(d.basins))) if basins is None else list(basins)
    f = d.forcing.select(idx, steps)
    params = network(d.attributes[idx])
    extra = _attribute_inputs(model)
    if extra:
        norm = network.normalise(d.attributes[idx])
        cols = [network.attribute_names.index(n) for n in extra]
        f = attribute_forcing(f, norm[:, cols].detach(), extra)
    dyn = None
    if network.is_dynamic:
        series = _dynamic_series(network, d, idx, steps)
        dyn = dict(zip(network.dynamic_names, series.unbind(-1)))
    sol = solve(model, f, parameters=params, dynamic_parameters=dyn, method=method, rtol=rtol, atol=atol,
                sensitivity=sensitivity, dtype=dtype)
    return sol.discharge


def _dynamic_series(network: AttributeParameters, d: _Data, idx: Sequence[int], steps: slice | None) -> torch.Tensor:
    """Daily dynamic parameters ``[b, t, D]`` of basins ``idx`` over ``steps`` (differentiable)."""
    if d.summaries is None:
        raise ValueError("the network has dynamic parameters but the data carries no forcing summaries")
    m = d.summaries[list(idx)]
    if steps is not None:
        m = m[:, steps]
    return network.dynamic_series(d.attributes[list(idx)], m)


def write_dynamic_parameters(
    path: str | os.PathLike, series: Mapping[str, np.ndarray], basins: Sequence[str], dates: np.ndarray | None = None,
) -> Path:
    """Write daily dynamic parameters (name -> ``[basin, T]``, the parameter's units) as a
    compressed ``.npz`` with ``basins`` and, where known, ``dates`` (ISO strings); atomically.
    Read back with ``numpy.load(path)``."""
    arrays = {str(n): np.asarray(v, dtype=np.float64) for n, v in series.items()}
    arrays["basins"] = np.array([str(b) for b in basins], dtype=str)
    if dates is not None:
        arrays["dates"] = np.asarray(dates).astype("datetime64[D]").astype(str)
    path = Path(path)
    _atomic_npz(arrays, path)
    return path


def _atomic_npz(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: savez would append ".npz" to a name
            np.savez_compressed(fh, **arrays)


def _write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (NaN as null), written atomically."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=1))


# ------------------------------------------------------------------- results
@dataclass
class RegionalResult:
    """Result of :func:`train_regional`.

    Attributes:
        history: one dict per epoch: ``epoch``, ``train_loss`` (mean of the epoch's
            mini-batch losses), ``val_loss`` (of the weights after the epoch; train loss
            if there is no validation period; NaN before the first validation with
            ``val_every > 1``), ``lr``, ``seconds`` (the epoch with its validation),
            ``train_seconds`` (its mini-batch steps only), ``batches``.
        best_epoch: epoch after which the validation loss was lowest; the network (and
            hybrid weights) hold that state on return.
        best_val_loss: that loss.
        stopped_early: patience ran out.
        metrics: basin -> period -> metric -> value for the training basins (NaN where
            undefined, e.g. no observation in the period).
        parameters: basin -> parameter name -> value learned for the training basins.
        seconds: wall time.
        out_dir: the run folder, if one was written.
        world_size: number of processes that trained (1 without torch.distributed).
        network: the trained :class:`AttributeParameters` (best state).
        dynamic_parameters: for dynamic parameters, basin -> parameter name -> daily values
            ``[T]`` over the whole record (in the parameter's units; ``parameters`` holds
            their value at mean recent forcing); empty for a static network.
        dates: the dates of the record (``None`` where the data has none).
    """

    history: list[dict]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    metrics: dict[str, dict[str, dict[str, float]]]
    parameters: dict[str, dict[str, float]]
    seconds: float
    out_dir: Path | None = None
    world_size: int = 1
    network: AttributeParameters | None = None
    dynamic_parameters: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    dates: np.ndarray | None = None

    def dynamic_series(self, name: str) -> np.ndarray:
        """Daily values ``[basin, T]`` of dynamic parameter ``name`` (basins in ``parameters`` order)."""
        if not self.dynamic_parameters:
            raise KeyError("no dynamic parameters in this result")
        first = next(iter(self.dynamic_parameters.values()))
        if name not in first:
            raise KeyError(f"{name!r} is not a dynamic parameter; dynamic: {list(first)}")
        return np.stack([v[name] for v in self.dynamic_parameters.values()])

    def summary(self, metric: str = "nse") -> dict[str, dict[str, float]]:
        """period -> distribution statistics of ``metric`` over basins (:func:`metric_summary`)."""
        return _summaries(self.metrics, metric)


def _summaries(metrics: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str) -> dict[str, dict[str, float]]:
    periods: dict[str, list[float]] = {}
    for per in metrics.values():
        for p, vals in per.items():
            periods.setdefault(p, []).append(vals.get(metric, float("nan")))
    return {p: metric_summary(v) for p, v in periods.items()}


def metric_summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Median, quartiles, mean, min, max and count of per-basin values (NaN left out; ``n_nan`` counts them)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    if ok.size == 0:
        nan = float("nan")
        return {"median": nan, "q25": nan, "q75": nan, "mean": nan, "min": nan, "max": nan, "n": 0,
                "n_nan": int(v.size)}
    return {
        "median": float(np.median(ok)), "q25": float(np.percentile(ok, 25)), "q75": float(np.percentile(ok, 75)),
        "mean": float(ok.mean()), "min": float(ok.min()), "max": float(ok.max()), "n": int(ok.size),
        "n_nan": int(v.size - ok.size),
    }


def r_squared(true: np.ndarray, estimate: np.ndarray) -> float:
    """Coefficient of determination ``1 - SSE/SST`` of ``estimate`` against ``true`` (1-D)."""
    t, e = np.asarray(true, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    sst = ((t - t.mean()) ** 2).sum()
    return float(1.0 - ((t - e) ** 2).sum() / sst) if sst > 0 else float("nan")


def plot_metric_cdf(
    metrics: Mapping[str, Any], metric: str = "nse", period: str | None = None,
    path: str | os.PathLike | None = None, lower: float = -1.0, title: str | None = None,
):
    """Empirical CDF of a per-basin metric (matplotlib, Agg backend).

    Args:
        metrics: either basin -> period -> metric -> value (as in :class:`RegionalResult`),
            plotted for every period (or only ``period``), or label -> array of values.
        metric: the metric to plot.
        lower: left end of the x axis (NSE values below it are drawn at the edge).
        path: where to save the figure (PNG); returned either way.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, np.ndarray] = {}
    first = next(iter(metrics.values()), None)
    if isinstance(first, Mapping):
        for per in metrics.values():
            for p, vals in per.items():
                if period is None or p == period:
                    curves.setdefault(p, []).append(vals.get(metric, float("nan")))  # type: ignore[attr-defined]
    else:
        curves = {k: v for k, v in metrics.items()}
    if not curves:
        raise ValueError(f"nothing to plot for metric {metric!r} and period {period!r}")
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, vals in curves.items():
        v = np.sort(np.asarray(vals, dtype=np.float64))
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        y = np.arange(1, v.size + 1) / v.size
        ax.step(np.maximum(v, lower), y, where="post", label=f"{label} (median {np.median(v):.2f}, n={v.size})")
    ax.set_xlabel(metric.upper())
    ax.set_ylabel("fraction of basins")
    ax.set_xlim(lower, 1.0 if metric in ("nse", "kge") else None)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


# ------------------------------------------------------------------ evaluation
def evaluate_regional(
    model: Model,
    network: AttributeParameters,
    data: BasinDataset | Forcing,
    observed: Any = None,
    attributes: Any = None,
    *,
    periods: Mapping[str, Any] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    batch_size: int = 256,
    return_dynamic: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], np.ndarray] | tuple[
        dict[str, dict[str, dict[str, float]]], np.ndarray, dict[str, np.ndarray]]:
    """Simulate every basin over the whole record and score it in each period.

    Args:
        model, network: the trained model and parameter network.
        data, observed, attributes: as in :func:`train_regional`; the network's
            attribute names are read from the data.
        periods: name -> bool mask ``[time]`` (default: the whole record as ``"all"``).
        metrics: names from :data:`adjointhydro.metrics.METRICS`.
        batch_size: basins per solve (bounds memory).
        return_dynamic: also return the daily dynamic parameters the simulation used.
        dtype: floating type of the solves (as in :func:`train_regional`).

    Returns:
        ``(metrics, discharge)``: basin -> period -> metric -> value (NaN where undefined,
        e.g. no observation in the period), and the simulated discharge ``[B, T]`` (mm/day);
        with ``return_dynamic``, a third item: dynamic parameter name -> daily values
        ``[B, T]`` (empty for a static network).
    """
    d = _as_data(model, data, observed, attributes, network.attribute_names, network=network)
    met, sim = _evaluate(model, network, d, periods, metrics, method, rtol, atol, batch_size, dtype)
    if return_dynamic:
        return met, sim, _dynamic_arrays(network, d)
    return met, sim


def _dynamic_arrays(network: AttributeParameters, d: _Data) -> dict[str, np.ndarray]:
    """name -> daily values ``[B, T]`` of every dynamic parameter over the whole record."""
    if not network.is_dynamic:
        return {}
    B = len(d.basins)
    with torch.no_grad():  # in blocks of basins: the network's activations are [b, T, hidden]
        v = np.concatenate([_dynamic_series(network, d, range(s, min(s + 64, B)), None).cpu().numpy()
                            for s in range(0, B, 64)])
    return {n: v[..., i].astype(np.float64) for i, n in enumerate(network.dynamic_names)}


def _evaluate(model, network, d: _Data, periods, metrics, method, rtol, atol, batch_size, dtype=None):
    T = d.forcing.n_steps
    periods = {"all": np.ones(T, dtype=bool)} if periods is None else {
        k: _as_mask(v, T, f"period {k!r}") for k, v in periods.items()
    }
    sims = []
    with torch.no_grad():
        for s in range(0, len(d.basins), int(batch_size)):
            idx = list(range(s, min(s + int(batch_size), len(d.basins))))
            sims.append(_simulate(model, network, d, None, method=method, rtol=rtol, atol=atol,
                                  sensitivity="direct", basins=idx, dtype=dtype).cpu().numpy())
    sim = np.concatenate(sims).astype(np.float64)
    out: dict[str, dict[str, dict[str, float]]] = {b: {} for b in d.basins}
    for name, m in periods.items():
        o = np.where(m[None], d.observed, np.nan)[:, m]
        res = calculate_metrics(o, sim[:, m], list(metrics))
        for i, b in enumerate(d.basins):
            out[b][name] = {k: float(np.asarray(v)[i]) for k, v in res.items()}
    return out, sim


# ------------------------------------------------------------------- training
def _windows(train_mask: np.ndarray, warmup: int, window: int | None) -> np.ndarray:
    """Candidate first scored steps of training windows."""
    T = len(train_mask)
    if window is None:
        return np.array([0])
    idx = np.flatnonzero(train_mask)
    ok = idx[(idx + window <= T)]
    full = ok[ok >= warmup]
    cand = full if full.size else ok
    if cand.size == 0:
        raise ValueError(f"no training window of {window} days fits in the record of {T} days with train_mask")
    return cand


def train_regional(
    model: Model,
    data: BasinDataset | Forcing,
    observed: Any = None,
    attributes: Any = None,
    *,
    attribute_names: Sequence[str] | None = None,
    network: AttributeParameters | None = None,
    hidden: Sequence[int] = (32, 32),
    fixed_parameters: Mapping[str, float] | None = None,
    parameter_bounds: Mapping[str, tuple[float, float]] | None = None,
    start: str = "default",
    dynamic_parameters: Sequence[str] = (),
    dynamic_inputs: Sequence[str] | None = None,
    dynamic_lookback: int = 30,
    train_mask: Any = None,
    val_mask: Any = None,
    eval_periods: Mapping[str, Any] | None = None,
    warmup: int = 365,
    window: int | None = 365,
    batch_size: int = 32,
    epochs: int = 50,
    lr: float = 1e-2,
    lr_schedule: str | None = None,
    loss: str = "nse",
    patience: int | None = 10,
    val_every: int = 1,
    seed: int = 0,
    sensitivity: Any = "checkpoint",
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    grad_clip: float | None = 1.0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    metrics: Sequence[str] = DEFAULT_METRICS,
    eval_batch_size: int = 256,
    final_metrics: bool = True,
    progress: bool = False,
    on_epoch: Callable[[int, dict], Any] | None = None,
    dtype: torch.dtype | None = None,
) -> RegionalResult:
    """Train a parameter network (and a hybrid's networks) on many basins at once.

    Each epoch shuffles the training basins into mini-batches of ``batch_size``; each
    mini-batch is simulated over one time window: ``warmup`` days (simulated from the
    model's initial state, not scored) followed by ``window`` scored days starting at a
    random day of ``train_mask`` (the same window for the batch, drawn from the seeded
    generator). ``window=None`` simulates the whole record and scores ``train_mask``.
    The loss (module docstring) ignores missing observations; one Adam step per batch.
    After each epoch the validation loss is computed on every training basin over the
    whole record, scored on ``val_mask`` (a temporal split; for held-out basins use
    :func:`cross_validate_basins`); early stopping after ``patience`` epochs without
    improvement, and the best state is restored at the end.

    Reproducible: with the same ``seed`` and inputs, two runs give identical histories
    (network initialisation, batch order and windows come from the seed).

    Under :mod:`torch.distributed` (see :mod:`adjointhydro.distributed`), each batch is
    split into contiguous shards, one per process; gradients are summed across
    processes with ``all_reduce`` so the step equals that of one process on the whole
    batch, and only rank 0 writes files.

    Run folder (``out_dir``): ``checkpoints/last.pt`` (network, model, optimizer, epoch,
    history, best state, RNG state; written atomically after every epoch),
    ``checkpoints/best.pt``, ``history.json``, ``metrics.json`` (basin -> period ->
    metric -> value, NaN as null), ``summary.json`` (period -> metric -> median,
    quartiles ...), ``parameters.csv`` (learned parameters per basin), ``config.json``,
    and with dynamic parameters ``dynamic_parameters.npz`` (name -> daily values
    ``[basin, T]``, ``basins``, ``dates``).
    ``resume=True`` continues from ``checkpoints/last.pt``.

    Args:
        model: the process model (e.g. :func:`~adjointhydro.models.exphydro`) or a hybrid
            (e.g. :func:`regional_hybrid`); its networks are trained too.
        data: a :class:`~adjointhydro.data.BasinDataset` (forcing, ``Q`` and attributes), or
            a :class:`~adjointhydro.forcing.Forcing` with ``observed`` ``[B, T]`` (mm/day,
            NaN = missing) and ``attributes`` ``[B, A]`` plus ``attribute_names``.
        attribute_names: attributes the network reads (default: all of the data set's).
        network: an :class:`AttributeParameters` to train (default: a new one with
            ``hidden`` layers, built after seeding torch with ``seed``); its attribute
            normalisation is fitted on the training basins.
        fixed_parameters: parameters not learned (name -> value).
        parameter_bounds, start: passed to a new :class:`AttributeParameters`.
        dynamic_parameters, dynamic_inputs, dynamic_lookback: parameters that vary in time,
            from the attributes and the trailing means of ``dynamic_inputs`` (forcing
            variables of ``data``; default the model's) over ``dynamic_lookback`` days:
            ``dynamic``, ``dynamic_inputs`` and ``lookback`` of a new
            :class:`AttributeParameters` (with ``network``, its own settings hold). Their
            learned daily values are in :attr:`RegionalResult.dynamic_parameters`.
        train_mask, val_mask: bool ``[T]`` scored steps for training and validation
            (``train_mask`` default: all steps after ``warmup``; ``val_mask`` None: early
            stopping on the training loss of the full record).
        eval_periods: name -> mask for the final metrics (default ``train`` and
            ``validation`` from the masks).
        warmup, window: days (see above).
        batch_size: basins per mini-batch (across all processes).
        epochs, lr, patience, grad_clip: Adam settings and early stopping (``patience``
            counts validations).
        lr_schedule: None (constant) or ``"cosine"`` (from ``lr`` to ``lr/20`` over ``epochs``).
        val_every: validate every this many epochs (and after the last); the history
            repeats the last validation loss in between.
        loss: ``"nse"`` (NSE*), ``"kge"`` or ``"mse"``.
        sensitivity, method, rtol, atol: passed to :func:`~adjointhydro.solve.solve`.
        metrics: metric names for ``metrics.json``.
        eval_batch_size: basins per solve in validation and evaluation.
        final_metrics: compute the per-basin metrics at the end (False: ``metrics`` is
            empty; for benchmarks).
        on_epoch: ``on_epoch(epoch, record)`` after each epoch.
        dtype: floating type of the solves (default: the model's networks', else float64).
            With ``torch.float32`` a physics model is solved in single precision too; the
            parameter network and the physical bounds stay float64 (give a hybrid's
            networks the same type: ``f.to(torch.float32)`` for each of
            ``model.neural_fluxes()``).

    Raises:
        ValueError: bad settings, missing or NaN attributes, basins with too few
            observations in the training or validation period -- all before training.
    """
    t_start = _time.perf_counter()
    if loss not in REGIONAL_LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {list(REGIONAL_LOSSES)}")
    if not isinstance(model, Model):
        raise TypeError(f"model must be an adjointhydro Model, got {type(model).__name__}")
    for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0)):
        if int(v) < lo:
            raise ValueError(f"{name} must be at least {lo}, got {v}")
    if window is not None and int(window) < 2:
        raise ValueError(f"window must be at least 2 days (or None), got {window}")
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience must be at least 1 (or None), got {patience}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if lr_schedule not in (None, "cosine"):
        raise ValueError(f"lr_schedule must be None or 'cosine', got {lr_schedule!r}")
    if int(val_every) < 1:
        raise ValueError(f"val_every must be at least 1, got {val_every}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")
    if network is not None and tuple(dynamic_parameters) and \
            tuple(n for n in network.parameter_names if n in dynamic_parameters) != network.dynamic_names:
        raise ValueError(f"dynamic_parameters {list(dynamic_parameters)} differ from the given network's "
                         f"{list(network.dynamic_names)}; set them on the network")
    names = network.attribute_names if network is not None else attribute_names
    d = _as_data(model, data, observed, attributes, names)
    T = d.forcing.n_steps
    if train_mask is None:
        train_mask = np.arange(T) >= min(int(warmup), T - 1)
    tm = _as_mask(train_mask, T, "train_mask")
    vm = _as_mask(val_mask, T, "val_mask") if val_mask is not None else None
    _check_scored(d, tm, "training", loss)
    if vm is not None:
        _check_scored(d, vm, "validation", loss)
    extra = _attribute_inputs(model)
    torch.manual_seed(int(seed))
    if network is None:
        network = AttributeParameters(model, d.attribute_names, hidden=hidden, fixed=fixed_parameters,
                                      bounds=parameter_bounds, start=start, dynamic=dynamic_parameters,
                                      dynamic_inputs=dynamic_inputs, lookback=dynamic_lookback)
    missing = [n for n in extra if n not in network.attribute_names]
    if missing:
        raise ValueError(f"model {model.name!r} reads attributes {missing} that the network does not have "
                         f"({list(network.attribute_names)})")
    if tuple(network.parameter_names) != tuple(model.parameter_names):
        raise ValueError(f"the network gives parameters {list(network.parameter_names)} but the model has "
                         f"{list(model.parameter_names)}")
    if network.is_dynamic:
        d.summaries = _forcing_summaries(network, data)
    network.fit_normalisation(d.attributes, d.basins, d.summaries)
    cand = _windows(tm, int(warmup), None if window is None else int(window))
    # per-basin scale of NSE*: std of the observations in the training period
    with np.errstate(invalid="ignore"):
        std = np.nanstd(np.where(tm[None], d.observed, np.nan), axis=1)
    scale_all = torch.as_tensor(np.nan_to_num(std, nan=0.0))
    weights = [p for f in model.neural_fluxes() for p in f.parameters()]
    trainable = list(network.parameters()) + weights
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=float(lr))
    rank, world = _dist.rank(), _dist.world_size()
    writer = rank == 0
    config = {
        "model": model.name, "attributes": list(network.attribute_names), "loss": loss, "lr": float(lr),
        "epochs": int(epochs), "batch_size": int(batch_size), "warmup": int(warmup),
        "window": None if window is None else int(window), "seed": int(seed), "method": method,
        "rtol": float(rtol), "atol": float(atol), "sensitivity": str(sensitivity),
        "grad_clip": None if grad_clip is None else float(grad_clip), "patience": patience,
        "lr_schedule": lr_schedule, "val_every": int(val_every),
        "basins": list(d.basins), "world_size": world,
    }
    if dtype is not None:  # only then: runs saved before the option still resume
        config["dtype"] = str(dtype).replace("torch.", "")
    if network.is_dynamic:  # only then: resuming a static run compares the same keys as before
        config.update({"dynamic_parameters": list(network.dynamic_names),
                       "dynamic_inputs": list(network.dynamic_inputs), "dynamic_lookback": network.lookback})
    out = Path(out_dir) if out_dir is not None else None
    ckdir = out / "checkpoints" if out is not None else None
    if out is not None and writer:
        ckdir.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", config)

    def state() -> dict:
        return {"network": copy.deepcopy(network.state_dict()), "model": copy.deepcopy(model.state_dict())}

    history: list[dict] = []
    best_val, best_epoch, bad, stopped, start_epoch = float("inf"), -1, 0, False, 0
    best_state = state()
    if resume and (ckdir / "last.pt").exists():
        ck = torch.load(ckdir / "last.pt", map_location="cpu", weights_only=False)
        differ = {k: (ck["config"].get(k), v) for k, v in config.items()
                  if k not in ("epochs", "world_size") and ck["config"].get(k) != v}
        if differ:
            raise ValueError(f"{ckdir / 'last.pt'} was written with other settings (checkpoint, now): {differ}")
        network.load_state_dict(ck["network"])
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        history, best_val, best_epoch = list(ck["history"]), float(ck["best_val"]), int(ck["best_epoch"])
        bad, stopped, start_epoch, best_state = int(ck["bad"]), bool(ck["stopped"]), int(ck["epoch"]), ck["best_state"]
        torch.set_rng_state(ck["torch_rng"])  # dropout draws continue where they stopped

    n_train = len(d.basins)
    kw = dict(method=method, rtol=rtol, atol=atol, dtype=dtype)
    W = None if window is None else int(window)
    wu = int(warmup)

    def val_loss() -> float:
        mask = vm if vm is not None else tm
        obs_m = np.where(mask[None], d.observed, np.nan)
        mine = _dist.shard(list(range(n_train)), rank, world)
        tot = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for s in range(0, len(mine), int(eval_batch_size)):
                idx = mine[s:s + int(eval_batch_size)]
                sim = _simulate(model, network, d, None, sensitivity="direct", basins=idx, **kw)
                L, ok = _basin_losses(sim, torch.as_tensor(obs_m[idx], dtype=sim.dtype), loss,
                                      scale_all[idx].to(sim.dtype))
                tot += torch.stack([L[ok].sum(), ok.sum().to(L.dtype)]).to(torch.float64)
        tot = _dist.all_reduce_sum(tot)
        return float(tot[0] / tot[1].clamp_min(1))

    epoch = start_epoch
    while epoch < int(epochs) and not stopped:
        t0 = _time.perf_counter()
        rng = np.random.default_rng([int(seed), epoch])
        order = rng.permutation(n_train)
        batches = [order[s:s + int(batch_size)] for s in range(0, n_train, int(batch_size))]
        starts = rng.choice(cand, size=len(batches)) if W is not None else np.zeros(len(batches), dtype=int)
        lr_e = float(lr)
        if lr_schedule == "cosine":
            lr_e = float(lr) * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * epoch / max(int(epochs), 1))))
        for g in opt.param_groups:
            g["lr"] = lr_e
        network.train()
        losses = []
        for batch, k in zip(batches, starts):
            k = int(k)
            if W is None:
                steps, score = slice(0, T), tm
            else:
                s0 = max(0, k - wu)
                steps = slice(s0, k + W)
                score = np.zeros(k + W - s0, dtype=bool)
                score[k - s0:] = tm[k:k + W]
            mine = _dist.shard(list(batch), rank, world)
            opt.zero_grad()
            if mine:
                obs_t = torch.as_tensor(np.where(score[None], d.observed[mine][:, steps], np.nan))
                sim = _simulate(model, network, d, steps, sensitivity=sensitivity, basins=mine, **kw)
                L, ok = _basin_losses(sim, obs_t.to(sim.dtype), loss, scale_all[mine].to(sim.dtype))
                count = ok.sum().to(torch.float64).reshape(1)
            else:
                count = torch.zeros(1, dtype=torch.float64)
            n_glob = _dist.all_reduce_sum(count)[0]
            if mine:
                # sum over this process's basins / basins scored in the whole batch: summed
                # across processes, the gradient equals that of one process on the batch
                total = torch.where(ok, L, torch.zeros_like(L)).sum()
                batch_loss = total / n_glob.clamp_min(1).to(total.dtype)
                if not torch.isfinite(batch_loss):
                    raise FloatingPointError(
                        f"train_regional: non-finite loss at epoch {epoch} for basins "
                        f"{[d.basins[i] for i in mine][:5]}; lower lr or check the data")
                batch_loss.backward()
                lsum = float(batch_loss.detach())
            else:  # more processes than basins in this batch: contribute zero gradients
                lsum = 0.0
            for p in trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
            _dist.all_reduce_gradients(trainable)
            losses.append(float(_dist.all_reduce_sum(torch.tensor([lsum], dtype=torch.float64))[0]))
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, float(grad_clip))
            opt.step()
        network.eval()
        t_train = _time.perf_counter() - t0
        improved = False
        if (epoch + 1) % int(val_every) == 0 or epoch + 1 == int(epochs):
            V = val_loss()
            improved = V < best_val
            if improved:
                best_val, best_epoch, bad = V, epoch, 0
                best_state = state()
            else:
                bad += 1
        else:
            V = history[-1]["val_loss"] if history else float("nan")
        if patience is not None and bad >= int(patience):
            stopped = True
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": V, "lr": lr_e,
                  "seconds": _time.perf_counter() - t0, "train_seconds": t_train, "batches": len(batches)}
        history.append(record)
        epoch += 1
        if ckdir is not None and writer:
            if improved:
                _atomic_save({"state": best_state, "epoch": best_epoch, "val_loss": best_val, "config": config},
                             ckdir / "best.pt")
            _atomic_save({
                "network": network.state_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "epoch": epoch, "history": history, "best_state": best_state, "best_val": best_val,
                "best_epoch": best_epoch, "bad": bad, "stopped": stopped, "config": config,
                "torch_rng": torch.get_rng_state(),
            }, ckdir / "last.pt")
        if progress and writer:
            print(f"epoch {record['epoch']}: train {record['train_loss']:.4f} val {V:.4f} "
                  f"({record['seconds']:.1f} s)", flush=True)
        if on_epoch is not None:
            on_epoch(record["epoch"], record)
    network.load_state_dict(best_state["network"])
    model.load_state_dict(best_state["model"])
    network.eval()
    for p in trainable:
        p.grad = None
    # final metrics of the training basins
    if eval_periods is None:
        eval_periods = {"train": tm}
        if vm is not None:
            eval_periods["validation"] = vm
    met = {}
    if final_metrics:
        met, _ = _evaluate(model, network, d, eval_periods, metrics, method, rtol, atol, eval_batch_size, dtype)
    with torch.no_grad():
        p = network(d.attributes).cpu().numpy()
    params = {b: {n: float(p[i, j]) for j, n in enumerate(network.parameter_names)} for i, b in enumerate(d.basins)}
    series = _dynamic_arrays(network, d)
    dyn = {b: {n: v[i] for n, v in series.items()} for i, b in enumerate(d.basins)} if series else {}
    result = RegionalResult(history, best_epoch, best_val, stopped, met, params,
                            _time.perf_counter() - t_start, out, world, network, dyn, d.forcing.dates)
    if out is not None and writer:
        write_run_folder(result, out, metrics)
    return result


def write_run_folder(result: RegionalResult, out: str | os.PathLike, metrics: Sequence[str] = DEFAULT_METRICS) -> Path:
    """Write ``history.json``, ``metrics.json``, ``summary.json``, ``parameters.csv``,
    ``nse_cdf.png`` and, with dynamic parameters, ``dynamic_parameters.npz`` of a
    :class:`RegionalResult` (atomically, file by file)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "history.json", result.history)
    _write_json(out / "metrics.json", result.metrics)
    summ = {p: {m: s for m, s in ((m, _summaries(result.metrics, m).get(p)) for m in metrics) if s is not None}
            for p in next(iter(result.metrics.values()), {})}
    _write_json(out / "summary.json", summ)
    names = list(next(iter(result.parameters.values())).keys()) if result.parameters else []
    lines = ["basin," + ",".join(names)]
    lines += [b + "," + ",".join(f"{v[n]:.8g}" for n in names) for b, v in result.parameters.items()]
    atomic_write_text(out / "parameters.csv", "\n".join(lines) + "\n")
    if result.dynamic_parameters:
        first = next(iter(result.dynamic_parameters.values()))
        write_dynamic_parameters(out / "dynamic_parameters.npz", {n: result.dynamic_series(n) for n in first},
                                 list(result.dynamic_parameters), result.dates)
    if result.metrics and "nse" in metrics:
        plot_metric_cdf(result.metrics, "nse", path=out / "nse_cdf.png")
    return out


# ------------------------------------------------------------ cross-validation
@dataclass
class CrossValidationResult:
    """Result of :func:`cross_validate_basins`.

    Attributes:
        folds: one dict per fold: ``fold``, ``train_basins``, ``test_basins``,
            ``metrics`` (held-out basin -> period -> metric -> value), ``summary``
            (period -> metric -> distribution), ``best_epoch``, ``seconds``, and the fold's
            trained ``model`` and ``network`` (in memory only, not in ``folds.json``).
        metrics: pooled over folds: every basin (each held out once) -> period -> metric.
        parameters: every basin -> parameter -> value predicted while it was held out.
        dynamic_parameters: every basin -> dynamic parameter -> daily values ``[time]``
            predicted while it was held out (empty without dynamic parameters).
    """

    folds: list[dict]
    metrics: dict[str, dict[str, dict[str, float]]]
    parameters: dict[str, dict[str, float]] = field(default_factory=dict)
    dynamic_parameters: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def summary(self, metric: str = "nse") -> dict[str, dict[str, float]]:
        """period -> distribution of ``metric`` over all held-out basins (pooled)."""
        return _summaries(self.metrics, metric)


#: Entries of a fold that folds.json leaves out (per-basin metrics are in metrics.json; objects).
_NOT_IN_FOLDS_JSON = ("metrics", "model", "network")


def cross_validate_basins(
    model_factory: Callable[[], Model],
    data: BasinDataset,
    k: int = 5,
    *,
    seed: int = 0,
    attribute_names: Sequence[str] | None = None,
    train_mask: Any = None,
    val_mask: Any = None,
    test_mask: Any = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    out_dir: str | os.PathLike | None = None,
    observation: str = "Q",
    **train_kwargs: Any,
) -> CrossValidationResult:
    """k-fold cross-validation over basins: prediction in ungauged basins (PUB).

    The basins are shuffled (``seed``) and split into ``k`` folds of nearly equal size.
    For each fold a fresh model (``model_factory()``) and network are trained with
    :func:`train_regional` on the other folds (attribute normalisation from those basins
    only) and the held-out basins are simulated from their attributes alone. Held-out
    basins are scored in the training period (``train``: ungauged in space only) and,
    where ``test_mask`` is given, in the test period (``test``: ungauged in space and
    time) -- the temporal split beside the spatial one.

    Args:
        model_factory: returns a new, untrained model (a fresh hybrid per fold).
        data: the basins (:class:`~adjointhydro.data.BasinDataset`).
        k: number of folds, 2 <= k <= number of basins.
        train_mask, val_mask, test_mask: bool ``[T]`` periods.
        out_dir: a run folder per fold (``fold<i>/``) and the pooled ``metrics.json``,
            ``summary.json``, ``folds.json``.
        observation: the data's observed discharge variable (mm/day).
        train_kwargs: passed to :func:`train_regional` (epochs, batch_size, method ...).
    """
    if not isinstance(data, BasinDataset):
        raise TypeError(f"data must be a BasinDataset, got {type(data).__name__}")
    B = data.n_basins
    if not 2 <= int(k) <= B:
        raise ValueError(f"k must be between 2 and the number of basins ({B}), got {k}")
    names = list(attribute_names) if attribute_names is not None else list(data.attribute_names)
    probe = model_factory()
    _as_data(probe, data, None, None, names, observation)  # all checks before any training
    if train_kwargs.get("dynamic_parameters"):
        _, inputs, _ = _check_dynamic(probe, probe.parameter_names, dict(train_kwargs.get("fixed_parameters") or {}),
                                      train_kwargs["dynamic_parameters"], train_kwargs.get("dynamic_inputs"),
                                      train_kwargs.get("dynamic_lookback", 30))
        _require_dynamic_inputs(inputs, data.forcing_names, data.source)
    rng = np.random.default_rng(int(seed))
    order = rng.permutation(B)
    folds_idx = np.array_split(order, int(k))
    T = data.n_steps
    periods = {"train": _as_mask(train_mask, T, "train_mask") if train_mask is not None
               else np.arange(T) >= min(int(train_kwargs.get("warmup", 365)), T - 1)}
    if test_mask is not None:
        periods["test"] = _as_mask(test_mask, T, "test_mask")
    folds: list[dict] = []
    pooled: dict[str, dict[str, dict[str, float]]] = {}
    pooled_params: dict[str, dict[str, float]] = {}
    pooled_dynamic: dict[str, dict[str, np.ndarray]] = {}
    out = Path(out_dir) if out_dir is not None else None
    for i, test_idx in enumerate(folds_idx):
        t0 = _time.perf_counter()
        train_ids = [data.basins[j] for j in sorted(set(order) - set(test_idx))]
        test_ids = [data.basins[j] for j in sorted(test_idx)]
        model = model_factory()
        train_data = data.select_basins(train_ids)
        res = train_regional(
            model, train_data, observed=train_data.observed(observation), attribute_names=names, train_mask=train_mask,
            val_mask=val_mask, seed=int(seed) + i, metrics=metrics,
            out_dir=None if out is None else out / f"fold{i}", **train_kwargs,
        )
        net = res.network
        held = _as_data(model, data.select_basins(test_ids), None, None, names, observation, network=net)
        met, _ = _evaluate(model, net, held, periods, metrics, train_kwargs.get("method", "dopri5"),
                           train_kwargs.get("rtol", 1e-3), train_kwargs.get("atol", 1e-3),
                           train_kwargs.get("eval_batch_size", 256), train_kwargs.get("dtype"))
        with torch.no_grad():
            p = net(held.attributes).cpu().numpy()
        for j, b in enumerate(test_ids):
            pooled_params[b] = {n: float(p[j, c]) for c, n in enumerate(net.parameter_names)}
        dyn = _dynamic_arrays(net, held)
        for j, b in enumerate(test_ids):
            if dyn:
                pooled_dynamic[b] = {n: v[j] for n, v in dyn.items()}
        pooled.update(met)
        folds.append({
            "fold": i, "train_basins": train_ids, "test_basins": test_ids, "metrics": met,
            "summary": {m: _summaries(met, m) for m in metrics}, "best_epoch": res.best_epoch,
            "seconds": _time.perf_counter() - t0, "model": model, "network": net,
        })
    result = CrossValidationResult(folds, pooled, pooled_params, pooled_dynamic)
    if out is not None and _dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "metrics.json", pooled)
        _write_json(out / "summary.json", {m: result.summary(m) for m in metrics})
        _write_json(out / "folds.json", [{k2: v for k2, v in f.items() if k2 not in _NOT_IN_FOLDS_JSON}
                                         for f in folds])
    return result
