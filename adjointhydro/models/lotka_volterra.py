"""Lotka-Volterra predator-prey model and its universal differential equation (Rackauckas et al. 2020).

Stores: ``prey`` and ``predator`` (population units). No forcing.

* ``birth = alpha * prey``                  outside -> prey
* ``predation = beta * prey * predator``    prey -> outside
* ``growth = gamma * prey * predator``      outside -> predator
* ``death = delta * predator``              predator -> outside

With Rackauckas et al.'s values (alpha, beta, gamma, delta) = (1.3, 0.9, 0.8, 1.8)
and initial state (0.44249296, 4.6280594). The UDE keeps the linear terms and
learns the two interaction terms with networks of (prey, predator).
"""
from __future__ import annotations

import torch

from ..fluxes import Flux, NeuralFlux
from ..model import Model, Parameter, Store

__all__ = ["lotka_volterra", "lotka_volterra_ude"]

U0 = (0.44249296, 4.6280594)


def lotka_volterra(alpha: float = 1.3, beta: float = 0.9, gamma: float = 0.8, delta: float = 1.8) -> Model:
    params = [
        Parameter("alpha", 0.0, 5.0, alpha, "1/time"),
        Parameter("beta", 0.0, 5.0, beta, "1/(pop*time)"),
        Parameter("gamma", 0.0, 5.0, gamma, "1/(pop*time)"),
        Parameter("delta", 0.0, 5.0, delta, "1/time"),
    ]
    stores = [Store("prey", "pop", U0[0]), Store("predator", "pop", U0[1])]
    fluxes = [
        Flux("birth", None, "prey", lambda v: v.alpha * v.prey, "pop/time"),
        Flux("predation", "prey", None, lambda v: v.beta * v.prey * v.predator, "pop/time"),
        Flux("growth", None, "predator", lambda v: v.gamma * v.prey * v.predator, "pop/time"),
        Flux("death", "predator", None, lambda v: v.delta * v.predator, "pop/time"),
    ]
    return Model(stores, fluxes, parameters=params, name="Lotka-Volterra", time_units="time")


def lotka_volterra_ude(hidden: tuple[int, ...] = (16, 16), dtype: torch.dtype = torch.float64, **known) -> Model:
    """Lotka-Volterra with the interaction fluxes (predation, growth) replaced by networks."""
    m = lotka_volterra(**known)
    for name in ("predation", "growth"):
        m = m.replace_flux(
            NeuralFlux(name, ["prey", "predator"], hidden=hidden, activation=torch.nn.Tanh,
                       input_loc={"prey": 2.0, "predator": 2.0}, input_scale={"prey": 2.0, "predator": 2.0},
                       output_scale=1.0, units="pop/time")
        )
    m.name = "Lotka-Volterra UDE"
    return m.to(dtype)
