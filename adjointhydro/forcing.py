"""Forcing: regular time series for many basins, seen by the solver as a function of time.

A :class:`Forcing` holds values of shape ``[basin, time, variable]`` on a regular
grid (one value per period, by default one day). Time inside the model is measured
in periods from the start of the first period, so period ``k`` covers ``[k, k+1)``.

Two interpolation modes:

* ``"constant"`` (default): the period's value holds over the whole period, so the
  integral of a rate over a day equals the daily total that was observed. The
  right-hand side is discontinuous at every period boundary; the solvers in
  :mod:`adjointhydro.solve` always stop exactly on these boundaries.
* ``"linear"``: values are placed at period midpoints and interpolated linearly
  (held constant before the first and after the last midpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = ["Forcing", "ForcingError", "interpolate"]

#: Variables that must never be negative, by common name.
_NON_NEGATIVE = {"p", "prcp", "precip", "precipitation", "pet", "e0", "pe", "ep"}


class ForcingError(ValueError):
    """Raised when forcing data cannot be used (shape, NaN, negative rates, names)."""


@dataclass
class Forcing:
    """Forcing series for many basins on a regular time grid.

    Args:
        values: array ``[basin, time, variable]`` (numpy or torch). A 2-D array
            ``[time, variable]`` is taken as one basin.
        names: one name per variable, e.g. ``("P", "T", "PET")``.
        units: one unit string per variable, e.g. ``("mm/day", "degC", "mm/day")``.
        dates: optional dates of the periods (``numpy.datetime64`` array of length ``time``).
        basins: optional basin identifiers (length ``basin``).
        interpolation: ``"constant"`` (default) or ``"linear"``.
        source: where the data came from (a file name), used in error messages.
        step: length of one period in model time units (1.0 = one day for the
            built-in hydrological models, whose rates are per day).
    """

    values: torch.Tensor
    names: tuple[str, ...]
    units: tuple[str, ...] = ()
    dates: np.ndarray | None = None
    basins: tuple[str, ...] = ()
    interpolation: str = "constant"
    source: str = "forcing"
    step: float = 1.0
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        v = self.values
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v, dtype=np.float64))
        if not torch.is_floating_point(v):
            v = v.to(torch.float64)
        if v.ndim == 2:
            v = v[None]
        if v.ndim != 3:
            raise ForcingError(
                f"{self.source}: forcing must have shape [basin, time, variable], got {tuple(v.shape)}"
            )
        self.values = v
        self.names = tuple(self.names)
        if len(self.names) != v.shape[2]:
            raise ForcingError(
                f"{self.source}: {v.shape[2]} forcing variables but {len(self.names)} names {self.names}"
            )
        if len(set(self.names)) != len(self.names):
            raise ForcingError(f"{self.source}: duplicate forcing names {self.names}")
        self.units = tuple(self.units) if self.units else ("",) * len(self.names)
        if len(self.units) != len(self.names):
            raise ForcingError(f"{self.source}: {len(self.names)} names but {len(self.units)} units")
        if not self.step > 0:
            raise ForcingError(f"{self.source}: step must be positive, got {self.step}")
        if v.shape[1] == 0:
            raise ForcingError(f"{self.source}: forcing has no time steps (empty period)")
        if self.interpolation not in ("constant", "linear"):
            raise ForcingError(
                f"{self.source}: interpolation must be 'constant' or 'linear', got {self.interpolation!r}"
            )
        if self.dates is not None:
            self.dates = np.asarray(self.dates).astype("datetime64[D]")
            if len(self.dates) != v.shape[1]:
                raise ForcingError(
                    f"{self.source}: {len(self.dates)} dates for {v.shape[1]} time steps"
                )
        self.basins = tuple(str(b) for b in self.basins) if self.basins else tuple(
            str(i) for i in range(v.shape[0])
        )
        if len(self.basins) != v.shape[0]:
            raise ForcingError(f"{self.source}: {v.shape[0]} basins but {len(self.basins)} basin ids")
        self._index = {n: i for i, n in enumerate(self.names)}
        self.check()

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Raise :class:`ForcingError` naming basin, variable and date of the first bad value."""
        v = self.values.detach()
        bad = ~torch.isfinite(v)
        if bad.any():
            b, t, j = (int(i) for i in bad.nonzero()[0])
            raise ForcingError(
                f"{self.source}: non-finite value ({float(v[b, t, j])}) in forcing variable "
                f"{self.names[j]!r} for basin {self.basins[b]!r} at {self.date_str(t)}; "
                f"{int(bad.sum())} such values in all. Fill gaps before solving."
            )
        for j, n in enumerate(self.names):
            if n.lower() in _NON_NEGATIVE:
                neg = v[:, :, j] < 0
                if neg.any():
                    b, t = (int(i) for i in neg.nonzero()[0])
                    raise ForcingError(
                        f"{self.source}: negative {n!r} ({float(v[b, t, j])} {self.units[j]}) for basin "
                        f"{self.basins[b]!r} at {self.date_str(t)}; rates of {n!r} must be >= 0"
                    )

    # --------------------------------------------------------------- accessors
    @property
    def n_basins(self) -> int:
        return self.values.shape[0]

    @property
    def n_steps(self) -> int:
        return self.values.shape[1]

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ForcingError(
                f"{self.source}: no forcing variable {name!r}; available: {list(self.names)}"
            ) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        """Values of one variable, ``[basin, time]``."""
        return self.values[:, :, self.index(name)]

    def date_str(self, step: int | float) -> str:
        """Human-readable time of a step index (a date where dates are known)."""
        k = int(np.floor(step))
        if self.dates is not None and 0 <= k < len(self.dates):
            frac = float(step) - k
            s = str(self.dates[k])
            return s if frac == 0 else f"{s} (+{frac:.3f} d)"
        return f"step {float(step):.3f}"

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Forcing":
        return Forcing(
            self.values.to(dtype=dtype, device=device), self.names, self.units, self.dates,
            self.basins, self.interpolation, self.source, self.step,
        )

    def select(self, basins: Sequence[int] | slice | None = None, steps: slice | None = None) -> "Forcing":
        """Subset of basins (indices) and/or time steps (a slice)."""
        v = self.values
        bas = list(self.basins)
        if basins is not None:
            idx = basins if isinstance(basins, slice) else list(basins)
            v = v[idx]
            bas = bas[idx] if isinstance(idx, slice) else [bas[i] for i in idx]
        dates = self.dates
        if steps is not None:
            v = v[:, steps]
            dates = None if dates is None else dates[steps]
        return Forcing(v, self.names, self.units, dates, tuple(bas), self.interpolation, self.source, self.step)

    @classmethod
    def empty(cls, n_basins: int, n_steps: int, step: float = 1.0) -> "Forcing":
        """No forcing variables, only a time grid (for autonomous models such as Lotka-Volterra)."""
        return cls(torch.zeros(n_basins, n_steps, 0, dtype=torch.float64), (), (), step=step)

    # ------------------------------------------------------------ evaluation
    def at(self, t: torch.Tensor | float) -> torch.Tensor:
        """Forcing at time ``t`` (model time units from the start), ``[basin, variable]``.

        ``t`` may be a scalar or a per-basin tensor ``[basin]``. Right-continuous
        at period boundaries in ``"constant"`` mode.
        """
        return interpolate(self.values, t, self.step, self.interpolation)


def interpolate(values: torch.Tensor, t: torch.Tensor | float, step: float, mode: str) -> torch.Tensor:
    """Forcing ``values`` ``[basin, time, variable]`` at time ``t`` (scalar or ``[basin]``)."""
    v = values
    n = v.shape[1]
    t = torch.as_tensor(t, dtype=v.dtype, device=v.device) / step
    if mode == "constant":
        k = torch.clamp(torch.floor(t).long(), 0, n - 1)
        if k.ndim == 0:
            return v[:, k]
        return v[torch.arange(v.shape[0], device=v.device), k]
    # linear between period midpoints, constant beyond the first and last midpoint
    s = torch.clamp(t - 0.5, 0.0, float(n - 1))
    k0 = torch.clamp(torch.floor(s).long(), 0, max(n - 2, 0))
    w = (s - k0.to(s.dtype)).clamp(0.0, 1.0)
    k1 = torch.clamp(k0 + 1, max=n - 1)
    if k0.ndim == 0:
        return v[:, k0] * (1 - w) + v[:, k1] * w
    rows = torch.arange(v.shape[0], device=v.device)
    return v[rows, k0] * (1 - w[:, None]) + v[rows, k1] * w[:, None]
