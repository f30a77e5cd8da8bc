"""Model: named stores, named fluxes between them, and bounded physical parameters.

The right-hand side is assembled from the wiring of the fluxes: each store's rate
of change is the sum of the fluxes entering it minus those leaving it, so mass
(water) balance holds by construction, whatever a flux computes -- a physics
expression or a neural network.

Example::

    model = Model(
        name="linear reservoir",
        stores=[Store("S", initial=10.0)],
        forcing=["P"],
        parameters=[Parameter("k", 0.01, 1.0, 0.1, "1/day")],
        fluxes=[
            Flux("rain", None, "S", lambda v: v.P),
            Flux("Q", "S", None, lambda v: v.k * v.S),
        ],
        discharge=["Q"],
    )
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .fluxes import Flux, NeuralFlux, NeuralFluxGroup, Vars, _NeuralBase, _rows_of
from ._rk import _times
from ._trace import split_flux

__all__ = ["Store", "Parameter", "Model", "ModelError"]


class ModelError(ValueError):
    """Raised for an inconsistent model definition or bad parameter values."""


@dataclass(frozen=True)
class Store:
    """A store (state variable), e.g. snow pack or soil water.

    Args:
        name: unique name, used as a variable in flux expressions.
        units: units of the content, e.g. ``"mm"``.
        initial: initial content, a number or a function of the parameters
            (a :class:`~adjointhydro.fluxes.Vars` of ``[basin]`` tensors).
        description: one line for reports.
    """

    name: str
    units: str = "mm"
    initial: float | Callable[[Vars], torch.Tensor] = 0.0
    description: str = ""


@dataclass(frozen=True)
class Parameter:
    """A physical parameter with bounds; optimised as ``logit((p - low)/(high - low))``.

    Args:
        name: unique name, used as a variable in flux expressions.
        low, high: bounds (inclusive of the open interval used in optimisation).
        default: value used when none is given.
        units: e.g. ``"mm"``, ``"1/mm"``, ``"mm/day/degC"``.
    """

    name: str
    low: float
    high: float
    default: float
    units: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ModelError(f"parameter {self.name!r}: low ({self.low}) must be below high ({self.high})")
        if not self.low <= self.default <= self.high:
            raise ModelError(
                f"parameter {self.name!r}: default {self.default} outside [{self.low}, {self.high}]"
            )


FluxLike = Flux | NeuralFluxGroup


class Model(nn.Module):
    """A conceptual model: stores, fluxes between them, forcing and parameters.

    Args:
        stores: the stores, in state order.
        fluxes: the fluxes, in evaluation order; a flux may read any flux listed before it.
        forcing: names of the forcing variables the fluxes read (e.g. ``["P", "T", "PET"]``).
        parameters: physical parameters with bounds.
        discharge: names of the fluxes whose sum is the simulated discharge, if any.
        name: a label for reports.
        time_units: the unit of model time (rates are per this unit).

    The model also holds default parameter values as a trainable tensor ``raw``
    ``[1 or basin, parameter]`` in unconstrained space (see :meth:`set_parameters`).
    """

    def __init__(
        self,
        stores: Sequence[Store],
        fluxes: Sequence[FluxLike],
        forcing: Sequence[str] = (),
        parameters: Sequence[Parameter] = (),
        discharge: Sequence[str] = (),
        name: str = "model",
        time_units: str = "day",
    ) -> None:
        super().__init__()
        self.name = name
        self.time_units = time_units
        self.stores = tuple(stores)
        self.forcing_names = tuple(forcing)
        self.parameters_spec = tuple(parameters)
        self.discharge_fluxes = tuple(discharge)
        self.flux_modules = nn.ModuleList(fluxes)
        low = [p.low for p in self.parameters_spec]
        high = [p.high for p in self.parameters_spec]
        self.register_buffer("param_low", torch.tensor(low, dtype=torch.float64))
        self.register_buffer("param_high", torch.tensor(high, dtype=torch.float64))
        self._build()
        default = torch.tensor([[p.default for p in self.parameters_spec]], dtype=torch.float64)
        self.raw = nn.Parameter(self.to_unconstrained(default) if self.parameters_spec else default)

    # ------------------------------------------------------------ structure
    def _build(self) -> None:
        store_names = [s.name for s in self.stores]
        if not store_names:
            raise ModelError(f"{self.name}: a model needs at least one store")
        names = store_names + list(self.forcing_names) + [p.name for p in self.parameters_spec]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ModelError(
                f"{self.name}: names used twice among stores, forcing and parameters: {sorted(dup)}"
            )
        known = set(names)
        wiring: list[tuple[str, str | None, str | None]] = []
        for f in self.flux_modules:
            if not isinstance(f, (Flux, NeuralFluxGroup)):
                raise ModelError(f"{self.name}: {f!r} is not a Flux or NeuralFluxGroup")
            if isinstance(f, NeuralFlux) and not f._wired:
                raise ModelError(
                    f"{self.name}: neural flux {f.name!r} has no source or target; give them, "
                    f"or use model.replace_flux() to take them from the flux it replaces"
                )
            for inp in f.inputs:
                if inp not in known:
                    raise ModelError(
                        f"{self.name}: flux {f.names} reads {inp!r}, which is not a store, forcing "
                        f"variable, parameter or earlier flux; known: {sorted(known)}"
                    )
            for n, src, tgt in f.wiring:
                if n in known:
                    raise ModelError(f"{self.name}: flux name {n!r} is already used")
                for end, role in ((src, "leaves"), (tgt, "enters")):
                    if end is not None and end not in store_names:
                        raise ModelError(
                            f"{self.name}: flux {n!r} {role} store {end!r}, which the model does not "
                            f"have; stores: {store_names}"
                        )
                if src is None and tgt is None:
                    raise ModelError(f"{self.name}: flux {n!r} must leave or enter a store")
                wiring.append((n, src, tgt))
                known.add(n)
        for d in self.discharge_fluxes:
            if d not in {w[0] for w in wiring}:
                raise ModelError(f"{self.name}: discharge flux {d!r} is not a flux of the model")
        self.wiring = tuple(wiring)
        # networks evaluated column by column (and preparable for the solver); a subclass
        # that overrides forward runs its own forward instead
        self._columnar = tuple(
            isinstance(f, _NeuralBase) and type(f).forward in (NeuralFlux.forward, NeuralFluxGroup.forward)
            for f in self.flux_modules
        )
        self.flux_names = tuple(w[0] for w in wiring)
        self.store_names = tuple(store_names)
        self.parameter_names = tuple(p.name for p in self.parameters_spec)
        W = torch.zeros(len(wiring), len(store_names), dtype=torch.float64)
        for i, (_, src, tgt) in enumerate(wiring):
            if src is not None:
                W[i, store_names.index(src)] -= 1.0
            if tgt is not None:
                W[i, store_names.index(tgt)] += 1.0
        if "wiring_matrix" in self._buffers:
            self.wiring_matrix = W
        else:
            self.register_buffer("wiring_matrix", W)

    @property
    def n_stores(self) -> int:
        return len(self.stores)

    @property
    def n_fluxes(self) -> int:
        return len(self.flux_names)

    def flux_units(self) -> tuple[str, ...]:
        out = []
        for f in self.flux_modules:
            out += [getattr(f, "units", "")] * len(f.names)
        return tuple(out)

    def flux(self, name: str) -> FluxLike:
        """The module that computes flux ``name``."""
        for f in self.flux_modules:
            if name in f.names:
                return f
        raise ModelError(f"{self.name}: no flux {name!r}; fluxes: {list(self.flux_names)}")

    def neural_fluxes(self) -> list[FluxLike]:
        return [f for f in self.flux_modules if isinstance(f, (NeuralFlux, NeuralFluxGroup))]

    def replace_flux(self, new: FluxLike, name: str | None = None) -> "Model":
        """A copy of the model with flux ``name`` (default: ``new``'s name) replaced by ``new``.

        A :class:`NeuralFlux` given without source and target takes them from the
        flux it replaces. A :class:`NeuralFluxGroup` replaces every flux it names.
        """
        out = copy.deepcopy(self)
        if isinstance(new, NeuralFluxGroup):
            targets = list(new.names)
        else:
            targets = [name or new.name]
        positions = []
        for t in targets:
            if t not in out.flux_names:
                raise ModelError(f"{self.name}: no flux {t!r} to replace; fluxes: {list(self.flux_names)}")
            positions.append(next(i for i, f in enumerate(out.flux_modules) if t in f.names))
        if isinstance(new, Flux) and not getattr(new, "_wired", True):
            old = dict((w[0], w) for w in self.wiring)[targets[0]]
            new.source, new.target = old[1], old[2]
            new._wired = True
        keep = [f for i, f in enumerate(out.flux_modules) if i not in set(positions)]
        # the new flux goes where the first replaced one was, so evaluation order is kept
        at = min(positions)
        before = [f for i, f in enumerate(out.flux_modules) if i < at and i not in set(positions)]
        after = [f for f in keep if f not in before]
        out.flux_modules = nn.ModuleList(before + [new] + after)
        out._build()
        return out

    # ----------------------------------------------------------- parameters
    def to_physical(self, raw: torch.Tensor) -> torch.Tensor:
        """Unconstrained ``[..., P]`` -> physical values within the bounds."""
        low, high = self.param_low.to(raw.dtype), self.param_high.to(raw.dtype)
        return low + (high - low) * torch.sigmoid(raw)

    def to_unconstrained(self, physical: torch.Tensor) -> torch.Tensor:
        """Physical ``[..., P]`` -> unconstrained values (inverse of :meth:`to_physical`)."""
        # float64 on the model's device, whatever the values came as
        physical = torch.as_tensor(physical, dtype=torch.float64, device=self.param_low.device)
        self.check_parameters(physical)
        low, high = self.param_low.to(physical.dtype), self.param_high.to(physical.dtype)
        u = ((physical - low) / (high - low)).clamp(1e-9, 1 - 1e-9)
        return torch.log(u) - torch.log1p(-u)

    def check_parameters(self, physical: torch.Tensor) -> None:
        """Raise :class:`ModelError` naming parameter and basin for values outside bounds or NaN."""
        p = physical.detach()
        if p.shape[-1] != len(self.parameters_spec):
            raise ModelError(
                f"{self.name}: expected {len(self.parameters_spec)} parameters "
                f"{list(self.parameter_names)}, got shape {tuple(p.shape)}"
            )
        low, high = self.param_low.to(p.dtype), self.param_high.to(p.dtype)
        bad = ~((p >= low) & (p <= high))
        if bad.any():
            idx = bad.nonzero()[0].tolist()
            j = idx[-1]
            basin = f" for basin {idx[0]}" if p.ndim > 1 else ""
            spec = self.parameters_spec[j]
            raise ModelError(
                f"{self.name}: parameter {spec.name!r} = {float(p[tuple(idx)])}{basin} is outside its "
                f"bounds [{spec.low}, {spec.high}] {spec.units}"
            )

    def parameters_dict(self, physical: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[basin, P]`` physical values -> name -> ``[basin]``."""
        return dict(zip(self.parameter_names, physical.unbind(-1)))

    def physical_parameters(self) -> torch.Tensor:
        """The model's own parameter values ``[1 or basin, P]`` (differentiable w.r.t. ``raw``)."""
        return self.to_physical(self.raw)

    def set_parameters(
        self, values: Mapping[str, float | Sequence[float] | torch.Tensor] | torch.Tensor
    ) -> None:
        """Set the model's parameters from physical values.

        ``values`` is a tensor ``[P]`` / ``[basin, P]`` or a mapping name -> value
        (a number or per-basin values); names not given keep their current value.
        """
        if isinstance(values, Mapping):
            unknown = set(values) - set(self.parameter_names)
            if unknown:
                raise ModelError(
                    f"{self.name}: unknown parameters {sorted(unknown)}; parameters: {list(self.parameter_names)}"
                )
            cur = self.physical_parameters().detach()
            n = max([cur.shape[0]] + [torch.as_tensor(v).numel() for v in values.values()])
            new = cur.expand(n, -1).clone()
            for k, v in values.items():
                new[:, self.parameter_names.index(k)] = torch.as_tensor(v, dtype=new.dtype, device=new.device)
            values = new
        values = torch.as_tensor(values, dtype=torch.float64, device=self.param_low.device)
        if values.ndim == 1:
            values = values[None]
        with torch.no_grad():
            self.raw = nn.Parameter(self.to_unconstrained(values))

    # -------------------------------------------------------------- dynamics
    def initial_state(
        self, params: Vars, n_rows: int, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Initial stores ``[rows, n]`` from each store's ``initial`` (on ``device``, default the model's)."""
        device = self.wiring_matrix.device if device is None else device
        cols = []
        for s in self.stores:
            if callable(s.initial):
                cols.append(torch.as_tensor(s.initial(params), dtype=dtype, device=device).expand(n_rows))
            else:
                cols.append(torch.full((n_rows,), float(s.initial), dtype=dtype, device=device))
        return torch.stack(cols, dim=-1)

    def fluxes(self, stores: torch.Tensor, forcing: Vars, params: Vars) -> torch.Tensor:
        """All flux rates ``[rows, m]`` at stores ``[rows, n]``.

        ``forcing`` and ``params`` map names to ``[rows]`` tensors.
        """
        v = Vars(zip(self.store_names, stores.unbind(-1)))
        v.update(forcing)
        v.update(params)
        return torch.stack(self._evaluate(v), dim=-1)

    def _evaluate(self, v: Vars, bound: Sequence | None = None, stores: torch.Tensor | None = None,
                  folded: Sequence[bool] | None = None, split: Sequence | None = None) -> list[torch.Tensor]:
        """Each flux's rate, in order; ``v`` holds stores, forcing and parameters and gains the fluxes.

        With ``bound`` (see :meth:`_rate_function`) the networks run from their bound plans
        (``bound[i]``, ``None`` for a module run as is) on ``stores`` ``[n, rows]``.
        Fluxes marked in ``folded`` are already in ``v`` (evaluated once per period);
        ``split[i]``, where given, is flux ``i``'s varying part and its hoisted constants
        (:func:`adjointhydro._trace.split_flux`).
        """
        out = []
        cache: dict = {}  # values the networks of this evaluation share (limit factors)
        for i, f in enumerate(self.flux_modules):
            if folded is not None and folded[i]:
                out.append(v[f.name])
            elif split is not None and split[i] is not None:
                rate, inputs, hoisted = split[i]
                r = rate(*[v[n] for n in inputs], *hoisted)
                v[f.name] = r
                out.append(r)
            elif self._columnar[i]:
                cols = f._columns(v, None if bound is None else bound[i], stores, cache)
                v.update(zip(f.names, cols))
                out.extend(cols)
            elif isinstance(f, NeuralFluxGroup):  # a subclass with its own forward
                cols = f.forward(v).unbind(-1)
                v.update(zip(f.names, cols))
                out.extend(cols)
            else:
                # forward, not __call__: skips nn.Module hook dispatch, this runs millions of times
                r = f.forward(v)
                v[f.name] = r
                out.append(r)
        return out

    def _rate_function(self) -> "_PreparedRates":
        """:meth:`fluxes` prepared for many evaluations with the same weights (the solver's).

        The networks are prepared once (:meth:`_NeuralBase._plan`: normalisation and
        ``tanh`` rescaling folded into the weights, feature-major layout). Made under
        autograd, the preparation is part of the graph: gradients reach the networks'
        own weights. Make a new one after the weights change.
        """
        plans = [f._plan(self.store_names) if c else None for f, c in zip(self.flux_modules, self._columnar)]
        return _PreparedRates(self, plans)

    def extra_repr(self) -> str:
        lines = [f"name={self.name!r}", f"stores={list(self.store_names)}"]
        for n, s, t in self.wiring:
            lines.append(f"  {n}: {s or 'outside'} -> {t or 'outside'}")
        return "\n".join(lines)


class _PreparedRates:
    """The solver's rate function (:meth:`Model._rate_function`), feature-major.

    ``bind(const)`` takes the variables that stay constant over a period (parameters,
    and piecewise-constant forcing), ``[rows]`` each, and folds them into the networks'
    first layers once; the function it returns maps stores ``[n, rows]`` (and any
    variables that change within the period, ``extra``) to rates ``[m, rows]``.

    Physics fluxes are split once (:func:`adjointhydro._trace.split_flux`): what reads
    only such constants is evaluated in ``bind``, once a period (all of EXP-HYDRO's
    snowfall and rainfall, half of its melt), the rest at every stage. A flux that cannot
    be traced is tried with the constants alone at the first ``bind``: one that reads a
    store or a varying input fails there and is evaluated at every stage from then on.
    """

    def __init__(self, model: Model, plans: list) -> None:
        self.model = model
        self.plans = plans
        self._folded: list[bool] | None = None  # per untraceable flux: evaluated in bind (None: not yet tried)
        self._straight_cache: dict = {}  # structure -> generated evaluation (:meth:`_straight`)
        known = list(model.store_names) + list(model.forcing_names) + list(model.parameter_names)
        self._known: list[tuple[str, ...]] = []  # per flux: the names it may read
        for f in model.flux_modules:
            self._known.append(tuple(known))
            known += list(f.names)

    def bind(self, const: Vars) -> Callable[..., torch.Tensor]:
        return self._function(self._bind_parts(const))

    def bind_rows(self, const: Vars, per: int) -> Callable[[int], Callable[..., torch.Tensor]]:
        """:meth:`bind` for many periods at once; returns ``at(k)``, the rate function of period ``k``.

        ``const`` holds ``[c * per]`` rows ordered [period, row]. The period-by-period solve
        binds a stretch of the record in one go and takes each period as contiguous
        selections (binding one period alone costs more than an evaluation of the fluxes;
        strided slices make every evaluation slower).
        """
        bound, const, folded, split = self._bind_parts(const)
        N = _rows_of(const) or per
        c = N // per

        def by_period(t):
            """``[..., c * per]`` as ``[c, ..., per]``, contiguous per period (others as they are)."""
            if not isinstance(t, torch.Tensor) or not t.dim() or t.shape[-1] != N:
                return None
            return t.reshape(t.shape[:-1] + (c, per)).movedim(-2, 0).contiguous()

        nets = []
        for bd in bound:
            if bd is None:
                nets.append(None)
                continue
            # biases are the same for every row: one [out, per] view serves each period
            layers = tuple((w, None if b is None else b[..., :per], act) for w, b, act in bd.layers)
            nets.append((bd._replace(layers=layers), by_period(bd.first)))
        consts = [(name, t, by_period(t)) for name, t in const.items()]
        splits = None if split is None else [
            None if sp is None else (sp[0], sp[1], [(t, by_period(t)) for t in sp[2]]) for sp in split]

        def parts(pick: Callable) -> tuple:
            """The bound parts with each per-period tensor ``tp`` replaced by ``pick(tp)``."""
            bound_k = [None if nt is None else (nt[0] if nt[1] is None else nt[0]._replace(first=pick(nt[1])))
                       for nt in nets]
            const_k = Vars((name, t if tp is None else pick(tp)) for name, t, tp in consts)
            split_k = None if splits is None else [
                None if sp is None else (sp[0], sp[1], tuple(t if tp is None else pick(tp) for t, tp in sp[2]))
                for sp in splits]
            return bound_k, const_k, folded, split_k

        def at(k: int) -> Callable[..., torch.Tensor]:
            return self._function(parts(lambda tp: tp[k]), straight)

        def stretch() -> tuple | None:
            """``(fused, table, stacked)`` for a compiled step over the whole stretch
            (:func:`adjointhydro._rk.integrate_stretch_compiled`): the generated function
            with fused layers, its table with each per-period entry stacked ``[c, ..., per]``,
            and which entries are (``None`` without a generated function)."""
            if straight is None:
                return None
            table = straight[1](parts(lambda tp: tp))
            first = straight[1](parts(lambda tp: tp[0]))
            # an entry made from per-period tensors differs from period 0's (shared: the same object)
            return straight[2], table, [isinstance(a, torch.Tensor) and a is not b for a, b in zip(table, first)]

        straight = self._straight((bound, const, folded, split))  # (one structure for all periods)
        at.stretch = stretch
        return at

    def _bind_parts(self, const: Vars) -> tuple:
        model = self.model
        bound = [None if p is None else f._bind(p, const) for f, p in zip(model.flux_modules, self.plans)]
        return (bound,) + self._split(const)

    def _function(self, parts: tuple, straight: tuple | None | bool = False) -> Callable[..., torch.Tensor]:
        """The rate function of bound ``parts`` (``straight``: :meth:`_straight` of their
        structure where known already)."""
        bound, const, folded, split = parts
        model = self.model
        names = model.store_names
        if straight is False:
            straight = self._straight(parts)
        table = None if straight is None else straight[1](parts)
        code = None if straight is None else straight[0]

        def rates(stores: torch.Tensor, extra: Vars | None = None) -> torch.Tensor:
            if code is not None and extra is None and not torch.is_grad_enabled():
                return code(stores, table)
            v = Vars(zip(names, stores.unbind(0)))
            v.update(const)
            if extra is not None:
                v.update(extra)
            return torch.stack(model._evaluate(v, bound, stores, folded, split), dim=0)

        return rates

    def _straight(self, parts: tuple) -> tuple[Callable, Callable, Callable] | None:
        """The rates of ``parts``' structure as one generated straight-line function, or ``None``.

        Returns ``(code, table, fused)``: ``code(stores, table(parts))`` equals the general
        evaluation without autograd and without varying inputs (the same operations in the
        same order; the dictionaries, loops and branches of :meth:`Model._evaluate` cost
        about a fifth of an evaluation of EXP-HYDRO M50). Made for models whose fluxes are
        all constant, split physics or plain networks (no partition); others keep the
        general evaluation. ``fused`` is ``code`` with each layer's matrix product written
        as a broadcast product and sum (equal to rounding), for a compiled step.
        """
        bound, const, folded, split = parts
        key = (folded, None if split is None else tuple(sp is None for sp in split),
               tuple(None if bd is None else (bd.store_w is None, bd.rest_w is None, bd.rest, bd.beta is None,
                                              tuple(b is None for _, b, _ in bd.layers)) for bd in bound))
        if key not in self._straight_cache:
            self._straight_cache[key] = _generate(self.model, parts)
        return self._straight_cache[key]

    def _split(self, const: Vars) -> tuple[Vars, tuple[bool, ...] | None, list | None]:
        """``const`` with the constant fluxes added, which those are, and each other physics
        flux's varying part with its constants evaluated (``None`` for the rest)."""
        model = self.model
        if self._folded is None:
            self._folded = [type(f) is Flux for f in model.flux_modules]  # physics fluxes only
        if not any(self._folded):
            return const, None, None
        const = Vars(const)
        folded = [False] * len(model.flux_modules)
        split: list | None = [None] * len(model.flux_modules)
        for i, f in enumerate(model.flux_modules):
            if not self._folded[i]:
                continue
            sp = split_flux(f, f.fn, tuple(const), self._known[i])
            if sp is not None:
                hoisted = sp.hoist(*[const[n] for n in sp.const_inputs])
                if sp.rate is None:
                    const[f.name] = hoisted[0]
                    folded[i] = True
                else:
                    split[i] = (sp.rate, sp.var_inputs, hoisted)
                continue
            try:
                r = f.forward(const)
            except Exception:
                # reads a store, a varying input or a later flux (or fails for a reason of
                # its own, which the evaluation at each stage then reports)
                r = None
            if isinstance(r, torch.Tensor):
                const[f.name] = r
                folded[i] = True
            else:
                self._folded[i] = False
        return const, tuple(folded), split


def _generate(model: Model, parts: tuple) -> tuple[Callable, Callable, Callable] | None:
    """Source of :meth:`_PreparedRates._straight` for ``parts``' structure, compiled."""
    bound, const, folded, split = parts
    lines = ["def rates(stores, t):"]
    env = {}  # variable name -> expression
    sn = [f"s{j}" for j in range(model.n_stores)]
    lines.append(f"    {', '.join(sn)}, = stores.unbind(0)")
    env.update(zip(model.store_names, sn))
    picks: list[Callable] = []  # table entries: functions of the parts

    def entry(pick: Callable) -> str:
        picks.append(pick)
        return f"t[{len(picks) - 1}]"

    limits: dict = {}
    for i, f in enumerate(model.flux_modules):
        if folded is not None and folded[i]:
            env[f.name] = entry(lambda p, n=f.name: p[1][n])
        elif split is not None and split[i] is not None:
            rate, inputs, hoisted = split[i]
            if any(n not in env for n in inputs):
                return None  # reads a varying input: general evaluation
            args = [env[n] for n in inputs] + [entry(lambda p, i=i, k=k: p[3][i][2][k]) for k in range(len(hoisted))]
            fn = entry(lambda p, i=i: p[3][i][0])
            lines.append(f"    f{i} = {fn}({', '.join(args)})")
            env[f.name] = f"f{i}"
        elif model._columnar[i] and bound[i] is not None and not f._partition:
            bd = bound[i]
            if any(n not in env for n in bd.rest) or any(s is not None and s not in env for s in f.limit_by):
                return None
            x = entry(lambda p, i=i: p[0][i].first)
            if bd.store_w is not None:
                lines.append(f"    x = addmm({x}, {entry(lambda p, i=i: p[0][i].store_w)}, stores)")
                x = "x"
            if bd.rest:
                xr = ", ".join(env[n] for n in bd.rest)
                lines.append(f"    x = addmm({x}, {entry(lambda p, i=i: p[0][i].rest_w)}, torch.stack([{xr}], 0))")
                x = "x"
            for li, (w, b, act) in enumerate(bd.layers):
                if li:
                    w_ = entry(lambda p, i=i, li=li: p[0][i].layers[li][0])
                    b_ = entry(lambda p, i=i, li=li: p[0][i].layers[li][1])
                    lines.append(f"    x = addmm({b_}, {w_}, {x})")
                    x = "x"
                if act is not None:
                    lines.append(f"    x = {entry(lambda p, i=i, li=li: p[0][i].layers[li][2])}({x})")
                    x = "x"
            if bd.beta is not None:
                lines.append(f"    x = softplus({x}, beta={entry(lambda p, i=i: p[0][i].beta)})")
            else:
                lines.append(f"    x = softplus({x}) * {entry(lambda p, i=i: p[0][i].out_scale)}")
            lines.append("    c = x.unbind(0)")
            for j, name in enumerate(f.names):
                col = f"c[{j}]"
                store = f.limit_by[j]
                if store is not None:
                    lk = (store, f.limit_scale)
                    if lk not in limits:
                        limits[lk] = f"lim{len(limits)}"
                        lines.append(f"    {limits[lk]} = torch.relu({env[store]})")
                        lines.append(f"    {limits[lk]} = {limits[lk]} / ({limits[lk]} + {f.limit_scale!r})")
                    col = f"{col} * {limits[lk]}"
                lines.append(f"    f{i}_{j} = {col}")
                env[name] = f"f{i}_{j}"
        else:
            return None  # a flux run as written
    lines.append(f"    return torch.stack([{', '.join(env[n] for n in model.flux_names)}], 0)")
    src = "\n".join(lines)
    if src not in _GENERATED:  # (compiling costs about 0.5 ms: once per structure, not per solve)
        pair = []
        for addmm in (torch.addmm, _fused_addmm):
            scope = {"torch": torch, "softplus": nn.functional.softplus, "addmm": addmm}
            exec(compile(src, "<adjointhydro generated rates>", "exec"), scope)
            pair.append(scope["rates"])
        _GENERATED[src] = tuple(pair)

    def table(p: tuple) -> list:
        return [pick(p) for pick in picks]

    return _GENERATED[src][0], table, _GENERATED[src][1]


def _fused_addmm(bias: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.addmm(bias, weight, x)`` as a broadcast product and a sum, for ``torch.compile``:
    the compiler fuses a layer written so with the activations around it into one loop,
    where a matrix product stays a library call of its own (a few microseconds each, for
    the small layers of a flux network; the whole step costs about 30 of them)."""
    return bias + _times(weight, x)


_GENERATED: dict[str, tuple] = {}  # source -> functions, with library and fused layers (:func:`_generate`)
