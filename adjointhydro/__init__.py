"""adjointhydro: differentiable hydrological models as neural-ODE flux hybrids.

Public API (the rest is private)::

    from adjointhydro import Forcing, Model, Store, Parameter, Flux, NeuralFlux, solve
    from adjointhydro.models import exphydro, exphydro_m50
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
]
