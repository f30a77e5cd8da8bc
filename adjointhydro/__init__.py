"""adjointhydro: differentiable hydrological models as neural-ODE flux hybrids.

Public API (the rest is private)::

    from adjointhydro import Forcing, Model, Store, Parameter, Flux, NeuralFlux, solve
    from adjointhydro.models import exphydro, exphydro_m50
    from adjointhydro import train_regional, AttributeParameters, make_synthetic_basins  # regional (dPL)
"""
from .fluxes import Flux, NeuralFlux, NeuralFluxGroup, Vars, smooth_step
from .forcing import Forcing, ForcingError
from .model import Model, ModelError, Parameter, Store
from .solve import Adjoint, CheckpointedAdjoint, Direct, Solution, SolverError, solve

__version__ = "0.1.0"

__all__ = [
    "Forcing", "ForcingError", "Model", "ModelError", "Store", "Parameter", "Flux", "NeuralFlux",
    "NeuralFluxGroup", "Vars", "smooth_step", "solve", "Solution", "SolverError", "Direct", "Adjoint",
    "CheckpointedAdjoint", "__version__",
    # regional training (imported on first use)
    "AttributeParameters", "RegionalResult", "train_regional", "evaluate_regional", "cross_validate_basins",
    "regional_hybrid", "metric_summary", "plot_metric_cdf", "make_synthetic_basins", "SyntheticBasins",
]

_LAZY = {
    **{n: "regional" for n in ("AttributeParameters", "RegionalResult", "train_regional", "evaluate_regional",
                               "cross_validate_basins", "regional_hybrid", "metric_summary", "plot_metric_cdf")},
    "make_synthetic_basins": "synthetic", "SyntheticBasins": "synthetic",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
