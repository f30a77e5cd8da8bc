"""Built-in models, each written with the same store/flux API."""
from .cascade import reservoir_cascade
from .exphydro import EXPHYDRO_PARAMETERS, exphydro, exphydro_m50, exphydro_m100
from .lotka_volterra import lotka_volterra, lotka_volterra_ude

__all__ = [
    "exphydro", "exphydro_m50", "exphydro_m100", "EXPHYDRO_PARAMETERS",
    "reservoir_cascade", "lotka_volterra", "lotka_volterra_ude",
]
