"""Symbolic inspection of learned fluxes: which formula did the network learn?

A hybrid model replaces some fluxes by neural networks. Once trained, each
network is a function of a few named inputs (stores, forcing, parameters). This
module samples that function where the model actually went, searches for closed
formulas that reproduce it, ranks them, checks them against physics, and puts
the chosen formula back into the model to see whether it still simulates well.
Only numpy, scipy and sympy are used (no PySR, no pysindy).

Pipeline (pysindy-like, one flux at a time)::

    samples = sample_flux(model, "Q", solution, forcing)      # network on visited inputs + grid
    reg = FluxRegressor().fit(samples)                         # catalogue + sparse + exhaustive + log fits
    reg.print()                                                # ranked candidates
    q = expression_to_flux(reg.best_, "Q", "soil", None)       # torch Flux from the sympy expression
    symbolic = model.replace_flux(q)

or all networks at once: ``inspect_model(model, forcing, solution, observed, out_dir=...)``.

Search
------
* **Catalogue** of named hydrological forms (linear reservoir ``k*S``, power law
  ``k*S**n``, exponential ``a*exp(b*(S - S_ref))`` == ``Qmax*exp(-f*(Smax - S))``,
  ``PET*S/Smax``, ``PET*min(1, S/Smax)``, thresholds and smooth steps, products with
  forcing such as ``c*P*S/Smax``, mass action ``k*S1*S2``, constants) fitted by
  nonlinear least squares (``scipy.optimize.least_squares``, several starts).
* **Sparse regression** (STLSQ) over a library of polynomials up to degree 3,
  powers, exponentials ``exp(b*(S - S_ref))`` on a grid of rates ``b`` and their
  products with forcing; rows weighted by the noise model (relative errors),
  columns standardised, a ridge term, near-duplicate columns removed, and a sweep
  of thresholds. Exponential rates of a selected support are then refined.
* **Exhaustive** search of every support of up to 3 library terms (batched
  normal equations; triples drawn from screened terms for large libraries).
* **Log-space** fit for strictly positive fluxes: ``log y`` linear in
  ``log x`` and ``x`` gives ``A * prod x**a * exp(sum b*x)``; exponents close to
  integers or halves are snapped and the fit repeated.

Selection
---------
Each candidate gets ``chi2 = sum(((y - f)/sigma_i)**2)`` with a FIXED noise model
``sigma_i = sqrt(noise_std**2 + (rel_noise*y_i)**2)``: network samples have no
noise, so an estimated variance would let information criteria keep adding
terms that fit the network's own wiggles. ``noise_std`` defaults to 1% of the
output's spread; :func:`inspect_model` ties it to the hybrid's residuals. Network
errors are smooth and correlated, so thousands of samples are not thousands of
independent observations: the criteria use an effective sample size ``n_eff``
(default :data:`DEFAULT_N_EFF`, in :func:`inspect_model` at most the number of
observed time steps) by scaling ``chi2`` by ``n_eff / n``::

    AICc = chi2 * n_eff/n + 2k + 2k(k+1)/(n_eff - k - 1)
    BIC  = chi2 * n_eff/n + k log(n_eff)

Candidates are ranked by BIC (or AICc). The chosen one (:func:`select`) is the
simplest identifiable candidate that already fits within the noise
(``chi2 <= n``, the discrepancy principle), else the best by the criterion.
Candidates also lie on a Pareto front of complexity (expression nodes) vs RMSE.

Standard errors come from the Jacobian of the weighted residuals at the optimum
(``cov = (J^T J)^-1`` under the fixed noise, via SVD). A parameter whose relative
standard error exceeds 1, or a pair that trades off exactly (|correlation| >
1 - 1e-6), is flagged as not identifiable (e.g. ``Qmax`` and ``Smax`` in
``Qmax*exp(-f*(Smax - S))``); correlations above 0.99 are reported as notes.
:func:`fit_joint` fits forms of several fluxes with shared parameters (one
``Smax`` for ET and discharge), which can make them identifiable.

Physics checks, re-simulation
-----------------------------
:func:`physics_checks` (non-negative on the sampled box, non-decreasing in the
store the flux drains, ``ET <= PET``, units of the form) and
:func:`extrapolation_table` (network vs expression outside the sampled range);
:func:`expression_to_flux` turns an expression into a torch :class:`SymbolicFlux`,
:func:`resimulate` re-runs the model with it (optionally refitting its constants
through the ODE) and scores it next to the hybrid.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import sympy as sp
import torch
from scipy.optimize import least_squares
from torch import nn

from ._io import atomic_path
from ._io import jsonable as _jsonable
from .fluxes import Flux, NeuralFluxGroup, Vars
from .forcing import Forcing
from .model import Model, ModelError

__all__ = [
    "FluxSamples",
    "sample_flux",
    "Candidate",
    "Form",
    "catalogue",
    "fit_form",
    "fit_catalogue",
    "fit_joint",
    "JointFit",
    "Term",
    "build_library",
    "sparse_regression",
    "exhaustive_search",
    "log_space_fit",
    "FluxRegressor",
    "search_flux",
    "select",
    "pareto_front",
    "physics_checks",
    "extrapolation_table",
    "SymbolicFlux",
    "expression_to_flux",
    "symbolic_model",
    "resimulate",
    "ResimulationResult",
    "FluxInspection",
    "InspectionReport",
    "inspect_model",
    "parse_units",
    "expression_dimension",
    "DEFAULT_N_EFF",
]

#: Effective number of independent samples used by the information criteria.
DEFAULT_N_EFF = 100.0

#: Names read as potential evapotranspiration by the ``ET <= PET`` check.
_PET_NAMES = {"pet", "e0", "ep", "pe", "etp", "pot_et"}

_REL_SE_LIMIT = 1.0   # relative standard error above which a parameter is not identifiable
_CORR_DEGENERATE = 1 - 1e-6  # |correlation| of a numerically degenerate pair (exact trade-off)
_CORR_NOTE = 0.99  # |correlation| reported as a note (strong trade-off, both still determined)


# =============================================================================== BLAS threads
_BLAS_NAMES = [("openblas_get_num_threads", "openblas_set_num_threads"),
               ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
               ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
               ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_")]


@functools.lru_cache(maxsize=1)
def _openblas_controls() -> tuple[tuple[Callable, Callable], ...]:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (Linux; else none)."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = {ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return ()
    for path in sorted(paths):
        if "openblas" not in os.path.basename(path).lower():
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for g, st in _BLAS_NAMES:
            if hasattr(lib, g) and hasattr(lib, st):
                found.append((getattr(lib, g), getattr(lib, st)))
                break
    return tuple(found)


@contextlib.contextmanager
def _single_threaded_blas():
    """Run with one BLAS thread: the matrices here are small, and threaded OpenBLAS on a
    busy machine can be hundreds of times slower (threads spinning for cores)."""
    saved = []
    for get, set_ in _openblas_controls():
        try:
            saved.append((set_, int(get())))
            set_(1)
        except Exception:  # noqa: BLE001 - best effort
            pass
    try:
        yield
    finally:
        for set_, n in saved:
            try:
                set_(n)
            except Exception:  # noqa: BLE001
                pass


# =============================================================================== symbols, units
@functools.lru_cache(maxsize=None)
def _sym(name: str) -> sp.Symbol:
    """The sympy symbol used for an input or parameter called ``name`` (real)."""
    return sp.Symbol(name, real=True)


def _free_name(base: str, taken: Iterable[str]) -> str:
    """``base``, or ``base_fit``, ``base_fit2``... if ``base`` is already an input name."""
    taken = set(taken)
    if base not in taken:
        return base
    i = 1
    while True:
        n = f"{base}_fit" + ("" if i == 1 else str(i))
        if n not in taken:
            return n
        i += 1


@functools.lru_cache(maxsize=256)
def parse_units(text: str | None) -> sp.Expr | None:
    """Units string -> sympy expression of positive unit symbols (``None`` if unknown).

    ``"mm/day"`` -> ``mm/day``, ``"1/(pop*time)"``, ``"mm/day/degC"``; ``"-"`` or
    ``"1"`` is dimensionless; ``""`` is unknown.
    """
    if text is None:
        return None
    t = str(text).strip()
    if t in ("", "?"):
        return None
    if t in ("-", "1", "dimensionless", "none"):
        return sp.Integer(1)
    t = t.replace("^", "**").replace("°C", "degC").replace("°", "deg")
    names = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", t))
    local = {n: sp.Symbol(n, positive=True) for n in names}
    try:
        return sp.sympify(t, locals=local)
    except (sp.SympifyError, SyntaxError, TypeError):
        return None


class _DimensionError(ValueError):
    pass


_FREE = sp.Symbol("__free_units__", positive=True)  # wildcard: a fitted number with implied units


def _same_units(a: sp.Expr, b: sp.Expr) -> bool:
    r = sp.powsimp(a / b, force=True)  # products of powers of positive unit symbols
    return r == 1 or (r.is_number and abs(float(r) - 1.0) < 1e-12)


def _dim(expr: sp.Expr, units: Mapping[sp.Symbol, sp.Expr | None]) -> sp.Expr | None:
    """Units of ``expr``; ``_FREE`` = anything (contains a bare fitted number); ``None`` = unknown."""
    if isinstance(expr, sp.Symbol):
        return units.get(expr)
    if expr.is_Float:
        return _FREE
    if expr.is_number:
        return sp.Integer(1)
    if isinstance(expr, (sp.Add, sp.Min, sp.Max)):
        dims = [_dim(a, units) for a in expr.args]
        known = [d for d in dims if d is not None and d is not _FREE]
        for d in known[1:]:
            if not _same_units(d, known[0]):
                raise _DimensionError(f"terms of {expr} have units {known[0]} and {d}")
        if known:
            return known[0]
        return _FREE if any(d is _FREE for d in dims) else None
    if isinstance(expr, sp.Mul):
        dims = [_dim(a, units) for a in expr.args]
        if any(d is _FREE for d in dims):
            return _FREE
        if any(d is None for d in dims):
            return None
        return sp.Mul(*dims)
    if isinstance(expr, sp.Pow):
        base, ex = expr.args
        db = _dim(base, units)
        if ex.is_number:
            if db is None or db is _FREE:
                return db
            return db ** ex
        de = _dim(ex, units)
        if de is not None and de is not _FREE and not _same_units(de, sp.Integer(1)):
            raise _DimensionError(f"exponent of {expr} has units {de}")
        if db is not None and db is not _FREE and _same_units(db, sp.Integer(1)):
            return sp.Integer(1)
        return _FREE  # x**n with a fitted n: the prefactor's declared units absorb it
    if isinstance(expr, sp.Abs):
        return _dim(expr.args[0], units)
    if isinstance(expr, sp.Function):
        for a in expr.args:
            d = _dim(a, units)
            if d is not None and d is not _FREE and not _same_units(d, sp.Integer(1)):
                raise _DimensionError(f"argument of {type(expr).__name__} in {expr} has units {d}")
        return sp.Integer(1)
    return None


def expression_dimension(
    expr: sp.Expr, units: Mapping[str, str | sp.Expr | None], expected: str | sp.Expr | None = None
) -> tuple[bool | None, str]:
    """Check the units of ``expr`` given units of its symbols (by name).

    Returns ``(ok, message)``: ``ok`` is ``True`` (consistent and, if ``expected``
    is given, equal to it), ``False`` (inconsistent: adding mm to mm/day, units in
    an exponential, or not ``expected``) or ``None`` (some units unknown).
    """
    umap: dict[sp.Symbol, sp.Expr | None] = {}
    for s in expr.free_symbols:
        u = units.get(str(s))
        umap[s] = parse_units(u) if isinstance(u, str) or u is None else u
    try:
        d = _dim(expr, umap)
    except _DimensionError as e:
        return False, f"inconsistent: {e}"
    exp_u = parse_units(expected) if isinstance(expected, str) or expected is None else expected
    if d is None:
        return None, "units unknown"
    if d is _FREE:
        return True, "consistent (fitted coefficients carry the units)"
    if exp_u is None:
        return True, f"consistent, units {d}"
    if _same_units(d, exp_u):
        return True, f"consistent: {d}"
    return False, f"gives {d}, flux is {exp_u}"


# =============================================================================== code generation
def _np_min(*a):
    return functools.reduce(np.minimum, a)


def _np_max(*a):
    return functools.reduce(np.maximum, a)


def _t_minmax(op: Callable, clamp_kw: str):
    def f(*a):
        tens = [x for x in a if isinstance(x, torch.Tensor)]
        nums = [float(x) for x in a if not isinstance(x, torch.Tensor)]
        if not tens:
            return (min if clamp_kw == "max" else max)(nums)
        out = functools.reduce(op, tens)
        if nums:
            c = (min if clamp_kw == "max" else max)(nums)
            out = torch.clamp(out, **{clamp_kw: c})
        return out

    return f


def _t_heaviside(x, h=0.5):
    if not isinstance(x, torch.Tensor):
        return float(np.heaviside(x, h))
    return torch.where(x > 0, 1.0, torch.where(x < 0, 0.0, float(h))).to(x.dtype)


_NUMPY_FUNCS: dict[str, Callable] = {
    "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh, "sin": np.sin, "cos": np.cos,
    "Abs": np.abs, "sign": np.sign, "Min": _np_min, "Max": _np_max,
    "Heaviside": lambda x, h=0.5: np.heaviside(x, h), "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh,
}


def _torch_fn(name: str) -> Callable:
    def f(x):
        return getattr(torch, name)(x if isinstance(x, torch.Tensor) else torch.tensor(float(x)))

    return f


_TORCH_FUNCS: dict[str, Callable] = {
    "exp": _torch_fn("exp"), "log": _torch_fn("log"), "sqrt": _torch_fn("sqrt"), "tanh": _torch_fn("tanh"),
    "sin": _torch_fn("sin"), "cos": _torch_fn("cos"), "Abs": _torch_fn("abs"), "sign": _torch_fn("sign"),
    "atan": _torch_fn("atan"), "sinh": _torch_fn("sinh"), "cosh": _torch_fn("cosh"),
    "Min": _t_minmax(torch.minimum, "max"), "Max": _t_minmax(torch.maximum, "min"), "Heaviside": _t_heaviside,
}


def _code(expr: sp.Expr, names: Mapping[sp.Symbol, str]) -> str:
    if expr in names:
        return names[expr]
    if isinstance(expr, sp.Symbol):
        raise ValueError(f"symbol {expr} is not an input or parameter")
    if expr.is_number and not expr.free_symbols:
        return repr(float(expr))
    if isinstance(expr, sp.Add):
        return "(" + " + ".join(_code(a, names) for a in expr.args) + ")"
    if isinstance(expr, sp.Mul):
        return "(" + " * ".join(_code(a, names) for a in expr.args) + ")"
    if isinstance(expr, sp.Pow):
        b, e = expr.args
        if e == sp.Rational(1, 2):
            return f"F['sqrt']({_code(b, names)})"
        if e == -1:
            return f"(1.0 / {_code(b, names)})"
        if e.is_Integer:
            return f"({_code(b, names)} ** {int(e)})"
        return f"({_code(b, names)} ** {_code(e, names)})"
    fname = type(expr).__name__
    if fname in _NUMPY_FUNCS:
        return f"F[{fname!r}](" + ", ".join(_code(a, names) for a in expr.args) + ")"
    raise ValueError(f"cannot translate {fname} in {expr}; supported: {sorted(_NUMPY_FUNCS)}")


def _compile(expr: sp.Expr, args: Sequence[sp.Symbol], backend: str = "numpy") -> Callable:
    """A Python function of ``args`` (positional) evaluating ``expr`` with numpy or torch."""
    names = {s: f"_a{i}" for i, s in enumerate(args)}
    src = f"def _f({', '.join(names.values())}):\n    return {_code(sp.sympify(expr), names)}\n"
    ns: dict[str, Any] = {"F": _NUMPY_FUNCS if backend == "numpy" else _TORCH_FUNCS}
    exec(compile(src, "<adjointhydro.symbolic>", "exec"), ns)
    return ns["_f"]


def _round_expr(expr: sp.Expr, digits: int = 4) -> sp.Expr:
    """``expr`` with every float rounded to ``digits`` significant digits (for display)."""
    reps = {}
    for f in expr.atoms(sp.Float):
        v = float(f)
        reps[f] = sp.Float(float(f"{v:.{digits}g}"), digits) if v != 0 else sp.Integer(0)
    return expr.xreplace(reps)


def _complexity(expr: sp.Expr) -> int:
    """Number of nodes of the expression tree (symbols, numbers, operations); ``1/x`` counts as ``x``."""
    if isinstance(expr, sp.Pow) and expr.args[1] == -1:
        return _complexity(expr.args[0])
    if not expr.args:
        return 1
    return 1 + sum(_complexity(a) for a in expr.args)


def _nice(x: float) -> float:
    """``x`` rounded to 2 significant digits (reference storages in exponentials)."""
    if x == 0 or not math.isfinite(x):
        return 0.0
    return float(f"{x:.2g}")


# =============================================================================== samples
@dataclass
class FluxSamples:
    """A network flux evaluated at the inputs the model visited and on a grid over their box.

    Attributes:
        flux: flux name.
        inputs: input name -> values ``[n]`` (visited points first, then grid points).
        output: the network's rate at those points ``[n]``.
        visited: ``True`` for points the model visited (period starts), ``False`` for the grid.
        kinds: input name -> ``"store"``, ``"forcing"``, ``"parameter"`` or ``"flux"``.
        units: input name -> units string; ``output_units`` the flux's.
        source, target: the flux's wiring (store names or ``None``).
        model_stores: all stores of the model (for parameter names such as ``Smax_soil``).
        evaluate: the network as a function of a dict of input arrays (for extrapolation).
    """

    flux: str
    inputs: dict[str, np.ndarray]
    output: np.ndarray
    visited: np.ndarray
    kinds: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    output_units: str = ""
    source: str | None = None
    target: str | None = None
    model_stores: tuple[str, ...] = ()
    evaluate: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.inputs = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.inputs.items()}
        self.output = np.asarray(self.output, dtype=np.float64).reshape(-1)
        self.visited = np.asarray(self.visited, dtype=bool).reshape(-1)
        n = self.output.size
        for k, v in self.inputs.items():
            if v.size != n:
                raise ValueError(f"input {k!r} has {v.size} values, output has {n}")
        if self.visited.size != n:
            raise ValueError(f"visited has {self.visited.size} values, output has {n}")
        for k in self.inputs:
            self.kinds.setdefault(k, "store")
            self.units.setdefault(k, "")
        if not self.model_stores:
            self.model_stores = tuple(k for k in self.inputs if self.kinds[k] == "store")

    @classmethod
    def from_arrays(
        cls,
        inputs: Mapping[str, Any],
        output: Any,
        *,
        flux: str = "flux",
        kinds: Mapping[str, str] | None = None,
        units: Mapping[str, str] | None = None,
        output_units: str = "",
        evaluate: Callable | None = None,
    ) -> "FluxSamples":
        """Samples from plain arrays (all points count as visited; inputs default to stores)."""
        y = np.asarray(output, dtype=np.float64).reshape(-1)
        return cls(flux, {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}, y,
                   np.ones(y.size, bool), dict(kinds or {}), dict(units or {}), output_units,
                   evaluate=evaluate)

    @property
    def n_visited(self) -> int:
        return int(self.visited.sum())

    def varying(self, tol: float = 1e-9) -> list[str]:
        """Inputs that vary over the visited points (constants cannot be identified)."""
        out = []
        for k, v in self.inputs.items():
            x = v[self.visited] if self.visited.any() else v
            if x.size and np.ptp(x) > tol * (np.abs(x).max() + 1e-300):
                out.append(k)
        return out

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Range of each input over the visited points."""
        m = self.visited if self.visited.any() else np.ones_like(self.visited)
        return {k: (float(v[m].min()), float(v[m].max())) for k, v in self.inputs.items()}

    def medians(self) -> dict[str, float]:
        m = self.visited if self.visited.any() else np.ones_like(self.visited)
        return {k: float(np.median(v[m])) for k, v in self.inputs.items()}

    def subset(self, mask: np.ndarray) -> "FluxSamples":
        mask = np.asarray(mask)
        return FluxSamples(self.flux, {k: v[mask] for k, v in self.inputs.items()}, self.output[mask],
                           self.visited[mask], dict(self.kinds), dict(self.units), self.output_units,
                           self.source, self.target, self.model_stores, self.evaluate)

    def summary(self) -> dict[str, Any]:
        b = self.bounds()
        return {
            "flux": self.flux,
            "n_visited": self.n_visited,
            "n_grid": int((~self.visited).sum()),
            "inputs": {k: {"kind": self.kinds[k], "units": self.units[k], "min": b[k][0], "max": b[k][1]}
                       for k in self.inputs},
            "output": {"units": self.output_units,
                       "min": float(self.output[self.visited].min()) if self.n_visited else None,
                       "max": float(self.output[self.visited].max()) if self.n_visited else None},
        }


