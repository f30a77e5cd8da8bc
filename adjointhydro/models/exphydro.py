"""EXP-HYDRO (Patil & Stieglitz 2014) and its hybrids M50 and M100 (Hoge et al. 2022).

Stores: ``snow`` (mm, optional) and ``soil`` (mm). Forcing: ``P`` precipitation
(mm/day), ``T`` air temperature (degC, only with snow), ``PET`` potential
evapotranspiration (mm/day). Fluxes (mm/day), with ``step`` a smooth Heaviside
step ``(tanh(k x) + 1)/2`` (``k = smoothing``, per mm or degC; Hoge et al. use 5):

* ``snowfall = step(Tmin - T) * P``                      outside -> snow
* ``rainfall = P - snowfall = step(T - Tmin) * P`` (all of P without snow) outside -> soil
* ``melt = step(T - Tmax) * step(snow) * min(snow, Df*(T - Tmax))``   snow -> soil
* ``et = step(soil) * [step(soil - Smax) * PET + step(Smax - soil) * PET * soil/Smax]``  soil -> outside
* ``Q = step(soil) * [step(soil - Smax) * Qmax + step(Smax - soil) * Qmax * exp(-f*(Smax - soil))]
  + step(soil - Smax) * (soil - Smax)``  (baseflow plus saturation excess)  soil -> outside
"""
from __future__ import annotations

import torch

from ..fluxes import Flux, NeuralFlux, NeuralFluxGroup, smooth_step
from ..model import Model, Parameter, Store

__all__ = ["exphydro", "exphydro_m50", "exphydro_m100", "EXPHYDRO_PARAMETERS"]

#: Bounds after Hoge et al. (2022), Smax widened to include Patil & Stieglitz's sample calibration.
EXPHYDRO_PARAMETERS = (
    Parameter("f", 1e-4, 0.2, 0.017, "1/mm", "decline of baseflow with storage deficit"),
    Parameter("Smax", 50.0, 2000.0, 1709.0, "mm", "soil bucket capacity"),
    Parameter("Qmax", 0.5, 50.0, 18.47, "mm/day", "baseflow at full bucket"),
    Parameter("Df", 0.0, 5.0, 2.67, "mm/day/degC", "degree-day melt factor"),
    Parameter("Tmax", 0.0, 3.0, 0.176, "degC", "temperature above which snow melts"),
    Parameter("Tmin", -3.0, 0.0, -2.09, "degC", "temperature below which precipitation is snow"),
)


def exphydro(snow: bool = True, smoothing: float | None = 5.0, initial_soil: float | None = None) -> Model:
    """The physics-only EXP-HYDRO model (M0).

    Args:
        snow: include the snow store (needs forcing ``T``); without it all
            precipitation is rain and the parameters Df, Tmax, Tmin are dropped.
        smoothing: sharpness of the smooth steps (``None``: hard thresholds).
        initial_soil: initial soil water (mm); default: at capacity ``Smax``.
    """
    k = smoothing

    def step(x):
        return smooth_step(x, k)

    # step(-x) = 1 - step(x) for the tanh step, which halves the work below
    def et(v):
        s, smax = v.soil, v.Smax
        full = step(s - smax)
        return step(s) * v.PET * (full + (1.0 - full) * (s / smax))

    def discharge(v):
        s, smax = v.soil, v.Smax
        excess = s - smax
        full = step(excess)
        base = step(s) * v.Qmax * (full + (1.0 - full) * torch.exp(v.f * excess))
        return base + full * excess

    soil0 = (lambda p: p.Smax) if initial_soil is None else float(initial_soil)
    stores = [Store("soil", "mm", soil0, "soil water")]
    if snow:
        stores.insert(0, Store("snow", "mm", 0.0, "snow water equivalent"))
        fluxes = [
            Flux("snowfall", None, "snow", lambda v: step(v.Tmin - v.T) * v.P, description="precipitation as snow"),
            Flux("rainfall", None, "soil", lambda v: v.P - v.snowfall, description="precipitation as rain"),
            Flux(
                "melt", "snow", "soil",
                lambda v: step(v.T - v.Tmax) * step(v.snow) * torch.minimum(v.snow, v.Df * (v.T - v.Tmax)),
                description="degree-day snow melt",
            ),
        ]
        params = EXPHYDRO_PARAMETERS
        forcing = ("P", "T", "PET")
    else:
        fluxes = [Flux("rainfall", None, "soil", lambda v: v.P, description="precipitation")]
        params = EXPHYDRO_PARAMETERS[:3]
        forcing = ("P", "PET")
    fluxes += [
        Flux("et", "soil", None, et, description="evapotranspiration, PET*soil/Smax capped at PET"),
        Flux("Q", "soil", None, discharge, description="baseflow Qmax*exp(-f*(Smax-soil)) + saturation excess"),
    ]
    return Model(
        stores, fluxes, forcing=forcing, parameters=params, discharge=("Q",),
        name="EXP-HYDRO" if snow else "EXP-HYDRO (no snow)",
    )


