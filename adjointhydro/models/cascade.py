"""A continuous-time bucket with a linear-reservoir (Nash) cascade for routing.

Stores: ``soil`` (mm) and ``r1 .. rn`` (mm). Forcing ``P``, ``PET`` (mm/day).

* ``rain = P``                                          outside -> soil
* ``et = PET * min(1, soil/Smax)`` (smoothed)            soil -> outside
* ``recharge = k_perc * soil * (soil/Smax)^beta``        soil -> r1      (HBV-like nonlinearity)
* ``route_i = k * r_i``                                  r_i -> r_{i+1}
* ``Q = k * r_n``                                        r_n -> outside
"""
from __future__ import annotations

import torch

from ..fluxes import Flux, smooth_step
from ..model import Model, Parameter, Store

__all__ = ["reservoir_cascade"]


def reservoir_cascade(n_reservoirs: int = 3, smoothing: float | None = 5.0) -> Model:
    """Soil moisture accounting with an HBV-like recharge and a Nash cascade of ``n_reservoirs``."""
    if n_reservoirs < 1:
        raise ValueError("n_reservoirs must be at least 1")
    params = [
        Parameter("Smax", 10.0, 1000.0, 250.0, "mm", "soil capacity"),
        Parameter("beta", 0.5, 6.0, 2.0, "-", "shape of the recharge curve"),
        Parameter("k_perc", 0.001, 1.0, 0.05, "1/day", "recharge rate at capacity"),
        Parameter("k", 0.01, 5.0, 0.5, "1/day", "reservoir rate constant"),
    ]
    stores = [Store("soil", "mm", lambda p: 0.5 * p.Smax)] + [Store(f"r{i}", "mm", 0.0) for i in range(1, n_reservoirs + 1)]

    def et(v):
        u = torch.relu(v.soil) / v.Smax
        # smooth min(1, u): blend with a smooth step at u = 1
        w = smooth_step(1.0 - u, None if smoothing is None else smoothing * 10.0)
        return v.PET * (w * u + (1 - w))

    fluxes = [
        Flux("rain", None, "soil", lambda v: v.P),
        Flux("et", "soil", None, et),
        Flux("recharge", "soil", "r1", lambda v: v.k_perc * torch.relu(v.soil) * (torch.relu(v.soil) / v.Smax) ** v.beta),
    ]
    for i in range(1, n_reservoirs):
        fluxes.append(Flux(f"route{i}", f"r{i}", f"r{i + 1}", (lambda j: lambda v: v.k * v[f"r{j}"])(i)))
    fluxes.append(Flux("Q", f"r{n_reservoirs}", None, lambda v: v.k * v[f"r{n_reservoirs}"]))
    return Model(stores, fluxes, forcing=("P", "PET"), parameters=params, discharge=("Q",),
                 name=f"bucket + {n_reservoirs}-reservoir cascade")