def _parameter_rows(model: Model, parameters: Any, n_basins: int, dtype: torch.dtype) -> torch.Tensor:
    """Physical parameters ``[basin, P]`` as :func:`~adjointhydro.solve.solve` would use them."""
    if parameters is None:
        p = model.physical_parameters().detach()
    elif isinstance(parameters, Mapping):
        base = model.physical_parameters().detach()
        cols = []
        for j, name in enumerate(model.parameter_names):
            if name in parameters:
                cols.append(torch.as_tensor(parameters[name], dtype=torch.float64).reshape(-1).expand(n_basins))
            else:
                cols.append(base[:, j].expand(n_basins))
        p = torch.stack(cols, -1) if cols else torch.zeros(n_basins, 0, dtype=torch.float64)
    else:
        p = torch.as_tensor(parameters, dtype=torch.float64).detach()
    if p.ndim == 1:
        p = p[None]
    return p.to(dtype).expand(n_basins, -1)


def _flux_module_and_column(model: Model, name: str) -> tuple[nn.Module, int | None]:
    mod = model.flux(name)
    if isinstance(mod, NeuralFluxGroup):
        return mod, mod.names.index(name)
    return mod, None


def _module_inputs(mod: nn.Module) -> list[str]:
    """Declared inputs of a flux module plus stores read by its ``limit_by`` (and variables it partitions)."""
    names = list(getattr(mod, "inputs", ()))
    for s in [*(getattr(mod, "limit_by", ()) or ()), *(getattr(mod, "partition", None) or {})]:
        if s is not None and s not in names:
            names.append(s)
    return names


def _flux_dtype(model: Model) -> torch.dtype:
    w = [p for f in model.neural_fluxes() for p in f.parameters()]
    return w[0].dtype if w else torch.float64


def sample_flux(
    model: Model,
    flux_name: str,
    solution: Any,
    forcing: Forcing,
    parameters: Any = None,
    *,
    grid_points: int = 1500,
    max_visited: int = 3000,
    substeps: int = 1,
    seed: int = 0,
) -> FluxSamples:
    """Evaluate flux ``flux_name`` of ``model`` where the model went, and on a grid.

    Visited points: the stores at each period start of ``solution`` (with
    ``substeps > 1`` also linearly interpolated states within each period), the
    forcing of that period and the parameters; earlier fluxes the network reads
    are computed by the model there. At most ``max_visited`` points are kept (a
    random subset). Grid points: a regular grid (up to 3 varying inputs, else
    uniform random points) over the bounding box of the visited inputs.

    Args:
        model: the (hybrid) model; the flux may be a :class:`NeuralFlux`, a member
            of a :class:`NeuralFluxGroup` or any other flux module with declared ``inputs``.
        solution: the model's :class:`~adjointhydro.solve.Solution` over ``forcing``.
        forcing: the forcing the solution was computed with.
        parameters: physical parameters as given to ``solve`` (default: the model's).
    """
    mod, col = _flux_module_and_column(model, flux_name)
    in_names = _module_inputs(mod)
    if not in_names:
        raise ValueError(f"flux {flux_name!r} declares no inputs; only fluxes with declared inputs can be sampled")
    dtype = _flux_dtype(model)
    Y = solution.stores.detach().to(torch.float64)
    B, T = forcing.n_basins, forcing.n_steps
    if Y.shape[0] != B or Y.shape[1] != T + 1:
        raise ValueError(
            f"solution stores have shape {tuple(Y.shape)} but forcing has {B} basins and {T} periods "
            f"(expected [{B}, {T + 1}, stores]); pass the forcing the solution was computed with"
        )
    subs = max(1, int(substeps))
    starts, ends = Y[:, :-1], Y[:, 1:]
    states = torch.stack([starts + (ends - starts) * (j / subs) for j in range(subs)], 2)  # [B,T,subs,n]
    fidx = [forcing.index(n) for n in model.forcing_names]
    fv = forcing.values.detach().to(torch.float64)[..., fidx][:, :, None].expand(B, T, subs, len(fidx))
    P = _parameter_rows(model, parameters, B, torch.float64)
    pv = P[:, None, None].expand(B, T, subs, P.shape[-1])
    R = B * T * subs
    states, fv, pv = states.reshape(R, -1), fv.reshape(R, -1), pv.reshape(R, -1)
    rng = np.random.default_rng(seed)
    if R > max_visited:
        keep = torch.as_tensor(np.sort(rng.choice(R, max_visited, replace=False)))
        states, fv, pv = states[keep], fv[keep], pv[keep]
    with torch.no_grad():
        fvars = Vars(zip(model.forcing_names, fv.to(dtype).unbind(-1)))
        pvars = Vars(zip(model.parameter_names, pv.to(dtype).unbind(-1)))
        F = model.fluxes(states.to(dtype), fvars, pvars).to(torch.float64)
    allv: dict[str, np.ndarray] = {}
    allv.update({n: states[:, i].numpy() for i, n in enumerate(model.store_names)})
    allv.update({n: fv[:, i].numpy() for i, n in enumerate(model.forcing_names)})
    allv.update({n: pv[:, i].numpy() for i, n in enumerate(model.parameter_names)})
    allv.update({n: F[:, i].numpy() for i, n in enumerate(model.flux_names)})
    missing = [n for n in in_names if n not in allv]
    if missing:
        raise ValueError(f"flux {flux_name!r} reads {missing}, unknown to the model")
    vis_in = {n: allv[n].copy() for n in in_names}
    vis_out = allv[flux_name].copy()

    def evaluate(inputs: Mapping[str, Any]) -> np.ndarray:
        arrs = {n: np.asarray(inputs[n], dtype=np.float64) for n in in_names}
        shape = np.broadcast_shapes(*(a.shape for a in arrs.values()))
        v = Vars({n: torch.as_tensor(np.broadcast_to(a, shape).reshape(-1).copy(), dtype=dtype)
                  for n, a in arrs.items()})
        with torch.no_grad():
            r = mod.forward(v)
        if col is not None:
            r = r[..., col]
        return r.detach().to(torch.float64).numpy().reshape(shape)

    # grid over the bounding box of the varying inputs; the others at their (constant) value
    kinds = {}
    for n in in_names:
        kinds[n] = ("store" if n in model.store_names else "forcing" if n in model.forcing_names
                    else "parameter" if n in model.parameter_names else "flux")
    tmp = FluxSamples(flux_name, vis_in, vis_out, np.ones(vis_out.size, bool), dict(kinds))
    varying = tmp.varying()
    grid: dict[str, np.ndarray] = {}
    if varying and grid_points > 0:
        d = len(varying)
        lo = {n: float(vis_in[n].min()) for n in varying}
        hi = {n: float(vis_in[n].max()) for n in varying}
        if d <= 3:
            k = max(3, min(400, int(round(grid_points ** (1.0 / d)))))
            axes = [np.linspace(lo[n], hi[n], k) for n in varying]
            mesh = np.meshgrid(*axes, indexing="ij")
            grid = {n: m.reshape(-1) for n, m in zip(varying, mesh)}
        else:
            grid = {n: rng.uniform(lo[n], hi[n], grid_points) for n in varying}
        m = next(iter(grid.values())).size
        for n in in_names:
            if n not in grid:
                grid[n] = np.full(m, float(np.median(vis_in[n])))
        gout = evaluate(grid)
    else:
        grid = {n: np.zeros(0) for n in in_names}
        gout = np.zeros(0)
    units = {}
    spec_units = {s.name: s.units for s in model.stores}
    spec_units.update({p.name: p.units for p in model.parameters_spec})
    spec_units.update(dict(zip(model.flux_names, model.flux_units())))
    if forcing.units:
        spec_units.update({n: u for n, u in zip(forcing.names, forcing.units)})
    for n in in_names:
        units[n] = spec_units.get(n, "")
    return FluxSamples(
        flux=flux_name,
        inputs={n: np.concatenate([vis_in[n], grid[n]]) for n in in_names},
        output=np.concatenate([vis_out, gout]),
        visited=np.concatenate([np.ones(vis_out.size, bool), np.zeros(gout.size, bool)]),
        kinds=kinds,
        units=units,
        output_units=dict(zip(model.flux_names, model.flux_units())).get(flux_name, ""),
        source=dict((w[0], w[1]) for w in model.wiring)[flux_name],
        target=dict((w[0], w[2]) for w in model.wiring)[flux_name],
        model_stores=tuple(model.store_names),
        evaluate=evaluate,
    )