def exphydro_m50(
    snow: bool = True,
    smoothing: float | None = 5.0,
    hidden: tuple[int, ...] = (16, 16),
    soil_scale: float = 1000.0,
    dtype: torch.dtype = torch.float64,
) -> Model:
    """M50: EXP-HYDRO whose ``et`` and ``Q`` fluxes are neural networks (Hoge et al. 2022).

    ``et`` reads soil (and snow and T with snow) and PET and is limited by the soil
    water available; ``Q`` reads soil and P. Inputs are scaled by ``soil_scale``
    (mm) and typical forcing magnitudes; :meth:`NeuralFlux.set_normalisation` can
    refine them from a physics run.
    """
    base = exphydro(snow=snow, smoothing=smoothing)
    et_inputs = ["snow", "soil", "T", "PET"] if snow else ["soil", "PET"]
    norm_loc = {"soil": soil_scale / 2, "snow": 50.0, "T": 10.0, "PET": 2.0, "P": 3.0}
    norm_scale = {"soil": soil_scale / 2, "snow": 50.0, "T": 10.0, "PET": 2.0, "P": 5.0}
    model = base.replace_flux(
        NeuralFlux("et", et_inputs, hidden=hidden, input_loc=norm_loc, input_scale=norm_scale,
                   output_scale=1.5, limit_by="soil", limit_scale=1.0)
    ).replace_flux(
        NeuralFlux("Q", ["soil", "P"], hidden=hidden, input_loc=norm_loc, input_scale=norm_scale,
                   output_scale=1.0, limit_by="soil", limit_scale=1.0)
    )
    model.name = "EXP-HYDRO M50" + ("" if snow else " (no snow)")
    return model.to(dtype)


def exphydro_m100(
    smoothing: float | None = 5.0,
    hidden: tuple[int, ...] = (32, 32),
    soil_scale: float = 1000.0,
    dtype: torch.dtype = torch.float64,
) -> Model:
    """M100: one network gives every flux of EXP-HYDRO (snow version; Hoge et al. 2022).

    Inputs: snow, soil, P, T, PET. The store structure, and so the mass balance,
    stays; only the fluxes are learned. Snowfall and rainfall are the network's
    split of P (a softmax of two outputs times P, ``partition={"P": ...}`` of
    :class:`NeuralFluxGroup`), so they sum to the observed precipitation exactly and
    the network cannot create or lose water at the input; melt is limited by the
    snow store, ET and Q by the soil store.
    """
    base = exphydro(snow=True, smoothing=smoothing)
    names = ["snowfall", "rainfall", "melt", "et", "Q"]
    group = NeuralFluxGroup(
        [w for w in base.wiring if w[0] in names],
        ["snow", "soil", "P", "T", "PET"],
        hidden=hidden,
        input_loc={"snow": 50.0, "soil": soil_scale / 2, "P": 3.0, "T": 10.0, "PET": 2.0},
        input_scale={"snow": 50.0, "soil": soil_scale / 2, "P": 5.0, "T": 10.0, "PET": 2.0},
        output_scale=[1.0, 2.0, 1.0, 1.5, 1.0],
        limit_by=[None, None, "snow", "soil", "soil"],
        partition={"P": ("snowfall", "rainfall")},
        name="M100",
    )
    model = base.replace_flux(group)
    model.name = "EXP-HYDRO M100"
    return model.to(dtype)