# =============================================================================== candidates
@dataclass
class Candidate:
    """One closed-form expression fitted to a flux.

    Attributes:
        flux: the flux it describes.
        template: sympy expression in input symbols and parameter symbols.
        parameters: fitted parameter values (name -> value), ``std_errors`` their
            standard errors under the fixed noise model, ``parameter_units`` units
            implied by the form (strings; ``""`` where unknown).
        fixed: parameters held fixed (e.g. a shared ``Smax`` from a joint fit).
        method: ``"catalogue"``, ``"sparse"``, ``"exhaustive"``, ``"log-space"`` or ``"joint"``.
        form: a name for the form, e.g. ``"power law"``.
        n_params, complexity: number of fitted parameters and expression-tree nodes.
        r2, rmse: of the fit to the network samples (unweighted, on the fit points).
        chi2: weighted sum of squares with the fixed noise; ``aicc``, ``bic`` the criteria.
        flags: identifiability problems (relative SE > 1, or a pair of parameters that
            trade off exactly); ``notes``: strong correlations (> 0.99) that still
            leave both parameters determined.
        dimension_ok, dimension: units check of the form (see :func:`expression_dimension`).
    """

    flux: str
    template: sp.Expr
    parameters: dict[str, float]
    std_errors: dict[str, float]
    method: str
    form: str
    n_params: int
    complexity: int
    r2: float
    rmse: float
    chi2: float
    aicc: float
    bic: float
    n: int
    n_eff: float
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    correlation: np.ndarray | None = field(default=None, repr=False)
    parameter_units: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, float] = field(default_factory=dict)
    dimension_ok: bool | None = None
    dimension: str = ""
    priority: int = 1000
    _fn: Callable | None = field(default=None, repr=False, compare=False)

    @property
    def expression(self) -> sp.Expr:
        """The expression with numbers for every parameter (input symbols only)."""
        vals = {_sym(k): sp.Float(v) for k, v in {**self.fixed, **self.parameters}.items()}
        return self.template.xreplace(vals)

    @property
    def inputs(self) -> tuple[str, ...]:
        pn = set(self.parameters) | set(self.fixed)
        return tuple(sorted(str(s) for s in self.template.free_symbols if str(s) not in pn))

    @property
    def latex(self) -> str:
        return sp.latex(_round_expr(self.expression))

    @property
    def template_latex(self) -> str:
        return sp.latex(self.template)

    @property
    def identifiable(self) -> bool:
        return not self.flags

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Evaluate the expression on arrays of its inputs (by name)."""
        if self._fn is None:
            self._fn = _compile(self.expression, [_sym(n) for n in self.inputs], "numpy")
        args = [np.asarray(inputs[n], dtype=np.float64) for n in self.inputs]
        with np.errstate(all="ignore"):
            out = self._fn(*args)
        shape = np.broadcast_shapes(*(a.shape for a in args)) if args else np.shape(next(iter(inputs.values()), 0))
        return np.broadcast_to(np.asarray(out, dtype=np.float64), shape).copy()

    def text(self, digits: int = 4) -> str:
        return str(_round_expr(self.expression, digits))

    def __str__(self) -> str:
        return f"{self.flux} = {self.text()}"

    def parameter_table(self) -> list[dict[str, Any]]:
        rows = []
        for k, v in self.parameters.items():
            se = self.std_errors.get(k, float("nan"))
            rows.append({"name": k, "value": v, "std_error": se,
                         "relative_se": abs(se / v) if v else float("inf"),
                         "units": self.parameter_units.get(k, "")})
        for k, v in self.fixed.items():
            rows.append({"name": k, "value": v, "std_error": 0.0, "relative_se": 0.0,
                         "units": self.parameter_units.get(k, ""), "fixed": True})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "flux": self.flux,
            "expression": self.text(6),
            "latex": self.latex,
            "template": str(self.template),
            "form": self.form,
            "method": self.method,
            "parameters": self.parameter_table(),
            "n_params": self.n_params,
            "complexity": self.complexity,
            "r2": self.r2,
            "rmse": self.rmse,
            "chi2": self.chi2,
            "aicc": self.aicc,
            "bic": self.bic,
            "n": self.n,
            "n_eff": self.n_eff,
            "identifiable": self.identifiable,
            "flags": list(self.flags),
            "notes": list(self.notes),
            "dimension_ok": self.dimension_ok,
            "dimension": self.dimension,
        }


@dataclass
class _FitData:
    """Fit points: inputs by name, network output, per-point noise std, effective sample size."""

    X: dict[str, np.ndarray]
    y: np.ndarray
    sigma: np.ndarray
    n_eff: float
    units: dict[str, str] = field(default_factory=dict)
    output_units: str = ""
    flux: str = "flux"
    noise_std: float = 0.0


def _fit_data(samples: FluxSamples, noise_std: float | None, rel_noise: float, n_eff: float | None,
              max_points: int, fit_on: str, seed: int) -> _FitData:
    if fit_on == "visited" and samples.n_visited > 0:
        mask = samples.visited
    elif fit_on == "grid" and (~samples.visited).any():
        mask = ~samples.visited
    else:
        mask = np.ones(samples.output.size, bool)
    idx = np.flatnonzero(mask & np.isfinite(samples.output))
    if idx.size > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    y = samples.output[idx]
    X = {k: v[idx] for k, v in samples.inputs.items()}
    if noise_std is None:
        spread = float(np.std(y))
        noise_std = 0.01 * (spread if spread > 0 else max(float(np.abs(y).mean()), 1e-12))
    sigma = np.sqrt(float(noise_std) ** 2 + (rel_noise * y) ** 2)
    sigma = np.maximum(sigma, 1e-300)
    n = y.size
    ne = float(min(n, DEFAULT_N_EFF if n_eff is None else n_eff))
    return _FitData(X, y, sigma, ne, dict(samples.units), samples.output_units, samples.flux, float(noise_std))


def _covariance(J: np.ndarray) -> np.ndarray:
    """``(J^T J)^-1`` via SVD; directions with (numerically) zero curvature get huge variance."""
    if J.size == 0:
        return np.zeros((J.shape[1], J.shape[1]))
    _, s, Vt = np.linalg.svd(J, full_matrices=False)
    s = np.maximum(s, (s[0] if s.size and s[0] > 0 else 1.0) * 1e-15)
    return (Vt.T / s**2) @ Vt


def _identifiability(names: Sequence[str], values: np.ndarray, se: np.ndarray,
                     corr: np.ndarray) -> tuple[list[str], list[str]]:
    """Flags (not identifiable: relative SE > 1, or a degenerate pair) and notes (|correlation| > 0.99)."""
    flags, notes = [], []
    for i, n in enumerate(names):
        rel = se[i] / abs(values[i]) if values[i] != 0 else np.inf
        if not np.isfinite(rel) or rel > _REL_SE_LIMIT:
            flags.append(f"{n} not identifiable (relative SE {rel:.2g})")
    for i, j in itertools.combinations(range(len(names)), 2):
        c = corr[i, j]
        if abs(c) > _CORR_DEGENERATE:
            flags.append(f"{names[i]} and {names[j]} not separately identifiable (correlation {c:+.7f})")
        elif abs(c) > _CORR_NOTE:
            notes.append(f"{names[i]} and {names[j]} strongly correlated ({c:+.4f})")
    return flags, notes


def _param_units_str(pu: Mapping[str, sp.Expr | None] | None) -> dict[str, str]:
    out = {}
    for k, v in (pu or {}).items():
        out[k] = "" if v is None else ("-" if v == 1 else str(v))
    return out


def _finish_candidate(
    template: sp.Expr, pnames: Sequence[str], values: np.ndarray, J: np.ndarray, data: _FitData, *,
    method: str, form: str, fixed: Mapping[str, float] | None = None,
    param_units: Mapping[str, sp.Expr | None] | None = None, pred: np.ndarray | None = None,
) -> Candidate | None:
    fixed = dict(fixed or {})
    values = np.asarray(values, dtype=np.float64)
    if pred is None:
        pred = _predict_template(template, pnames, values, data.X, fixed)
    if not np.all(np.isfinite(pred)):
        return None
    res = data.y - pred
    chi2 = float(np.sum((res / data.sigma) ** 2))
    n, k = data.y.size, len(pnames)
    ne = data.n_eff
    scale = ne / n
    ss_tot = float(np.sum((data.y - data.y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(res**2)) / ss_tot if ss_tot > 0 else (1.0 if np.allclose(res, 0) else -np.inf)
    aicc = chi2 * scale + 2 * k + (2 * k * (k + 1) / (ne - k - 1) if ne - k - 1 > 0 else np.inf)
    bic = chi2 * scale + k * math.log(ne)
    if k:
        cov = _covariance(J)
        se = np.sqrt(np.abs(np.diag(cov)))
        with np.errstate(all="ignore"):
            corr = cov / np.outer(se, se)
        corr = np.nan_to_num(corr, nan=0.0)
        flags, notes = _identifiability(pnames, values, se, corr)
    else:
        se, corr, flags, notes = np.zeros(0), np.zeros((0, 0)), [], []
    units = dict(data.units)
    for p, u in (param_units or {}).items():
        units[p] = u
    ok, msg = expression_dimension(template, units, data.output_units)
    return Candidate(
        flux=data.flux, template=template, parameters=dict(zip(pnames, map(float, values))),
        std_errors=dict(zip(pnames, map(float, se))), method=method, form=form, n_params=k,
        complexity=_complexity(template), r2=r2, rmse=float(np.sqrt(np.mean(res**2))), chi2=chi2,
        aicc=float(aicc), bic=float(bic), n=n, n_eff=ne, flags=flags, notes=notes, correlation=corr,
        parameter_units=_param_units_str(param_units), fixed=fixed, dimension_ok=ok, dimension=msg,
    )


_COMPILED: dict[tuple, tuple[Callable, list[sp.Symbol]]] = {}


def _compiled_template(template: sp.Expr, pnames: Sequence[str]) -> tuple[Callable, list[sp.Symbol]]:
    """numpy function of (inputs..., parameters...) and the input symbols, cached by structure."""
    key = (sp.srepr(template), tuple(pnames))
    hit = _COMPILED.get(key)
    if hit is None:
        psyms = [_sym(p) for p in pnames]
        ins = sorted((s for s in template.free_symbols if s not in psyms), key=str)
        hit = (_compile(template, ins + psyms), ins)
        if len(_COMPILED) > 2000:
            _COMPILED.clear()
        _COMPILED[key] = hit
    return hit


def _central_jacobian(fun: Callable[[np.ndarray], np.ndarray], p: np.ndarray) -> np.ndarray:
    """Jacobian of ``fun`` at ``p`` by central differences (error ~1e-10 relative).

    Accurate enough to expose exact trade-offs between parameters (singular
    values ~1e-10 of the largest), without symbolic differentiation.
    """
    p = np.asarray(p, dtype=np.float64)
    cols = []
    for i in range(p.size):
        h = 6e-6 * max(abs(p[i]), 1e-6)
        up, dn = p.copy(), p.copy()
        up[i] += h
        dn[i] -= h
        cols.append((fun(up) - fun(dn)) / (up[i] - dn[i]))
    return np.stack(cols, 1) if cols else np.zeros((fun(p).size, 0))


def _predict_template(template, pnames, values, X, fixed=None) -> np.ndarray:
    t = template.xreplace({_sym(k): sp.Float(v) for k, v in (fixed or {}).items()}) if fixed else template
    f, ins = _compiled_template(t, pnames)
    with np.errstate(all="ignore"):
        out = f(*[X[str(s)] for s in ins], *values)
    return np.broadcast_to(np.asarray(out, dtype=np.float64), next(iter(X.values())).shape).copy()


def _forward_jacobian(resid: Callable[[np.ndarray], np.ndarray]) -> tuple[Callable, Callable]:
    """``resid`` that remembers its last value, and a cheap forward-difference Jacobian using it."""
    last: dict[str, Any] = {}

    def fun(p):
        r = resid(p)
        last["p"], last["r"] = np.array(p, dtype=np.float64), r
        return r

    def jac(p):
        p = np.asarray(p, dtype=np.float64)
        r0 = last["r"] if "p" in last and np.array_equal(last["p"], p) else resid(p)
        cols = []
        for i in range(p.size):
            h = 1.5e-8 * max(abs(p[i]), 1e-6)
            q = p.copy()
            q[i] += h
            cols.append((resid(q) - r0) / (q[i] - p[i]))
        return np.stack(cols, 1)

    return fun, jac


def _least_squares(resid, p0, lo, hi, bounded: bool, max_iter: int):
    fun, jac = _forward_jacobian(resid)
    if bounded:
        return least_squares(fun, p0, jac=jac, bounds=(lo, hi), x_scale="jac", method="trf",
                             max_nfev=max_iter, xtol=1e-10, ftol=1e-10, gtol=1e-10)
    # MINPACK Levenberg-Marquardt: little overhead per iteration
    return least_squares(fun, p0, jac=jac, x_scale="jac", method="lm", max_nfev=max_iter,
                         xtol=1e-10, ftol=1e-10, gtol=1e-10)


def _fit_template(
    template: sp.Expr, pnames: Sequence[str], data: _FitData, starts: Sequence[Sequence[float]], *,
    lower: Sequence[float] | None = None, upper: Sequence[float] | None = None, method: str, form: str,
    fixed: Mapping[str, float] | None = None, param_units: Mapping[str, sp.Expr | None] | None = None,
    max_nfev: int | None = None,
) -> Candidate | None:
    """Weighted nonlinear least squares of ``template`` (several starts); ``None`` if every start fails."""
    fixed = dict(fixed or {})
    t = template.xreplace({_sym(k): sp.Float(v) for k, v in fixed.items()}) if fixed else template
    k = len(pnames)
    f, ins = _compiled_template(t, pnames)
    xs = [data.X[str(s)] for s in ins]
    y, w = data.y, 1.0 / data.sigma
    n = y.size
    if k == 0:
        return _finish_candidate(template, [], np.zeros(0), np.zeros((n, 0)), data, method=method, form=form,
                                 fixed=fixed, param_units=param_units)

    def resid(p):
        with np.errstate(all="ignore"):
            r = (np.broadcast_to(f(*xs, *p), y.shape) - y) * w
        return np.where(np.isfinite(r), r, 1e10)

    def jacobian(p):
        with np.errstate(all="ignore"):
            J = _central_jacobian(resid, p)
        return np.where(np.isfinite(J) & (np.abs(J) < 1e12), J, 0.0)

    lo = np.full(k, -np.inf) if lower is None else np.asarray(lower, dtype=np.float64)
    hi = np.full(k, np.inf) if upper is None else np.asarray(upper, dtype=np.float64)
    bounded = bool(np.isfinite(lo).any() or np.isfinite(hi).any()) or n < k
    best = None
    for p0 in starts:
        # strictly inside the bounds (least_squares requires it)
        with np.errstate(all="ignore"):
            lo_in = np.where(np.isfinite(lo), lo + 1e-9 * (np.abs(lo) + 1), lo)
            hi_in = np.where(np.isfinite(hi), hi - 1e-9 * (np.abs(hi) + 1), hi)
        p0 = np.clip(np.asarray(p0, dtype=np.float64), lo_in, hi_in)
        r0 = resid(p0)
        if not np.all(np.abs(r0) < 1e10):
            continue
        try:
            with np.errstate(all="ignore"):  # overflow in trial steps is handled by the solver
                sol = _least_squares(resid, p0, lo, hi, bounded, max_nfev or 40)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            continue
        if np.all(np.isfinite(sol.x)) and (best is None or sol.cost < best.cost):
            best = sol
    if best is None:
        return None
    return _finish_candidate(template, pnames, best.x, jacobian(best.x), data, method=method, form=form,
                             fixed=fixed, param_units=param_units)


# =============================================================================== catalogue
@dataclass
class Form:
    """A named parametric form of a flux.

    Attributes:
        name: e.g. ``"power law"``.
        template: sympy expression in input symbols (see :func:`_sym`) and parameter symbols.
        params: parameter names, in order.
        starts: starting values (several starts are tried).
        lower, upper: bounds (``None``: unbounded).
        param_units: parameter name -> units (sympy) implied by the form.
    """

    name: str
    template: sp.Expr
    params: tuple[str, ...]
    starts: list[list[float]]
    lower: list[float] | None = None
    upper: list[float] | None = None
    param_units: dict[str, sp.Expr | None] = field(default_factory=dict)


def _is_pet(name: str) -> bool:
    return name.lower() in _PET_NAMES


def _is_et(name: str) -> bool:
    n = name.lower()
    names = {"et", "aet", "ea", "e", "evap", "evaporation", "evapotranspiration", "transpiration"}
    return n in names or n.startswith("et")


def _u(units: Mapping[str, str], name: str) -> sp.Expr | None:
    return parse_units(units.get(name, ""))


def _div(a, b):
    return None if a is None or b is None else a / b


def catalogue(samples: FluxSamples, data: _FitData | None = None) -> list[Form]:
    """The catalogue of named hydrological forms for this flux's (varying) inputs.

    Stores ``S``: constant, linear reservoir, power law, exponential, exponential
    deficit (non-identifiable on its own), exponential + threshold excess,
    threshold, smooth step, saturating. Each driver (forcing, parameter or flux
    input) ``F``: ``F``, ``k*F``, and with each store ``F*S/Smax``,
    ``F*min(1, S/Smax)``, ``c*F*S/Smax`` (non-identifiable), ``k*F*S``,
    ``k*F*S**n``, ``a*F*exp(b*(S - S_ref))``. Pairs of stores: ``k*S1*S2``.
    """
    if data is None:
        data = _fit_data(samples, None, 0.01, None, 2000, "visited", 0)
    X, y = data.X, data.y
    out_u = parse_units(samples.output_units)
    varying = samples.varying()
    stores = [n for n in varying if samples.kinds.get(n) == "store"]
    drivers = [n for n in varying if samples.kinds.get(n) != "store"]
    taken = set(samples.inputs)
    multi = len(samples.model_stores) > 1
    ymean = float(np.mean(y)) if y.size else 1.0
    yabs = float(np.mean(np.abs(y))) or 1.0
    ymax = float(np.max(np.abs(y))) if y.size else 1.0

    def pn(base: str, store: str | None = None) -> str:
        return _free_name(f"{base}_{store}" if (multi and store) else base, taken)

    forms: list[Form] = [Form("constant", _sym("c"), ("c",), [[ymean]], param_units={"c": out_u})] \
        if "c" not in taken else []
    for s in stores:
        S = _sym(s)
        x = X[s]
        lo, hi = float(x.min()), float(x.max())
        rng = max(hi - lo, 1e-12)
        su = _u(samples.units, s)
        pos = lo > 0
        ref = _nice(hi)
        k_, n_, a_, b_ = pn("k", s), pn("n", s), pn("a", s), pn("b", s)
        Smax, Qmax, f_, S0, K_ = pn("Smax", s), pn("Qmax", s), pn("f", s), pn("S0", s), pn("K", s)
        mean_s = float(np.mean(x)) or 1.0
        forms.append(Form("linear reservoir", _sym(k_) * S, (k_,), [[ymean / mean_s]],
                          param_units={k_: _div(out_u, su)}))
        if pos:
            st = []
            for n0 in (0.5, 1.0, 2.0, 3.0):
                st.append([ymean / float(np.mean(x**n0)), n0])
            forms.append(Form("power law", _sym(k_) * S ** _sym(n_), (k_, n_), st,
                              param_units={k_: None, n_: sp.Integer(1)}))
        # exponential, centred at a reference storage for conditioning
        yref = float(np.median(y[x >= np.quantile(x, 0.9)])) if y.size else 1.0
        st = [[yref if yref != 0 else yabs, r / rng] for r in (0.5, 2.0, 5.0, -2.0)]
        forms.append(Form("exponential", _sym(a_) * sp.exp(_sym(b_) * (S - ref)), (a_, b_), st,
                          param_units={a_: out_u, b_: _div(sp.Integer(1), su)}))
        st = [[yref if yref != 0 else yabs, r / rng, hi] for r in (0.5, 2.0, 5.0)]
        forms.append(Form("exponential deficit", _sym(Qmax) * sp.exp(-_sym(f_) * (_sym(Smax) - S)), (Qmax, f_, Smax),
                          st, param_units={Qmax: out_u, f_: _div(sp.Integer(1), su), Smax: su}))
        k2 = pn("k2", s)
        st = [[yref if yref != 0 else yabs, r / rng, 0.0, lo + q * rng] for r in (1.0, 4.0) for q in (0.5, 0.9)]
        forms.append(Form("exponential + threshold excess",
                          _sym(a_) * sp.exp(_sym(b_) * (S - ref)) + _sym(k2) * sp.Max(S - _sym(S0), 0),
                          (a_, b_, k2, S0), st, [-np.inf, -60 / rng, -np.inf, lo], [np.inf, 60 / rng, np.inf, hi],
                          param_units={a_: out_u, b_: _div(sp.Integer(1), su), k2: _div(out_u, su), S0: su}))
        st = [[ymax / (rng * (1 - q) + 1e-12), lo + q * rng] for q in (0.1, 0.5, 0.8)]
        forms.append(Form("threshold", _sym(k_) * sp.Max(S - _sym(S0), 0), (k_, S0), st,
                          [-np.inf, lo - rng], [np.inf, hi],
                          param_units={k_: _div(out_u, su), S0: su}))
        r_ = pn("r", s)
        st = [[ymax, sgn * 8.0 / rng, lo + q * rng] for sgn in (1, -1) for q in (0.3, 0.7)]
        forms.append(Form("smooth step", _sym(a_) / (1 + sp.exp(-_sym(r_) * (S - _sym(S0)))), (a_, r_, S0), st,
                          param_units={a_: out_u, r_: _div(sp.Integer(1), su), S0: su}))
        if pos:
            st = [[ymax * 2, q * (lo + hi)] for q in (0.25, 1.0, 4.0)]
            forms.append(Form("saturating", _sym(a_) * S / (S + _sym(K_)), (a_, K_), st,
                              [-np.inf, 1e-9], [np.inf, np.inf],
                              param_units={a_: out_u, K_: su}))
    for d in drivers:
        Fs = _sym(d)
        fu = _u(samples.units, d)
        fmean = float(np.mean(X[d])) or 1.0
        c_ = pn("c")
        forms.append(Form(f"{d}", Fs, (), [[]], param_units={}))
        forms.append(Form(f"k*{d}", _sym(pn("k")) * Fs, (pn("k"),), [[ymean / fmean]],
                          param_units={pn("k"): _div(out_u, fu)}))
        for s in stores:
            S = _sym(s)
            x = X[s]
            lo, hi = float(x.min()), float(x.max())
            rng = max(hi - lo, 1e-12)
            su = _u(samples.units, s)
            Smax, k_, n_, a_, b_ = pn("Smax", s), pn("k", s), pn("n", s), pn("a", s), pn("b", s)
            fs = X[d] * x
            ratio = float(np.sum(fs * fs) / max(np.sum(fs * y), 1e-300)) if np.sum(fs * y) > 0 else hi
            st = [[ratio], [hi], [2 * hi]]
            forms.append(Form(f"{d}*{s}/Smax", Fs * S / _sym(Smax), (Smax,), st, param_units={Smax: su}))
            forms.append(Form(f"{d}*min(1, {s}/Smax)", Fs * sp.Min(1, S / _sym(Smax)), (Smax,),
                              [[ratio], [hi], [0.5 * (lo + hi)]], [lo * 0 + 1e-9], [np.inf], param_units={Smax: su}))
            forms.append(Form(f"c*{d}*{s}/Smax", _sym(c_) * Fs * S / _sym(Smax), (c_, Smax),
                              [[1.0, ratio], [0.5, ratio / 2]],
                              param_units={c_: _div(out_u, fu), Smax: su}))
            forms.append(Form(f"k*{d}*{s}", _sym(k_) * Fs * S, (k_,), [[1.0 / ratio]],
                              param_units={k_: _div(out_u, None if fu is None or su is None else fu * su)}))
            if lo > 0:
                st = [[ymean / float(np.mean(X[d] * x**n0)), n0] for n0 in (0.5, 1.0, 2.0)]
                forms.append(Form(f"k*{d}*{s}**n", _sym(k_) * Fs * S ** _sym(n_), (k_, n_), st,
                                  param_units={k_: None, n_: sp.Integer(1)}))
            ref = _nice(hi)
            st = [[ymean / fmean, r / rng] for r in (0.5, 2.0, 5.0, -2.0)]
            forms.append(Form(f"a*{d}*exp(b*{s})", _sym(a_) * Fs * sp.exp(_sym(b_) * (S - ref)), (a_, b_), st,
                              param_units={a_: _div(out_u, fu), b_: _div(sp.Integer(1), su)}))
    for s1, s2 in itertools.combinations(stores, 2):
        k_ = pn("k")
        prod = X[s1] * X[s2]
        st = [[float(np.sum(prod * y) / max(np.sum(prod * prod), 1e-300))]]
        u1, u2 = _u(samples.units, s1), _u(samples.units, s2)
        forms.append(Form("mass action", _sym(k_) * _sym(s1) * _sym(s2), (k_,), st,
                          param_units={k_: _div(out_u, None if u1 is None or u2 is None else u1 * u2)}))
    return forms


def fit_form(form: Form, samples: FluxSamples | _FitData, *, noise_std: float | None = None,
             rel_noise: float = 0.01, n_eff: float | None = None, fixed: Mapping[str, float] | None = None,
             max_points: int = 2000, seed: int = 0) -> Candidate | None:
    """Fit one :class:`Form` to flux samples; parameters in ``fixed`` are held at the given values."""
    data = samples if isinstance(samples, _FitData) else _fit_data(samples, noise_std, rel_noise, n_eff,
                                                                 max_points, "visited", seed)
    fixed = dict(fixed or {})
    keep = [i for i, p in enumerate(form.params) if p not in fixed]
    names = [form.params[i] for i in keep]
    starts = [[s[i] for i in keep] for s in form.starts] or [[]]
    lo = None if form.lower is None else [form.lower[i] for i in keep]
    hi = None if form.upper is None else [form.upper[i] for i in keep]
    return _fit_template(form.template, names, data, starts, lower=lo, upper=hi, method="catalogue",
                         form=form.name, fixed=fixed, param_units=form.param_units)


def fit_catalogue(samples: FluxSamples, *, noise_std: float | None = None, rel_noise: float = 0.01,
                  n_eff: float | None = None, forms: Sequence[Form] | None = None, max_points: int = 2000,
                  seed: int = 0, data: _FitData | None = None) -> list[Candidate]:
    """Fit every catalogue form (or ``forms``); candidates sorted by BIC."""
    data = data or _fit_data(samples, noise_std, rel_noise, n_eff, max_points, "visited", seed)
    out = []
    for i, fm in enumerate(forms if forms is not None else catalogue(samples, data)):
        c = fit_form(fm, data)
        if c is not None:
            c.priority = i  # ties between equal fits go to the form listed first
            out.append(c)
    return sorted(out, key=lambda c: c.bic)


# =============================================================================== joint fits
@dataclass
class JointFit:
    """Forms of several fluxes fitted together with shared parameters.

    Attributes:
        candidates: flux -> :class:`Candidate` (parameters and standard errors from the joint fit).
        shared: names of the shared parameters.
        chi2, bic, aicc: of the joint fit (criteria with the summed effective sample size).
        separate_bic: sum of the fluxes' separate BICs of the same forms (for comparison).
        flags: identifiability flags of the joint fit.
    """

    candidates: dict[str, Candidate]
    shared: tuple[str, ...]
    chi2: float
    bic: float
    aicc: float
    separate_bic: float
    flags: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"shared": list(self.shared), "chi2": self.chi2, "bic": self.bic, "aicc": self.aicc,
                "separate_bic": self.separate_bic, "flags": list(self.flags),
                "candidates": {k: c.to_dict() for k, c in self.candidates.items()}}


def fit_joint(
    samples: Mapping[str, FluxSamples | _FitData],
    forms: Mapping[str, Form | Candidate],
    shared: Sequence[str] | None = None,
    *,
    noise_std: Mapping[str, float] | float | None = None,
    rel_noise: float = 0.01,
    n_eff: float | None = None,
    max_points: int = 2000,
    seed: int = 0,
) -> JointFit:
    """Fit forms of several fluxes at once, parameters named alike being one parameter.

    Args:
        samples: flux -> samples (or prepared fit data).
        forms: flux -> :class:`Form` or fitted :class:`Candidate` (its template and values as start).
        shared: parameter names to share (default: every name used by more than one flux).

    Example: ET ``PET*soil/Smax`` and Q ``Qmax*exp(-f*(Smax - soil))`` share ``Smax``;
    alone, Q's ``Qmax`` and ``Smax`` are not identifiable, together they are.
    """
    with _single_threaded_blas():
        return _fit_joint(samples, forms, shared, noise_std, rel_noise, n_eff, max_points, seed)


def _fit_joint(samples, forms, shared, noise_std, rel_noise, n_eff, max_points, seed) -> JointFit:
    names = list(forms)
    data: dict[str, _FitData] = {}
    for n in names:
        s = samples[n]
        ns = noise_std.get(n) if isinstance(noise_std, Mapping) else noise_std
        data[n] = s if isinstance(s, _FitData) else _fit_data(s, ns, rel_noise, n_eff, max_points, "visited", seed)
    spec: dict[str, tuple[sp.Expr, tuple[str, ...], dict[str, float], dict[str, Any]]] = {}
    for n in names:
        fm = forms[n]
        if isinstance(fm, Candidate):
            start = {**fm.parameters, **fm.fixed}
            spec[n] = (fm.template, tuple(list(fm.parameters) + list(fm.fixed)), start,
                       {k: parse_units(v) if v else None for k, v in fm.parameter_units.items()})
        else:
            spec[n] = (fm.template, fm.params, dict(zip(fm.params, fm.starts[0] if fm.starts else [])), fm.param_units)
    counts: dict[str, int] = {}
    for n in names:
        for p in spec[n][1]:
            counts[p] = counts.get(p, 0) + 1
    shared = tuple(shared) if shared is not None else tuple(p for p, c in counts.items() if c > 1)
    # global parameter vector: shared once, others per flux (renamed flux:param to keep them apart)
    gnames: list[str] = list(shared)
    local: dict[str, list[tuple[str, str]]] = {}
    for n in names:
        local[n] = []
        for p in spec[n][1]:
            if p in shared:
                local[n].append((p, p))
            else:
                g = f"{n}:{p}"
                gnames.append(g)
                local[n].append((p, g))
    start = []
    for g in gnames:
        vals = [spec[n][2].get(p) for n in names for p, gg in local[n] if gg == g and spec[n][2].get(p) is not None]
        start.append(float(np.mean(vals)) if vals else 1.0)
    comp = {n: _compiled_template(spec[n][0], [p for p, _ in local[n]]) for n in names}
    gidx = {n: [gnames.index(g) for _, g in local[n]] for n in names}

    def resid(theta):
        out = []
        for n in names:
            f, ins = comp[n]
            d = data[n]
            with np.errstate(all="ignore"):
                r = (np.broadcast_to(f(*[d.X[str(s)] for s in ins], *theta[gidx[n]]), d.y.shape) - d.y) / d.sigma
            out.append(np.where(np.isfinite(r), r, 1e10))
        return np.concatenate(out)

    def jacobian(theta):
        with np.errstate(all="ignore"):
            J = _central_jacobian(resid, theta)
        return np.where(np.isfinite(J) & (np.abs(J) < 1e12), J, 0.0)

    with np.errstate(all="ignore"):
        sol = least_squares(resid, np.asarray(start), jac="2-point", x_scale="jac", method="trf",
                            max_nfev=200 * (len(gnames) + 1), xtol=1e-12, ftol=1e-12, gtol=1e-12)
    theta = sol.x
    J = jacobian(theta)
    cov = _covariance(J)
    se = np.sqrt(np.abs(np.diag(cov)))
    with np.errstate(all="ignore"):
        corr = np.nan_to_num(cov / np.outer(se, se))
    flags, _ = _identifiability(gnames, theta, se, corr)
    cands: dict[str, Candidate] = {}
    chi2 = 0.0
    ne_tot = 0.0
    sep_bic = 0.0
    for n in names:
        pn = [p for p, _ in local[n]]
        vals = theta[gidx[n]]
        row0 = sum(data[m].y.size for m in names[: names.index(n)])
        rows = J[row0: row0 + data[n].y.size][:, gidx[n]]
        label = forms[n].form if isinstance(forms[n], Candidate) else forms[n].name
        c = _finish_candidate(spec[n][0], pn, vals, rows, data[n], method="joint", form=f"joint: {label}",
                              param_units=spec[n][3])
        if c is None:
            continue
        # standard errors and flags from the joint covariance
        c.std_errors = {p: float(se[gnames.index(g)]) for p, g in local[n]}
        ii = [gnames.index(g) for _, g in local[n]]
        c.correlation = corr[np.ix_(ii, ii)]
        c.flags, c.notes = _identifiability(pn, vals, se[ii], corr[np.ix_(ii, ii)])
        cands[n] = c
        chi2 += c.chi2 * data[n].n_eff / data[n].y.size
        ne_tot += data[n].n_eff
        if isinstance(forms[n], Candidate):
            sep_bic += forms[n].bic
    k = len(gnames)
    bic = chi2 + k * math.log(max(ne_tot, 1.0))
    aicc = chi2 + 2 * k + (2 * k * (k + 1) / (ne_tot - k - 1) if ne_tot - k - 1 > 0 else np.inf)
    return JointFit(cands, tuple(shared), float(chi2), float(bic), float(aicc), float(sep_bic), flags)


# =============================================================================== library
@dataclass
class Term:
    """A library term: an expression of the inputs, possibly with one nonlinear rate.

    ``expr`` may contain the symbol ``rate`` (e.g. ``exp(rate*(S - 400))``) whose
    value is ``rate_value`` (a grid value, refined when the term is selected).
    """

    name: str
    expr: sp.Expr
    rate: sp.Symbol | None = None
    rate_value: float | None = None
    rate_bounds: tuple[float, float] = (-np.inf, np.inf)
    units: sp.Expr | None = None
    rate_units: sp.Expr | None = None

    def evaluate(self, X: Mapping[str, np.ndarray]) -> np.ndarray:
        e = self.expr if self.rate is None else self.expr.xreplace({self.rate: sp.Float(self.rate_value)})
        ins = sorted(e.free_symbols, key=str)
        f = _compile(e, ins)
        n = next(iter(X.values())).shape
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(*[X[str(s)] for s in ins]), dtype=np.float64), n).copy()


_RATE = sp.Symbol("__rate__", real=True)


def build_library(
    samples: FluxSamples,
    X: Mapping[str, np.ndarray] | None = None,
    *,
    degree: int = 3,
    powers: Sequence[float] = (0.5, 1.5),
    rates: Sequence[float] = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0, 8.0),
    forcing_products: bool = True,
) -> list[Term]:
    """Candidate terms for sparse regression, simplest first.

    Monomials of the varying inputs up to ``degree`` (1 included); ``x**p`` for
    positive inputs and ``p`` in ``powers``; ``exp(b*(S - S_ref))`` for each store
    with ``b = r / range(S)`` for ``r`` in ``rates`` (refined within 1.5 times the
    span of the grid when selected); with ``forcing_products`` the
    products of each driver (non-store input) with those exponentials.
    """
    X = X if X is not None else {k: v[samples.visited] for k, v in samples.inputs.items()}
    varying = samples.varying()
    stores = [n for n in varying if samples.kinds.get(n) == "store"]
    drivers = [n for n in varying if samples.kinds.get(n) != "store"]
    terms: list[Term] = [Term("1", sp.Integer(1), units=sp.Integer(1))]
    for deg in range(1, degree + 1):
        for combo in itertools.combinations_with_replacement(varying, deg):
            e = sp.Mul(*[_sym(c) for c in combo])
            terms.append(Term(str(e), e))
    for n in varying:
        if X[n].min() > 0:
            for p in powers:
                e = _sym(n) ** sp.Rational(p).limit_denominator(10)
                terms.append(Term(str(e), e))
    for s in stores:
        x = X[s]
        rng = max(float(np.ptp(x)), 1e-12)
        ref = _nice(float(x.max()))
        # refined rates stay within the grid's span (x1.5): steeper terms only fit single edge points
        rb = (1.5 * min(min(rates), 0.0) / rng, 1.5 * max(max(rates), 0.0) / rng) if rates else (0.0, 0.0)
        for r in rates:
            e = sp.exp(_RATE * (_sym(s) - ref))
            terms.append(Term(f"exp({r / rng:.3g}*({s} - {ref:g}))", e, _RATE, r / rng, rb))
            if forcing_products:
                for d in drivers:
                    terms.append(Term(f"{d}*exp({r / rng:.3g}*({s} - {ref:g}))", _sym(d) * e, _RATE, r / rng, rb))
    return terms


def _design(terms: Sequence[Term], X: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([t.evaluate(X) for t in terms], 1) if terms else np.zeros((next(iter(X.values())).size, 0))


def _prune(A: np.ndarray, terms: list[Term], tol: float = 1e-6) -> tuple[np.ndarray, list[Term]]:
    """Drop non-finite, all-zero and near-duplicate columns (|cos| > 1 - tol), keeping the simpler."""
    keep: list[int] = []
    normed: list[np.ndarray] = []
    for j in range(A.shape[1]):
        c = A[:, j]
        if not np.all(np.isfinite(c)):
            continue
        nrm = np.linalg.norm(c)
        if nrm == 0 or not np.isfinite(nrm):
            continue
        u = c / nrm
        if any(abs(float(u @ v)) > 1 - tol for v in normed):
            continue
        keep.append(j)
        normed.append(u)
    return A[:, keep], [terms[j] for j in keep]


def _support_candidate(terms: Sequence[Term], data: _FitData, coefs0: np.ndarray, method: str,
                       refine_rates: bool = True) -> Candidate | None:
    """Fit ``sum c_j * term_j`` (and refine the terms' rates); a :class:`Candidate`."""
    taken = set(data.X)
    expr = sp.Integer(0)
    pnames: list[str] = []
    starts: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    punits: dict[str, sp.Expr | None] = {}
    out_u = parse_units(data.output_units)
    for j, t in enumerate(terms, start=1):
        c = _free_name(f"c{j}", taken)
        pnames.append(c)
        starts.append(float(coefs0[j - 1]))
        lo.append(-np.inf)
        hi.append(np.inf)
        e = t.expr
        if t.rate is not None:
            b = _free_name(f"b{j}", taken)
            e = e.xreplace({t.rate: _sym(b)})
            if refine_rates:
                pnames.append(b)
                starts.append(float(t.rate_value))
                lo.append(t.rate_bounds[0])
                hi.append(t.rate_bounds[1])
                st = next((s for s in e.free_symbols if str(s) in data.X and data.units.get(str(s))), None)
                punits[b] = _div(sp.Integer(1), _u(data.units, str(st))) if st is not None else None
            else:
                e = e.xreplace({_sym(b): sp.Float(t.rate_value)})
        tu = _dim_or_none(e, data.units, exclude=set(pnames))
        punits[c] = _div(out_u, tu)
        expr = expr + _sym(c) * e
    name = " + ".join(t.name for t in terms)
    form = f"{len(terms)} term{'s' if len(terms) > 1 else ''}: {name}"
    if not any(t.rate is not None for t in terms) or not refine_rates:
        # linear in the coefficients: weighted least squares, exact Jacobian = weighted design
        A = np.stack([t.evaluate(data.X) for t in terms], 1)
        w = 1.0 / data.sigma
        coef, *_ = np.linalg.lstsq(A * w[:, None], data.y * w, rcond=None)
        return _finish_candidate(expr, pnames, coef, A * w[:, None], data, method=method, form=form,
                                 param_units=punits, pred=A @ coef)
    return _fit_template(expr, pnames, data, [starts], lower=lo, upper=hi, method=method, form=form,
                         param_units=punits)


def _dim_or_none(e: sp.Expr, units: Mapping[str, str], exclude: set[str]) -> sp.Expr | None:
    umap = {s: (None if str(s) in exclude else parse_units(units.get(str(s), ""))) for s in e.free_symbols}
    try:
        d = _dim(e, umap)
    except _DimensionError:
        return None
    return None if d is _FREE else d


def _weighted_system(terms: Sequence[Term], data: _FitData) -> tuple[np.ndarray, np.ndarray, list[Term], np.ndarray]:
    A = _design(terms, data.X)
    A, kept = _prune(A, list(terms))
    w = 1.0 / data.sigma
    Aw = A * w[:, None]
    norms = np.linalg.norm(Aw, axis=0)
    norms[norms == 0] = 1.0
    return Aw / norms, data.y * w, kept, norms


def _stlsq(A: np.ndarray, b: np.ndarray, threshold: float, ridge: float, max_iter: int = 25) -> np.ndarray:
    """Sequentially thresholded ridge least squares on standardised columns; returns the support mask."""
    p = A.shape[1]
    active = np.ones(p, bool)
    G, g = A.T @ A, A.T @ b
    bn = max(float(np.linalg.norm(b)), 1e-300)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xi = np.linalg.solve(G[np.ix_(idx, idx)] + ridge * np.eye(idx.size), g[idx]) / bn
        small = np.abs(xi) < threshold
        if not small.any():
            break
        active[idx[small]] = False
    return active


def sparse_regression(
    samples: FluxSamples | None = None, *, data: _FitData | None = None, terms: Sequence[Term] | None = None,
    thresholds: Sequence[float] | None = None, ridge: float = 1e-6, max_terms: int = 10,
    noise_std: float | None = None, rel_noise: float = 0.01, n_eff: float | None = None,
    max_points: int = 2000, seed: int = 0, library_kw: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """STLSQ over a sweep of thresholds; one refined candidate per distinct support.

    Rows are weighted by ``1/sigma_i`` (relative errors through ``rel_noise``),
    columns standardised to unit norm and the target to unit norm, so a threshold
    ``t`` drops terms contributing less than ``t`` of the signal. A small ridge
    keeps near-collinear columns (exponentials with close rates) from cancelling.
    """
    if data is None:
        data = _fit_data(samples, noise_std, rel_noise, n_eff, max_points, "visited", seed)
    if terms is None:
        terms = build_library(samples, data.X, **(library_kw or {}))
    A, b, kept, norms = _weighted_system(terms, data)
    thresholds = np.logspace(-4, -0.3, 20) if thresholds is None else thresholds
    supports: list[tuple[int, ...]] = []
    for t in thresholds:
        s = tuple(np.flatnonzero(_stlsq(A, b, float(t), ridge)))
        if 0 < len(s) <= max_terms and s not in supports:
            supports.append(s)
    out = []
    for s in supports:
        xi, *_ = np.linalg.lstsq(A[:, s], b, rcond=None)
        sel = [kept[i] for i in s]
        refine = sum(t.rate is not None for t in sel) <= 3
        c = _support_candidate(sel, data, xi / norms[list(s)], "sparse", refine_rates=refine)
        if c is not None:
            out.append(c)
    return sorted(out, key=lambda c: c.bic)


def exhaustive_search(
    samples: FluxSamples | None = None, *, data: _FitData | None = None, terms: Sequence[Term] | None = None,
    max_size: int = 3, keep: int = 4, max_combinations: int = 60000, noise_std: float | None = None,
    rel_noise: float = 0.01, n_eff: float | None = None, max_points: int = 2000, seed: int = 0,
    library_kw: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """Least squares on every support of 1..``max_size`` library terms; the ``keep`` best of each size refined.

    Supports of one and two terms are always searched exhaustively. When the
    larger supports would exceed ``max_combinations``, they are drawn from the
    terms that appear in the best 1- and 2-term supports (a screening step).
    """
    if data is None:
        data = _fit_data(samples, noise_std, rel_noise, n_eff, max_points, "visited", seed)
    if terms is None:
        terms = build_library(samples, data.X, **(library_kw or {}))
    A, b, kept, norms = _weighted_system(terms, data)
    p = A.shape[1]
    G, g, bb = A.T @ A, A.T @ b, float(b @ b)
    out = []
    pool = screened = np.arange(p)
    for size in range(1, min(max_size, p) + 1):
        if size > 2 and math.comb(pool.size, size) > max_combinations:
            pool = screened
            while pool.size > size and math.comb(pool.size, size) > max_combinations:
                pool = pool[:-1]
        combos = np.array(list(itertools.combinations(pool, size)), dtype=np.int64)
        if combos.size == 0:
            continue
        best_rss: list[np.ndarray] = []
        best_idx: list[np.ndarray] = []
        for chunk in np.array_split(combos, max(1, combos.shape[0] // 50000)):
            Gs = G[chunk[:, :, None], chunk[:, None, :]]
            gs = g[chunk]
            if size > 1:
                ev = np.linalg.eigvalsh(Gs)[:, 0]
                ok = ev > 1e-9
            else:
                ok = np.ones(chunk.shape[0], bool)
            Gs, gs, ch = Gs[ok], gs[ok], chunk[ok]
            if ch.size == 0:
                continue
            xi = np.linalg.solve(Gs, gs[..., None])[..., 0]
            rss = bb - np.sum(gs * xi, axis=1)
            best_rss.append(rss)
            best_idx.append(ch)
        if not best_rss:
            continue
        rss = np.concatenate(best_rss)
        idx = np.concatenate(best_idx)
        order = np.argsort(rss)
        if size <= 2:  # screening for larger supports: terms of the best small supports, best first
            seen = list(dict.fromkeys(int(j) for r in order[: 10 * p] for j in idx[r]))
            screened = np.array(seen if size == 1 else list(dict.fromkeys(list(screened) + seen)), dtype=np.int64)
        for r in order[:keep]:
            s = list(idx[r])
            xi, *_ = np.linalg.lstsq(A[:, s], b, rcond=None)
            c = _support_candidate([kept[i] for i in s], data, xi / norms[s], "exhaustive")
            if c is not None:
                out.append(c)
    return sorted(out, key=lambda c: c.bic)


def log_space_fit(
    samples: FluxSamples | None = None, *, data: _FitData | None = None, max_size: int = 3, keep: int = 3,
    snap: float = 0.1, noise_std: float | None = None, rel_noise: float = 0.01, n_eff: float | None = None,
    max_points: int = 2000, seed: int = 0,
) -> list[Candidate]:
    """For a strictly positive flux: ``log y`` linear in ``log x`` (positive inputs) and ``x`` (stores).

    Gives ``A * prod x**a * exp(sum b*(x - x_ref))``; the best supports of up to
    ``max_size`` terms are refitted in linear space, and again with exponents
    within ``snap`` of an integer or half-integer fixed there (fewer parameters).
    """
    if data is None:
        data = _fit_data(samples, noise_std, rel_noise, n_eff, max_points, "visited", seed)
    y = data.y
    if y.size < 3 or not np.all(y > 0):
        return []
    kinds = samples.kinds if samples is not None else {}
    varying = samples.varying() if samples is not None else list(data.X)
    cols: list[tuple[str, str, np.ndarray, float]] = []  # (kind, input, column, ref)
    for n in varying:
        x = data.X[n]
        if x.min() > 0:
            cols.append(("pow", n, np.log(x), 0.0))
        if kinds.get(n, "store") == "store":
            ref = _nice(float(x.max()))
            cols.append(("exp", n, x - ref, ref))
    if not cols:
        return []
    ly = np.log(y)
    w = y / data.sigma
    out = []
    taken = set(data.X)
    fits: list[tuple[float, tuple[int, ...], np.ndarray]] = []
    for size in range(1, min(max_size, len(cols)) + 1):
        for s in itertools.combinations(range(len(cols)), size):
            M = np.column_stack([np.ones_like(ly)] + [cols[i][2] for i in s]) * w[:, None]
            coef, *_ = np.linalg.lstsq(M, ly * w, rcond=None)
            rss = float(np.sum((M @ coef - ly * w) ** 2))
            fits.append((rss, s, coef))
    fits.sort(key=lambda t: t[0])
    for rss, s, coef in fits[: keep * max_size]:
        for snapped in (False, True):
            expr = _sym(_free_name("A", taken))
            pnames = [str(expr)]
            starts = [float(np.exp(coef[0]))]
            fixed_any = False
            for j, i in enumerate(s, start=1):
                kind, n, _, ref = cols[i]
                val = float(coef[j])
                if kind == "pow":
                    r = round(val * 2) / 2
                    if snapped and abs(val - r) < snap:
                        expr = expr * _sym(n) ** sp.nsimplify(r)
                        fixed_any = True  # the amplitude absorbs the change when refitted
                        continue
                    a = _free_name(f"a{j}", taken)
                    expr = expr * _sym(n) ** _sym(a)
                else:
                    a = _free_name(f"b{j}", taken)
                    expr = expr * sp.exp(_sym(a) * (_sym(n) - ref))
                pnames.append(a)
                starts.append(val)
            if snapped and not fixed_any:
                continue
            c = _fit_template(expr, pnames, data, [starts], method="log-space",
                              form="log-space " + ("(snapped) " if snapped else "") + str(expr))
            if c is not None:
                out.append(c)
    return sorted(out, key=lambda c: c.bic)


# =============================================================================== regressor
def _key(c: Candidate) -> str:
    """Structure of a candidate with every parameter replaced by one symbol (for de-duplication)."""
    theta = sp.Symbol("theta")
    names = set(c.parameters) | set(c.fixed)
    e = c.template.xreplace({s: theta for s in c.template.free_symbols if str(s) in names})
    return sp.srepr(e)


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates not beaten by a simpler one: each has a lower RMSE than every candidate of lower complexity."""
    front: list[Candidate] = []
    best = np.inf
    for c in sorted(candidates, key=lambda c: (c.complexity, c.rmse)):
        if c.rmse < best * (1 - 1e-9):
            front.append(c)
            best = c.rmse
    return front


class FluxRegressor:
    """pysindy-style symbolic regression of one flux: ``fit``, ``print``, ``predict``.

    Args:
        noise_std: absolute noise std of the flux (same units); default 1% of the
            spread of the fitted samples.
        rel_noise: relative noise, ``sigma_i = sqrt(noise_std**2 + (rel_noise*y_i)**2)``.
        n_eff: effective number of independent samples for the criteria (default
            :data:`DEFAULT_N_EFF`).
        criterion: ``"bic"`` (default) or ``"aicc"`` ranks the candidates.
        selection: ``"parsimonious"`` (default) or ``"ic"``, see :func:`select`.
        methods: any of ``"catalogue"``, ``"sparse"``, ``"exhaustive"``, ``"log"``.
        degree, rates, powers: the sparse library (see :func:`build_library`).
        max_terms: largest support of the exhaustive search.
        max_points: at most this many samples are fitted (a random subset).
        fit_on: ``"visited"`` (default), ``"grid"`` or ``"all"`` samples.
    """

    def __init__(
        self,
        noise_std: float | None = None,
        rel_noise: float = 0.01,
        n_eff: float | None = None,
        criterion: str = "bic",
        selection: str = "parsimonious",
        methods: Sequence[str] = ("catalogue", "sparse", "exhaustive", "log"),
        degree: int = 3,
        rates: Sequence[float] = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0, 8.0),
        powers: Sequence[float] = (0.5, 1.5),
        max_terms: int = 3,
        thresholds: Sequence[float] | None = None,
        ridge: float = 1e-6,
        max_points: int = 1500,
        fit_on: str = "visited",
        seed: int = 0,
    ) -> None:
        if criterion not in ("bic", "aicc"):
            raise ValueError(f"criterion must be 'bic' or 'aicc', got {criterion!r}")
        unknown = set(methods) - {"catalogue", "sparse", "exhaustive", "log"}
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}")
        self.noise_std = noise_std
        self.rel_noise = rel_noise
        self.n_eff = n_eff
        self.criterion = criterion
        self.selection = selection
        self.methods = tuple(methods)
        self.library_kw = {"degree": degree, "rates": tuple(rates), "powers": tuple(powers)}
        self.max_terms = max_terms
        self.thresholds = thresholds
        self.ridge = ridge
        self.max_points = max_points
        self.fit_on = fit_on
        self.seed = seed
        self.candidates_: list[Candidate] = []
        self.samples_: FluxSamples | None = None
        self.timings_: dict[str, float] = {}

    def fit(self, samples: FluxSamples | Mapping[str, Any], y: Any = None, **kw) -> "FluxRegressor":
        """Fit to :class:`FluxSamples`, or to ``(inputs dict, y)`` (keywords as :meth:`FluxSamples.from_arrays`)."""
        if not isinstance(samples, FluxSamples):
            samples = FluxSamples.from_arrays(samples, y, **kw)
        with _single_threaded_blas():
            return self._fit(samples)

    def _fit(self, samples: FluxSamples) -> "FluxRegressor":
        self.samples_ = samples
        data = _fit_data(samples, self.noise_std, self.rel_noise, self.n_eff, self.max_points, self.fit_on, self.seed)
        self.data_ = data
        self.noise_std_ = data.noise_std
        found: list[Candidate] = []
        terms = None
        if {"sparse", "exhaustive"} & set(self.methods):
            terms = build_library(samples, data.X, **self.library_kw)
        runs = {
            "catalogue": lambda: fit_catalogue(samples, data=data),
            "sparse": lambda: sparse_regression(samples, data=data, terms=terms, thresholds=self.thresholds,
                                                ridge=self.ridge),
            "exhaustive": lambda: exhaustive_search(samples, data=data, terms=terms, max_size=self.max_terms),
            "log": lambda: log_space_fit(samples, data=data),
        }
        for m in self.methods:
            t0 = time.perf_counter()
            found += runs[m]()
            self.timings_[m] = time.perf_counter() - t0
        best: dict[str, Candidate] = {}
        for c in found:
            k = _key(c)
            old = best.get(k)
            # same structure: keep the better fit; on a tie prefer the named catalogue form
            if old is None or c.chi2 < old.chi2 * (1 - 1e-6) - 1e-12 or (
                    c.method == "catalogue" and old.method != "catalogue" and c.chi2 <= old.chi2 * (1 + 1e-6) + 1e-12):
                best[k] = c
        self.candidates_ = sorted(best.values(), key=self._score)
        if not self.candidates_:
            raise RuntimeError(f"no candidate could be fitted to flux {samples.flux!r}")
        return self

    def _score(self, c: Candidate) -> tuple[float, int, int]:
        return (round(c.bic if self.criterion == "bic" else c.aicc, 6), c.complexity, c.priority)

    @property
    def best_(self) -> Candidate:
        """The chosen candidate (see :func:`select`)."""
        return select(self.candidates_, self.criterion, self.selection)

    @property
    def pareto_(self) -> list[Candidate]:
        return pareto_front(self.candidates_)

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        return self.best_.predict(inputs)

    def score(self, inputs: Mapping[str, Any], y: Any) -> float:
        """R^2 of the best candidate on ``(inputs, y)``."""
        y = np.asarray(y, dtype=np.float64)
        r = y - self.predict(inputs)
        return float(1 - np.sum(r**2) / np.sum((y - y.mean()) ** 2))

    def equations(self, n: int = 5) -> list[str]:
        return [str(c) for c in self.candidates_[:n]]

    def table(self, n: int = 10) -> str:
        """Markdown table of the ``n`` best candidates."""
        rows = ["| rank | expression | method | k | complexity | R2 | RMSE | AICc | BIC | flags |",
                "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for i, c in enumerate(self.candidates_[:n], start=1):
            rows.append(f"| {i} | `{c.text()}` | {c.method} | {c.n_params} | {c.complexity} | {c.r2:.6f} | "
                        f"{c.rmse:.4g} | {c.aicc:.4g} | {c.bic:.4g} | {'; '.join(c.flags)} |")
        return "\n".join(rows)

    def print(self, n: int = 5) -> None:
        """Print the best ``n`` candidates with their fit statistics."""
        flux = self.samples_.flux if self.samples_ else "flux"
        print(f"{flux}: {len(self.candidates_)} candidates, ranked by {self.criterion.upper()}")
        for i, c in enumerate(self.candidates_[:n], start=1):
            flag = "" if c.identifiable else "  [" + "; ".join(c.flags) + "]"
            print(f"  {i}. {c}   (R2={c.r2:.6f}, RMSE={c.rmse:.3g}, k={c.n_params}, "
                  f"{self.criterion.upper()}={self._score(c)[0]:.4g}, {c.method}){flag}")


def select(candidates: Sequence[Candidate], criterion: str = "bic", rule: str = "parsimonious") -> Candidate:
    """Choose one candidate.

    Only identifiable candidates are considered (all, if none is). ``rule="ic"``:
    the lowest criterion. ``rule="parsimonious"`` (default): the simplest candidate
    (fewest expression nodes, then lowest criterion) that already fits the samples
    within the fixed noise (``chi2 / n <= 1``, the discrepancy principle: terms
    that only fit the network's errors below the noise level are not wanted);
    if no candidate does, the lowest criterion.
    """
    if not candidates:
        raise ValueError("no candidates")
    pool = [c for c in candidates if c.identifiable] or list(candidates)

    def key(c: Candidate) -> tuple:
        ic = c.bic if criterion == "bic" else c.aicc
        # equal fits: the simpler, then named catalogue forms in catalogue order
        return (round(ic, 6), c.complexity, c.priority)

    if rule == "parsimonious":
        within = [c for c in pool if c.chi2 <= c.n]
        if within:
            return min(within, key=lambda c: (c.complexity, round(c.bic if criterion == "bic" else c.aicc, 6),
                                              c.priority))
    elif rule != "ic":
        raise ValueError(f"rule must be 'parsimonious' or 'ic', got {rule!r}")
    return min(pool, key=key)


def search_flux(samples: FluxSamples, **kw) -> list[Candidate]:
    """All candidates for a flux, ranked (keywords as :class:`FluxRegressor`)."""
    return FluxRegressor(**kw).fit(samples).candidates_


# =============================================================================== physics checks
def _source_store(samples: FluxSamples) -> str | None:
    s = samples.source
    return s if s is not None and s in samples.inputs and s in samples.varying() else None


def physics_checks(fn: Callable[[Mapping[str, np.ndarray]], np.ndarray], samples: FluxSamples,
                   candidate: Candidate | None = None, tol: float = 1e-6) -> dict[str, Any]:
    """Physics checks of a flux function on all samples (visited and grid).

    * ``non_negative``: ``min >= -tol * max|y|``;
    * ``monotone``: for a flux leaving a store it reads, the share of points where
      it decreases when that store increases (a finite difference of 0.1% of the
      store's range); ``ok`` when below 1%;
    * ``et_le_pet``: for an evapotranspiration flux reading PET, ``max(flux - PET)``;
    * ``units``: the candidate form's dimension check (if a candidate is given).
    """
    X = samples.inputs
    with np.errstate(all="ignore"):
        y = np.asarray(fn(X), dtype=np.float64)
    scale = max(float(np.nanmax(np.abs(samples.output))) if samples.output.size else 1.0, 1e-300)
    out: dict[str, Any] = {}
    finite = np.isfinite(y)
    out["finite"] = {"ok": bool(finite.all()), "share_non_finite": float(1 - finite.mean()) if y.size else 0.0}
    ymin = float(np.nanmin(y)) if y.size else 0.0
    out["non_negative"] = {"ok": bool(ymin >= -tol * scale), "min": ymin}
    s = _source_store(samples)
    if s is not None:
        h = 1e-3 * max(float(np.ptp(X[s])), 1e-9)
        Xp = dict(X)
        Xp[s] = X[s] + h
        with np.errstate(all="ignore"):
            dy = np.asarray(fn(Xp), dtype=np.float64) - y
        dec = dy < -tol * scale
        out["monotone"] = {"ok": bool(dec.mean() < 0.01), "store": s, "expected": "non-decreasing",
                           "share_decreasing": float(dec.mean())}
    pet = next((n for n in X if _is_pet(n)), None)
    if pet is not None and _is_et(samples.flux):
        exc = float(np.nanmax(y - X[pet])) if y.size else 0.0
        out["et_le_pet"] = {"ok": bool(exc <= tol * scale + 1e-12), "max_excess": exc, "pet": pet}
    if candidate is not None:
        out["units"] = {"ok": candidate.dimension_ok, "detail": candidate.dimension}
    return out


def extrapolation_table(samples: FluxSamples, candidate: Candidate, store: str | None = None,
                        factors: Sequence[float] = (-0.5, -0.25, 0.0, 1.0, 1.25, 1.5, 2.0)) -> list[dict[str, Any]]:
    """Network vs candidate outside (and at the edges of) the sampled range of one input.

    The input (default: the flux's source store, else the first varying store or
    input) takes ``lo + f*(hi - lo)`` for ``f`` in ``factors`` (kept >= 0 for a
    store that never went negative); the others sit at their visited medians.
    """
    if samples.evaluate is None:
        return []
    varying = samples.varying()
    if store is None:
        store = _source_store(samples) or next((n for n in varying if samples.kinds.get(n) == "store"), None) \
            or (varying[0] if varying else None)
    if store is None:
        return []
    lo, hi = samples.bounds()[store]
    med = samples.medians()
    rows = []
    for f in factors:
        x = lo + f * (hi - lo)
        if samples.kinds.get(store) == "store" and lo >= 0:
            x = max(x, 0.0)
        if rows and abs(rows[-1]["value"] - x) <= 1e-12 * (abs(x) + 1):
            continue
        pt = {k: np.array([v]) for k, v in med.items()}
        pt[store] = np.array([x])
        net = float(samples.evaluate(pt)[0])
        cand = float(candidate.predict(pt)[0])
        rows.append({"input": store, "value": x, "inside": bool(lo <= x <= hi), "network": net, "expression": cand,
                     "difference": cand - net})
    return rows


# =============================================================================== back to torch
def _unused_fn(v: Vars) -> torch.Tensor:  # pragma: no cover - SymbolicFlux overrides forward
    raise RuntimeError("SymbolicFlux evaluates its expression in forward()")


class SymbolicFlux(Flux):
    """A flux given by a sympy expression of named inputs, evaluated with torch.

    Args:
        name, source, target, units, description: as for :class:`~adjointhydro.fluxes.Flux`.
        expression: sympy expression; its symbols are read by name (stores,
            forcing, parameters, earlier fluxes).
        trainable: the expression's numeric constants become torch parameters
            (``constant = base * (1 + delta)``, ``delta`` trained, so every
            constant moves on its own scale); the ODE solvers' gradients reach them.
        wired: ``False`` to take source and target from the flux it replaces
            (:meth:`Model.replace_flux`).
    """

    def __init__(self, name: str, source: str | None, target: str | None, expression: sp.Expr, *,
                 units: str = "mm/day", description: str = "", trainable: bool = False, wired: bool = True) -> None:
        expression = sp.sympify(expression)
        super().__init__(name, source, target, _unused_fn, units, description or f"symbolic: {_round_expr(expression)}")
        self._wired = wired
        self.trainable = bool(trainable)
        floats = sorted(expression.atoms(sp.Float), key=lambda f: sp.srepr(f)) if trainable else []
        self._const_syms = [sp.Symbol(f"__c{i}__", real=True) for i in range(len(floats))]
        self.template = expression.xreplace(dict(zip(floats, self._const_syms))) if floats else expression
        self._input_names = tuple(sorted(str(s) for s in self.template.free_symbols if s not in self._const_syms))
        self.register_buffer("base", torch.tensor([float(f) for f in floats], dtype=torch.float64))
        self.delta = nn.Parameter(torch.zeros(len(floats), dtype=torch.float64), requires_grad=bool(floats))
        self._fn: Callable | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return self._input_names

    @property
    def constants(self) -> torch.Tensor:
        return self.base * (1 + self.delta)

    @property
    def expression(self) -> sp.Expr:
        """The current expression (with trained constants)."""
        vals = self.constants.detach().tolist()
        return self.template.xreplace({s: sp.Float(v) for s, v in zip(self._const_syms, vals)})

    def _compiled(self) -> Callable:
        if self._fn is None:
            args = [s for s in sorted(self.template.free_symbols, key=str) if s not in self._const_syms]
            args = sorted(args, key=lambda s: self._input_names.index(str(s)))
            self._fn = _compile(self.template, args + self._const_syms, "torch")
        return self._fn

    def forward(self, v: Vars) -> torch.Tensor:
        try:
            xs = [v[n] for n in self._input_names]
        except KeyError as e:
            raise KeyError(f"symbolic flux {self.name!r} reads {e.args[0]!r}; available: {sorted(v)}") from None
        ref = xs[0] if xs else next(iter(v.values()))
        consts = self.constants.to(ref.dtype).unbind(0) if self._const_syms else ()
        out = self._compiled()(*xs, *consts)
        if not isinstance(out, torch.Tensor):
            out = torch.tensor(float(out), dtype=ref.dtype)
        if out.shape != ref.shape:
            out = out.expand_as(ref) if out.numel() == 1 else out
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fn"] = None  # compiled code is rebuilt on first use (picklable)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.name} = {_round_expr(self.expression)}"


def expression_to_flux(
    candidate: Candidate | sp.Expr | str,
    name: str | None = None,
    source: str | None = None,
    target: str | None = None,
    *,
    units: str | None = None,
    trainable: bool = False,
    wired: bool | None = None,
) -> SymbolicFlux:
    """A torch :class:`SymbolicFlux` from a candidate or sympy expression (symbols = input names).

    ``model.replace_flux(expression_to_flux(best, "Q", "soil", None))`` puts it
    into a model; with neither ``source`` nor ``target`` given the flux takes the
    wiring of the flux it replaces. ``trainable=True`` makes its constants torch
    parameters (see :func:`resimulate` with ``recalibrate=True``).
    """
    if isinstance(candidate, Candidate):
        expr = candidate.expression
        name = name or candidate.flux
        desc = f"{candidate.form} ({candidate.method})"
    else:
        expr = sp.sympify(candidate) if isinstance(candidate, str) else candidate
        desc = ""
        if name is None:
            raise ValueError("name is required for a plain expression")
    # symbols from sympify(str) have no assumptions; rebuild with the module's (real) symbols
    expr = expr.xreplace({s: _sym(str(s)) for s in expr.free_symbols})
    if wired is None:
        wired = source is not None or target is not None
    return SymbolicFlux(name, source, target, expr, units=units or "mm/day", description=desc,
                        trainable=trainable, wired=wired)


class _GroupMember(Flux):
    """One output of a :class:`NeuralFluxGroup`, as a flux of its own (the network is shared)."""

    def __init__(self, group: NeuralFluxGroup, index: int) -> None:
        n, s, t = group.wiring[index]
        super().__init__(n, s, t, _unused_fn, group.units, f"output {index} of network {group.name}")
        self.group = group
        self.index = index

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.group.inputs

    def forward(self, v: Vars) -> torch.Tensor:
        return self.group.forward(v)[..., self.index]


def symbolic_model(model: Model, replacements: Mapping[str, Candidate | sp.Expr | Flux], *,
                   trainable: bool = False) -> Model:
    """A copy of ``model`` with the named fluxes replaced (candidates/expressions -> :class:`SymbolicFlux`).

    Works for members of a :class:`NeuralFluxGroup` too: the group's other outputs
    stay computed by the (shared) network.
    """
    import copy

    unknown = set(replacements) - set(model.flux_names)
    if unknown:
        raise ModelError(f"{model.name}: no fluxes {sorted(unknown)}; fluxes: {list(model.flux_names)}")
    wiring = {w[0]: w for w in model.wiring}
    units = dict(zip(model.flux_names, model.flux_units()))
    mods: list[nn.Module] = []
    for m in model.flux_modules:
        names = list(m.names)
        if not any(n in replacements for n in names):
            mods.append(copy.deepcopy(m))
            continue
        group = copy.deepcopy(m) if isinstance(m, NeuralFluxGroup) else None
        for i, n in enumerate(names):
            if n in replacements:
                r = replacements[n]
                _, s, t = wiring[n]
                if isinstance(r, Flux):
                    new = copy.deepcopy(r)
                    new.name, new.source, new.target = n, s, t
                else:
                    new = expression_to_flux(r, n, s, t, units=units.get(n, "mm/day"), trainable=trainable, wired=True)
                    new.source, new.target = s, t
                mods.append(new)
            else:
                mods.append(_GroupMember(group, i))
    out = Model(model.stores, mods, model.forcing_names, model.parameters_spec, model.discharge_fluxes,
                name=f"{model.name} (symbolic)", time_units=model.time_units)
    with torch.no_grad():
        out.raw = nn.Parameter(model.raw.detach().clone())
    return out


# =============================================================================== re-simulation
@dataclass
class ResimulationResult:
    """Symbolic model re-run next to the hybrid.

    Attributes:
        metrics: rows ``{"period", "model", "variable", "nse", "kge", "rmse"}`` for
            ``model`` in ``hybrid``, ``symbolic`` (and ``recalibrated``); NSE and KGE
            are medians over basins.
        expressions: flux -> expression used (after recalibration, if any).
        symbolic_model, solution, hybrid_solution: the models' solutions.
        error: a message if the symbolic model could not be solved.
    """

    metrics: list[dict[str, Any]]
    expressions: dict[str, str]
    symbolic_model: Model | None = None
    solution: Any = None
    hybrid_solution: Any = None
    recalibrated_expressions: dict[str, str] | None = None
    error: str | None = None

    def table(self) -> str:
        rows = ["| period | model | variable | NSE | KGE | RMSE |", "|---|---|---|---:|---:|---:|"]
        for r in self.metrics:
            rows.append(f"| {r['period']} | {r['model']} | {r['variable']} | {_fmt(r['nse'])} | {_fmt(r['kge'])} | "
                        f"{_fmt(r['rmse'])} |")
        return "\n".join(rows)

    def get(self, period: str, model: str, variable: str | None = None) -> dict[str, Any]:
        for r in self.metrics:
            if r["period"] == period and r["model"] == model and (variable is None or r["variable"] == variable):
                return r
        raise KeyError((period, model, variable))

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "expressions": self.expressions,
                "recalibrated_expressions": self.recalibrated_expressions, "error": self.error}


def _as_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "nan"
    return format(x, spec)


def _series(sol: Any, observed: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """variable -> (obs, sim, axis kind) for discharge ``[B,T]`` or stores ``[B,T+1,n]`` observations."""
    if observed.ndim == 3:
        sim = sol.stores.detach().cpu().numpy()
        return {n: (observed[..., i], sim[..., i], "states") for i, n in enumerate(sol.store_names)
                if i < observed.shape[-1]}
    return {"discharge": (observed, sol.discharge.detach().cpu().numpy(), "periods")}


def _metric_rows(sol: Any, observed: np.ndarray, periods: Mapping[str, np.ndarray], label: str) -> list[dict]:
    from . import metrics as M

    rows = []
    for var, (obs, sim, _) in _series(sol, observed).items():
        T = obs.shape[1]
        for pname, mask in periods.items():
            m = np.asarray(mask, bool)
            if m.size == T - 1:  # a period mask for state observations: include the end state
                m = np.concatenate([m, m[-1:]])
            if m.size != T:
                raise ValueError(f"period {pname!r} has {m.size} entries, the series has {T}")
            o, s = obs[:, m], sim[:, m]
            nse = np.atleast_1d(M.nse(o, s))
            kge = np.atleast_1d(M.kge(o, s))
            rmse = np.atleast_1d(M.rmse(o, s))
            rows.append({"period": pname, "model": label, "variable": var,
                         "nse": float(np.nanmedian(nse)) if np.isfinite(nse).any() else float("nan"),
                         "kge": float(np.nanmedian(kge)) if np.isfinite(kge).any() else float("nan"),
                         "rmse": float(np.nanmedian(rmse)) if np.isfinite(rmse).any() else float("nan")})
    return rows


def resimulate(
    model: Model,
    replacements: Mapping[str, Candidate | sp.Expr | Flux],
    forcing: Forcing,
    *,
    observed: Any = None,
    periods: Mapping[str, Any] | None = None,
    parameters: Any = None,
    initial_state: Any = None,
    hybrid_solution: Any = None,
    recalibrate: bool = False,
    calibration_period: str | None = None,
    iterations: int = 30,
    solve_kwargs: Mapping[str, Any] | None = None,
) -> ResimulationResult:
    """Re-run the model with symbolic fluxes and score it next to the hybrid.

    Args:
        model: the hybrid model.
        replacements: flux -> :class:`Candidate`, sympy expression or :class:`Flux`.
        forcing: forcing to simulate (may be longer than the inspected record).
        observed: discharge ``[basin, period]`` or stores ``[basin, period+1, store]``
            (NaN = missing); without it no metrics are computed.
        periods: name -> boolean mask over periods (default one period ``"all"``).
        hybrid_solution: the hybrid's solution over ``forcing`` (solved if omitted);
            without ``initial_state`` its first stores are the initial state.
        recalibrate: also refit the symbolic constants through the ODE (torch
            gradients, L-BFGS for ``iterations`` steps) on ``calibration_period``
            (default: the first period) and report the recalibrated model.
        solve_kwargs: extra arguments of :func:`~adjointhydro.solve.solve`.
    """
    from .solve import solve

    kw = dict(solve_kwargs or {})
    if parameters is not None:
        kw["parameters"] = parameters
    if initial_state is not None:
        kw["initial_state"] = initial_state
    if initial_state is None and hybrid_solution is not None and hybrid_solution.stores.shape[1] == forcing.n_steps + 1:
        kw["initial_state"] = hybrid_solution.stores[:, 0].detach()  # start where the hybrid started
    sym = symbolic_model(model, replacements)
    exprs = {n: str(_round_expr(sym.flux(n).expression, 6)) for n in replacements
             if isinstance(sym.flux(n), SymbolicFlux)}
    obs = None if observed is None else _as_numpy(observed)
    if obs is not None and obs.ndim == 1:
        obs = obs[None]
    T = forcing.n_steps
    periods = {k: np.asarray(v, bool) for k, v in (periods or {"all": np.ones(T, bool)}).items()}
    result = ResimulationResult([], exprs, sym)
    try:
        with torch.no_grad():
            sol = solve(sym, forcing, **kw)
    except Exception as e:  # noqa: BLE001 - reported, not raised: a bad formula must not stop a report
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.solution = sol
    if hybrid_solution is None:
        with torch.no_grad():
            hybrid_solution = solve(model, forcing, **kw)
    result.hybrid_solution = hybrid_solution
    if obs is not None:
        result.metrics += _metric_rows(hybrid_solution, obs, periods, "hybrid")
        result.metrics += _metric_rows(sol, obs, periods, "symbolic")
    if recalibrate and obs is not None:
        cal = periods[calibration_period or next(iter(periods))]
        trainable = symbolic_model(model, replacements, trainable=True)
        for p in trainable.parameters():
            p.requires_grad_(False)
        consts = [m.delta for m in trainable.flux_modules if isinstance(m, SymbolicFlux) and m.delta.numel()]
        for d in consts:
            d.requires_grad_(True)
        if consts:
            target = torch.as_tensor(obs)
            opt = torch.optim.LBFGS(consts, lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                s = solve(trainable, forcing, **kw)
                if obs.ndim == 3:
                    sim = s.stores[..., : obs.shape[-1]]
                    m = torch.as_tensor(np.concatenate([cal, cal[-1:]]) if cal.size == T else cal)
                    tgt = target[:, m]
                    simm = sim[:, m]
                else:
                    m = torch.as_tensor(cal)
                    tgt, simm = target[:, m], s.discharge[:, m]
                ok = torch.isfinite(tgt)
                loss = ((simm - torch.where(ok, tgt, simm.detach())) ** 2)[ok].mean()
                loss.backward()
                return loss

            try:
                opt.step(closure)
                with torch.no_grad():
                    sol2 = solve(trainable, forcing, **kw)
                result.metrics += _metric_rows(sol2, obs, periods, "recalibrated")
                result.recalibrated_expressions = {
                    m.name: str(_round_expr(m.expression, 6)) for m in trainable.flux_modules
                    if isinstance(m, SymbolicFlux)}
                result.symbolic_model = trainable
            except Exception as e:  # noqa: BLE001
                result.error = f"recalibration failed: {type(e).__name__}: {e}"
    return result


# =============================================================================== inspection
@dataclass
class FluxInspection:
    """Everything found about one learned flux."""

    flux: str
    samples: FluxSamples
    candidates: list[Candidate]
    chosen: Candidate
    pareto: list[Candidate]
    checks_network: dict[str, Any]
    checks_chosen: dict[str, Any]
    extrapolation: list[dict[str, Any]]
    noise_std: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self, n_candidates: int = 15) -> dict[str, Any]:
        return {
            "flux": self.flux,
            "samples": self.samples.summary(),
            "noise_std": self.noise_std,
            "seconds": self.seconds,
            "chosen": self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates[:n_candidates]],
            "pareto": [{"complexity": c.complexity, "rmse": c.rmse, "expression": c.text(6), "bic": c.bic}
                       for c in self.pareto],
            "checks": {"network": self.checks_network, "chosen": self.checks_chosen},
            "extrapolation": self.extrapolation,
        }


@dataclass
class InspectionReport:
    """Result of :func:`inspect_model`: per-flux candidates, joint fits, re-simulation."""

    model: str
    fluxes: dict[str, FluxInspection]
    joint: list[JointFit]
    resimulation: ResimulationResult | None
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, Candidate]:
        return {k: v.chosen for k, v in self.fluxes.items()}

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "model": self.model,
            "settings": self.settings,
            "fluxes": {k: v.to_dict() for k, v in self.fluxes.items()},
            "joint": [j.to_dict() for j in self.joint],
            "resimulation": None if self.resimulation is None else self.resimulation.to_dict(),
        })

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_markdown(self, n_candidates: int = 8) -> str:
        L = [f"# Symbolic inspection of {self.model}", ""]
        s = self.settings
        L.append(f"Criterion: {s.get('criterion', 'bic').upper()} with a fixed noise std per flux "
                 f"({s.get('noise_source')}), effective sample size {s.get('n_eff')}.")
        L.append("")
        for name, fi in self.fluxes.items():
            c = fi.chosen
            L += [f"## Flux `{name}`", ""]
            L.append("Inputs: " + ", ".join(
                f"`{k}` ({fi.samples.kinds[k]}, {fi.samples.units.get(k) or '?'}, {lo:.4g}..{hi:.4g})"
                for k, (lo, hi) in fi.samples.bounds().items()))
            L.append(f"Samples: {fi.samples.n_visited} visited, {int((~fi.samples.visited).sum())} on the grid; "
                     f"noise std {fi.noise_std:.3g} {fi.samples.output_units}; search {fi.seconds:.2f} s.")
            L += ["", f"**Chosen:** `{name} = {c.text()}`  ({c.form}, {c.method})", "",
                  f"Form: `{c.template}`", "", f"$$ {c.latex} $$", ""]
            L += ["| parameter | value | std. error | rel. SE | units |", "|---|---:|---:|---:|---|"]
            for r in c.parameter_table():
                fixed = " (fixed)" if r.get("fixed") else ""
                L.append(f"| {r['name']}{fixed} | {r['value']:.6g} | {r['std_error']:.3g} | {r['relative_se']:.2g} | "
                         f"{r['units']} |")
            L.append("")
            if c.flags:
                L += ["Identifiability: " + "; ".join(c.flags), ""]
            L += ["### Candidates", "",
                  "| rank | expression | form | method | k | complexity | R2 | RMSE | AICc | BIC | identifiable |",
                  "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
            for i, cc in enumerate(fi.candidates[:n_candidates], start=1):
                L.append(f"| {i} | `{cc.text()}` | {cc.form} | {cc.method} | {cc.n_params} | {cc.complexity} | "
                         f"{cc.r2:.6f} | {cc.rmse:.4g} | {cc.aicc:.5g} | {cc.bic:.5g} | "
                         f"{'yes' if cc.identifiable else 'no: ' + '; '.join(cc.flags)} |")
            L += ["", "### Pareto front (complexity vs RMSE)", "", "| complexity | RMSE | expression |",
                  "|---:|---:|---|"]
            for cc in fi.pareto:
                L.append(f"| {cc.complexity} | {cc.rmse:.4g} | `{cc.text()}` |")
            L += ["", "### Physics checks", "", "| check | network | chosen |", "|---|---|---|"]
            for key in sorted(set(fi.checks_network) | set(fi.checks_chosen)):
                net, cho = _check_text(fi.checks_network.get(key)), _check_text(fi.checks_chosen.get(key))
                L.append(f"| {key} | {net} | {cho} |")
            if fi.extrapolation:
                L += ["", "### Extrapolation", "", "| input | value | inside | network | expression | difference |",
                      "|---|---:|---|---:|---:|---:|"]
                for r in fi.extrapolation:
                    L.append(f"| {r['input']} | {r['value']:.4g} | {'yes' if r['inside'] else 'no'} | {r['network']:.4g} | "
                             f"{r['expression']:.4g} | {r['difference']:+.3g} |")
            L.append("")
        if self.joint:
            L += ["## Joint fits (shared parameters)", ""]
            for j in self.joint:
                L.append(f"Shared: {', '.join(j.shared)}; joint BIC {j.bic:.5g} (separate {j.separate_bic:.5g}); "
                         f"{'identifiable' if not j.flags else 'flags: ' + '; '.join(j.flags)}")
                for n, c in j.candidates.items():
                    ps = ", ".join(f"{r['name']} = {r['value']:.5g} ± {r['std_error']:.2g}"
                                   for r in c.parameter_table())
                    L.append(f"- `{n} = {c.text()}` ({ps})")
                L.append("")
        if self.resimulation is not None:
            L += ["## Re-simulation with the chosen expressions", ""]
            for n, e in self.resimulation.expressions.items():
                L.append(f"- `{n} = {e}`")
            if self.resimulation.recalibrated_expressions:
                L.append("")
                L.append("Recalibrated through the ODE:")
                for n, e in self.resimulation.recalibrated_expressions.items():
                    L.append(f"- `{n} = {e}`")
            L.append("")
            if self.resimulation.error:
                L += [f"Error: {self.resimulation.error}", ""]
            if self.resimulation.metrics:
                L += [self.resimulation.table(), ""]
        if self.files:
            L += ["## Files", ""] + [f"- {k}: `{Path(v).name}`" for k, v in self.files.items()] + [""]
        return "\n".join(L)

    def write(self, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
        """Write ``report.md``, ``report.json`` and PNG plots into ``out_dir`` (atomically, file by file)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        if plots:
            for name, fi in self.fluxes.items():
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
                p = out / f"flux_{safe}.png"
                _atomic_write(p, _plot_flux(fi))
                files[f"plot {name}"] = p
                p = out / f"pareto_{safe}.png"
                _atomic_write(p, _plot_pareto(fi))
                files[f"pareto {name}"] = p
        files["report.json"] = out / "report.json"
        files["report.md"] = out / "report.md"
        self.files = {k: str(v) for k, v in files.items()}
        _atomic_write(files["report.json"], self.to_json().encode("utf-8"))
        _atomic_write(files["report.md"], self.to_markdown().encode("utf-8"))
        return files


def _check_text(c: Mapping[str, Any] | None) -> str:
    if not c:
        return "-"
    ok = c.get("ok")
    extra = ", ".join(f"{k}={_fmt(v, '.3g') if isinstance(v, float) else v}" for k, v in c.items() if k != "ok")
    return f"{'ok' if ok else ('?' if ok is None else 'FAIL')} ({extra})"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, ``os.replace``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def _figure_bytes(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plot_flux(fi: FluxInspection) -> bytes:
    """Network vs chosen expression over the main store (scatter at visited points + curve at medians)."""
    from matplotlib.figure import Figure

    s = fi.samples
    c = fi.chosen
    store = _source_store(s) or next((n for n in s.varying() if s.kinds.get(n) == "store"), None) or \
        (s.varying()[0] if s.varying() else next(iter(s.inputs)))
    v = s.visited if s.visited.any() else np.ones_like(s.visited)
    x = s.inputs[store][v]
    y_net = s.output[v]
    y_sym = c.predict({k: a[v] for k, a in s.inputs.items()})
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(x, y_net, s=6, alpha=0.5, label="network (visited)", color="tab:blue")
    ax1.scatter(x, y_sym, s=6, alpha=0.5, label="expression (same inputs)", color="tab:orange")
    if s.evaluate is not None:
        lo, hi = s.bounds()[store]
        span = hi - lo
        xx = np.linspace(max(lo - 0.25 * span, 0.0) if lo >= 0 else lo - 0.25 * span, hi + 0.25 * span, 200)
        pt = {k: np.full_like(xx, m) for k, m in s.medians().items()}
        pt[store] = xx
        ax1.plot(xx, s.evaluate(pt), color="tab:blue", lw=1.5, label="network (others at median)")
        ax1.plot(xx, c.predict(pt), color="tab:orange", lw=1.5, ls="--", label="expression (others at median)")
        ax1.axvspan(lo, hi, color="0.9", zorder=-1)
    ax1.set_xlabel(f"{store} [{s.units.get(store) or '?'}]")
    ax1.set_ylabel(f"{fi.flux} [{s.output_units or '?'}]")
    ax1.set_title(f"{fi.flux} = {c.text(3)}", fontsize=9)
    ax1.legend(fontsize=7)
    lim = [float(min(y_net.min(), y_sym.min())), float(max(y_net.max(), y_sym.max()))]
    ax2.scatter(y_net, y_sym, s=6, alpha=0.5)
    ax2.plot(lim, lim, color="k", lw=1)
    ax2.set_xlabel("network")
    ax2.set_ylabel("expression")
    ax2.set_title(f"R2 = {c.r2:.5f}, RMSE = {c.rmse:.3g}", fontsize=9)
    return _figure_bytes(fig)


def _plot_pareto(fi: FluxInspection) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    cx = [c.complexity for c in fi.candidates]
    cy = [max(c.rmse, 1e-300) for c in fi.candidates]
    ax.scatter(cx, cy, s=10, color="0.6", label="candidates")
    px = [c.complexity for c in fi.pareto]
    py = [max(c.rmse, 1e-300) for c in fi.pareto]
    ax.step(px, py, where="post", color="tab:blue", label="Pareto front")
    ax.scatter([fi.chosen.complexity], [max(fi.chosen.rmse, 1e-300)], s=60, marker="*", color="tab:red", zorder=3,
               label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel("complexity (expression nodes)")
    ax.set_ylabel(f"RMSE [{fi.samples.output_units or '?'}]")
    ax.set_title(f"{fi.flux}: chosen {fi.chosen.text(3)}", fontsize=9)
    ax.legend(fontsize=7)
    return _figure_bytes(fig)


@dataclass
class _NoiseModel:
    """Noise std per flux for the criteria: tied to observation residuals where possible."""

    absolute: dict[str, float]  # fluxes tied directly to observations (rates)
    relative: float | None  # residual level relative to the observations' spread, for the others
    source: str


def _residual_noise(model: Model, solution: Any, observed: Any, step: float) -> _NoiseModel | None:
    """Noise levels from the hybrid's residuals.

    Discharge ``[B,T]`` (totals per period): ``sigma = std(obs - sim) / step`` for the
    discharge fluxes (a rate). Stores ``[B,T+1,n]``: a flux leaving or entering an
    observed store gets ``sqrt(2) * std(obs - sim) / step`` (the rate error that the
    difference of two noisy states over one period carries). Other fluxes get the
    relative residual level ``std(obs - sim) / std(obs)`` times their own spread.
    """
    if observed is None or solution is None:
        return None
    obs = _as_numpy(observed)
    if obs.ndim == 1:
        obs = obs[None]
    absolute: dict[str, float] = {}
    rel: list[float] = []
    if obs.ndim == 3:
        sim = solution.stores.detach().cpu().numpy()[..., : obs.shape[-1]]
        if sim.shape != obs.shape:
            return None
        sig: dict[str, float] = {}
        for i, name in enumerate(solution.store_names[: obs.shape[-1]]):
            r = obs[..., i] - sim[..., i]
            ok = np.isfinite(r)
            if ok.sum() >= 3:
                sig[name] = float(np.std(r[ok]))
                so = float(np.std(obs[..., i][ok]))
                if so > 0:
                    rel.append(sig[name] / so)
        for n, src, tgt in model.wiring:
            ends = [sig[e] for e in (src, tgt) if e in sig]
            if ends:
                absolute[n] = math.sqrt(2.0) * min(ends) / step
        source = "hybrid store residuals: sqrt(2)*std(obs - sim)/step per flux of an observed store"
    elif obs.ndim == 2 and model.discharge_fluxes:
        sim = solution.discharge.detach().cpu().numpy()
        if sim.shape != obs.shape:
            return None
        r = obs - sim
        ok = np.isfinite(r)
        if ok.sum() < 3:
            return None
        sr = float(np.std(r[ok])) / step
        for n in model.discharge_fluxes:
            absolute[n] = sr
        so = float(np.std(obs[ok])) / step
        if so > 0:
            rel.append(sr / so)
        source = "hybrid discharge residuals: std(obs - sim)/step"
    else:
        return None
    return _NoiseModel(absolute, float(np.median(rel)) if rel else None, source)


def inspect_model(
    model: Model,
    forcing: Forcing,
    solution: Any,
    observed: Any = None,
    parameters: Any = None,
    periods: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    noise_std: float | Mapping[str, float] | None = None,
    *,
    noise_floor: float = 0.01,
    fluxes: Sequence[str] | None = None,
    criterion: str = "bic",
    n_eff: float | None = None,
    rel_noise: float = 0.01,
    max_points: int = 1500,
    grid_points: int = 1500,
    substeps: int = 1,
    initial_state: Any = None,
    resimulate_forcing: Forcing | None = None,
    resimulate_observed: Any = None,
    joint: bool = True,
    resimulate_model: bool = True,
    recalibrate: bool = False,
    plots: bool = True,
    seed: int = 0,
    regressor_kw: Mapping[str, Any] | None = None,
    solve_kwargs: Mapping[str, Any] | None = None,
) -> InspectionReport:
    """Inspect every learned flux of ``model``: candidates, checks, joint fits, re-simulation.

    Args:
        model: the trained hybrid; its neural fluxes (or ``fluxes``) are inspected.
        forcing, solution: the record the hybrid was run on and its solution.
        observed: observed discharge ``[basin, period]`` (or stores ``[basin, period+1, store]``)
            for the noise level and the re-simulation metrics.
        parameters: physical parameters as given to ``solve``.
        periods: name -> boolean mask over periods for the metrics (e.g. calibration/validation).
        out_dir: write ``report.md``, ``report.json`` and PNG plots there.
        noise_std: absolute noise std per flux (a number for all, or flux -> number).
            Default from the hybrid's residuals when ``observed`` is given: a
            discharge flux gets ``std(obs - sim)`` (as a rate), a flux of an observed
            store ``sqrt(2)*std(obs - sim)/step``, any other flux the relative
            residual level ``std(obs - sim)/std(obs)`` times its spread; never less
            than ``noise_floor`` (1%) of the flux's spread, the default without observations.
        criterion, rel_noise, max_points: see :class:`FluxRegressor`.
        n_eff: effective sample size of the criteria; default :data:`DEFAULT_N_EFF`, but
            never more than the number of observed time steps (the network cannot
            hold more independent information than the data it was trained on).
        joint: fit catalogue forms of different fluxes that share parameter names together.
        initial_state: initial stores of the re-simulation (default: the solution's first stores).
        resimulate_forcing, resimulate_observed: re-simulate over another (e.g. longer)
            record; ``periods`` then refer to it.
        resimulate_model, recalibrate: run :func:`resimulate` with the chosen expressions.
    """
    with _single_threaded_blas():
        return _inspect_model(
            model, forcing, solution, observed, parameters, periods, out_dir, noise_std, noise_floor, fluxes,
            criterion, n_eff, rel_noise, max_points, grid_points, substeps, initial_state, resimulate_forcing,
            resimulate_observed, joint, resimulate_model, recalibrate, plots, seed, regressor_kw, solve_kwargs)


def _inspect_model(model, forcing, solution, observed, parameters, periods, out_dir, noise_std, noise_floor, fluxes,
                   criterion, n_eff, rel_noise, max_points, grid_points, substeps, initial_state, resimulate_forcing,
                   resimulate_observed, joint, resimulate_model, recalibrate, plots, seed, regressor_kw,
                   solve_kwargs) -> InspectionReport:
    t_all = time.perf_counter()
    rf = resimulate_forcing or forcing
    for pname, mask in (periods or {}).items():
        if np.asarray(mask).shape not in ((rf.n_steps,), (rf.n_steps + 1,)):
            raise ValueError(f"period {pname!r}: mask has shape {np.asarray(mask).shape}, the re-simulated record "
                             f"has {rf.n_steps} periods")
    names = list(fluxes) if fluxes is not None else [n for f in model.neural_fluxes() for n in f.names]
    if not names:
        raise ValueError(f"{model.name}: no neural fluxes to inspect (pass fluxes=[...] to inspect others)")
    noise = _residual_noise(model, solution, observed, float(forcing.step))
    if isinstance(noise_std, (int, float)) or isinstance(noise_std, Mapping):
        source = "given"
    elif noise is not None:
        source = noise.source + f"; floor {noise_floor:g} x spread"
    else:
        source = f"default ({noise_floor:g} x each flux's spread)"
    if n_eff is None:
        n_eff = DEFAULT_N_EFF
        if observed is not None:
            o = _as_numpy(observed)
            o = o[None] if o.ndim == 1 else o
            n_time = int(np.isfinite(o).reshape(o.shape[0], o.shape[1], -1).any(-1).any(0).sum())
            n_eff = float(max(min(n_eff, n_time), 10))
    out: dict[str, FluxInspection] = {}
    fit_data: dict[str, _FitData] = {}
    for name in names:
        t0 = time.perf_counter()
        smp = sample_flux(model, name, solution, forcing, parameters, grid_points=grid_points,
                          max_visited=max(max_points * 2, 2000), substeps=substeps, seed=seed)
        y = smp.output[smp.visited] if smp.n_visited else smp.output
        spread = float(np.std(y)) or max(float(np.abs(y).mean()), 1e-12)
        if isinstance(noise_std, Mapping) and name in noise_std:
            ns = float(noise_std[name])
        elif isinstance(noise_std, (int, float)):
            ns = float(noise_std)
        else:
            ns = noise_floor * spread
            if noise is not None:
                if name in noise.absolute:
                    ns = max(ns, noise.absolute[name])
                elif noise.relative is not None:
                    ns = max(ns, noise.relative * spread)
        reg = FluxRegressor(noise_std=ns, rel_noise=rel_noise, n_eff=n_eff, criterion=criterion,
                            max_points=max_points, seed=seed, **dict(regressor_kw or {})).fit(smp)
        best = reg.best_
        fit_data[name] = reg.data_
        net = smp.evaluate if smp.evaluate is not None else (lambda X, s=smp: s.output)
        out[name] = FluxInspection(
            flux=name, samples=smp, candidates=reg.candidates_, chosen=best, pareto=reg.pareto_,
            checks_network=physics_checks(net, smp), checks_chosen=physics_checks(best.predict, smp, best),
            extrapolation=extrapolation_table(smp, best), noise_std=float(ns),
            seconds=time.perf_counter() - t0, timings=dict(reg.timings_))
    joints: list[JointFit] = []
    if joint and len(names) > 1:
        joints = _joint_fits(out, fit_data)
    resim = None
    if resimulate_model:
        rf = resimulate_forcing or forcing
        robs = resimulate_observed if resimulate_forcing is not None else observed
        same = rf is forcing and solution is not None and solution.stores.shape[1] == forcing.n_steps + 1
        init = initial_state if initial_state is not None else (
            solution.stores[:, 0].detach() if solution is not None else None)
        resim = resimulate(model, {n: fi.chosen for n, fi in out.items()}, rf, observed=robs,
                           periods=periods, parameters=parameters, hybrid_solution=solution if same else None,
                           initial_state=init, recalibrate=recalibrate, solve_kwargs=solve_kwargs)
    settings = {"criterion": criterion, "n_eff": n_eff,
                "noise_floor": noise_floor, "rel_noise": rel_noise, "noise_source": source,
                "residual_noise": None if noise is None else {"absolute": noise.absolute, "relative": noise.relative},
                "max_points": max_points, "seconds": time.perf_counter() - t_all}
    report = InspectionReport(model.name, out, joints, resim, settings)
    if out_dir is not None:
        report.write(out_dir, plots=plots)
    return report


def _joint_fits(found: Mapping[str, FluxInspection], data: Mapping[str, _FitData], top: int = 6) -> list[JointFit]:
    """For each pair of fluxes, the best joint fit of their top catalogue candidates sharing a capacity ``Smax``."""
    results = []
    names = list(found)
    for a, b in itertools.combinations(names, 2):
        ca = [c for c in found[a].candidates if c.method == "catalogue"][:top]
        cb = [c for c in found[b].candidates if c.method == "catalogue"][:top]
        best = None
        for x in ca:
            for y in cb:
                # only store capacities are shared automatically (a, b, k of two forms are unrelated)
                shared = sorted(p for p in set(x.parameters) & set(y.parameters) if p.startswith("Smax"))
                if not shared:
                    continue
                try:
                    j = fit_joint({a: data[a], b: data[b]}, {a: x, b: y}, shared)
                except (ValueError, np.linalg.LinAlgError):
                    continue
                if len(j.candidates) == 2 and (best is None or j.bic < best.bic):
                    best = j
        if best is not None:
            results.append(best)
    return results
