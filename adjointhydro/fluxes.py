"""Fluxes: the arrows between stores.

A flux moves water (or any conserved quantity) from one store to another, or
between a store and the outside. It is either a physics expression
(:class:`Flux`) or a neural network (:class:`NeuralFlux`, or one network for
several fluxes, :class:`NeuralFluxGroup`). Every flux is a rate (e.g. mm/day)
and is evaluated for many rows (basins) at once: each variable it reads is a
1-D tensor ``[rows]``.

Inside a flux the variables are read by name from a :class:`Vars` mapping that
holds the stores, the forcing, the physical parameters and every flux computed
before it (in the order the model lists them), e.g. ``v["soil"]`` or ``v.soil``.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

__all__ = [
    "Flux",
    "NeuralFlux",
    "NeuralFluxGroup",
    "Vars",
    "smooth_step",
    "OUTSIDE",
]

#: Marker for the world outside the model (sources of forcing, sinks of outflow).
OUTSIDE = None


class Vars(dict):
    """Name -> tensor ``[rows]`` mapping with attribute access (``v.soil``)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"no variable {name!r} here; available: {sorted(self)}"
            ) from None


def smooth_step(x: torch.Tensor, sharpness: float | None = 5.0) -> torch.Tensor:
    """Smooth Heaviside step, ``(tanh(sharpness * x) + 1) / 2``.

    As used by Hoge et al. (2022) for EXP-HYDRO's thresholds (sharpness 5 per unit
    of ``x``). ``sharpness=None`` gives the hard step (0 for x<0, 1 for x>=0), kept
    for reference solutions; it has zero gradient almost everywhere.
    """
    if sharpness is None:
        return (x >= 0).to(x.dtype)
    # sigmoid(2 k x) == (tanh(k x) + 1) / 2, in one kernel instead of three
    return torch.sigmoid((2.0 * sharpness) * x)


class _Plan(NamedTuple):
    """A network prepared for repeated evaluation (:meth:`_NeuralBase._plan`)."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor, Callable | None], ...]
    out_scale: torch.Tensor


class Flux(nn.Module):
    """A physics flux: ``rate = fn(v)``.

    Args:
        name: flux name, unique in the model (e.g. ``"et"``).
        source: store the flux leaves, or ``None`` for the outside (e.g. rainfall).
        target: store the flux enters, or ``None`` for the outside (e.g. discharge).
        fn: function of a :class:`Vars` returning the rate ``[rows]``.
        units: units of the rate, e.g. ``"mm/day"``.
        description: one line for reports.
    """

    def __init__(
        self,
        name: str,
        source: str | None,
        target: str | None,
        fn: Callable[[Vars], torch.Tensor],
        units: str = "mm/day",
        description: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        self.source = source
        self.target = target
        self.fn = fn
        self.units = units
        self.description = description

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def wiring(self) -> tuple[tuple[str, str | None, str | None], ...]:
        return ((self.name, self.source, self.target),)

    @property
    def inputs(self) -> tuple[str, ...]:
        return ()

    def forward(self, v: Vars) -> torch.Tensor:
        return self.fn(v)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.source or 'outside'} -> {self.target or 'outside'}"


def _mlp(n_in: int, n_out: int, hidden: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class _NeuralBase(nn.Module):
    """Shared machinery: declared inputs, normalisation, non-negative output."""

    def __init__(
        self,
        inputs: Sequence[str],
        n_out: int,
        hidden: Sequence[int],
        activation: type[nn.Module],
        input_loc: Mapping[str, float] | None,
        input_scale: Mapping[str, float] | None,
        output_scale: float | Sequence[float],
        limit_by: Sequence[str | None] | None,
        limit_scale: float,
    ) -> None:
        nn.Module.__init__(self)  # explicit: NeuralFlux also derives from Flux
        if not inputs:
            raise ValueError("a neural flux needs at least one declared input")
        self._inputs = tuple(inputs)
        self.net = _mlp(len(self._inputs), n_out, hidden, activation)
        loc = [float((input_loc or {}).get(n, 0.0)) for n in self._inputs]
        scale = [float((input_scale or {}).get(n, 1.0)) for n in self._inputs]
        if any(s <= 0 for s in scale):
            raise ValueError(f"input scales must be positive, got {dict(zip(self._inputs, scale))}")
        self.register_buffer("input_loc", torch.tensor(loc, dtype=torch.get_default_dtype()))
        self.register_buffer("input_scale", torch.tensor(scale, dtype=torch.get_default_dtype()))
        osc = [float(output_scale)] * n_out if isinstance(output_scale, (int, float)) else [float(s) for s in output_scale]
        if len(osc) != n_out:
            raise ValueError(f"output_scale needs {n_out} values, got {len(osc)}")
        self.register_buffer("output_scale", torch.tensor(osc, dtype=torch.get_default_dtype()))
        self.limit_by = tuple(limit_by) if limit_by is not None else (None,) * n_out
        self.limit_scale = float(limit_scale)
        # Start near output_scale * softplus(0) / log 2 = output_scale for a zero net.
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.zero_()

    @property
    def inputs(self) -> tuple[str, ...]:
        return self._inputs

    def set_normalisation(self, loc: Mapping[str, float], scale: Mapping[str, float]) -> None:
        """Set input centring and scaling (e.g. from a physics run's mean and std)."""
        with torch.no_grad():
            for i, n in enumerate(self._inputs):
                if n in loc:
                    self.input_loc[i] = float(loc[n])
                if n in scale:
                    s = float(scale[n])
                    if not s > 0:
                        raise ValueError(f"scale for input {n!r} must be positive, got {s}")
                    self.input_scale[i] = s

    def _net_out(self, v: Vars, plan: "_Plan | None" = None) -> torch.Tensor:
        """The network's raw outputs ``[rows, n_out]`` (inputs normalised here or in ``plan``)."""
        try:
            x = torch.stack([v[n] for n in self._inputs], dim=-1)
        except KeyError as e:
            raise KeyError(
                f"neural flux input {e.args[0]!r} is not a store, forcing, parameter or earlier flux; "
                f"available: {sorted(v)}"
            ) from None
        if plan is not None:
            for wt, b, act in plan.layers:
                x = torch.addmm(b, x, wt)
                if act is not None:
                    x = act(x)
            return x
        x = (x - self.input_loc.to(x.dtype)) / self.input_scale.to(x.dtype)
        for layer in self.net:
            x = layer.forward(x)  # skip nn.Module call machinery: runs once per stage and row batch
        return x

    def _raw(self, v: Vars, plan: "_Plan | None" = None) -> torch.Tensor:
        return self._positive(self._net_out(v, plan), plan)

    def _positive(self, z: torch.Tensor, plan: "_Plan | None" = None) -> torch.Tensor:
        # softplus / log 2 maps a zero net output to exactly output_scale; always >= 0
        scale = plan.out_scale if plan is not None else self.output_scale.to(z.dtype) / math.log(2.0)
        return nn.functional.softplus(z) * scale

    def _plan(self) -> "_Plan | None":
        """The network as ``x <- act(x @ Wt + b)`` steps on the raw inputs, for repeated evaluation.

        Mathematically the same function as the module, with fewer operations per call:
        the input normalisation is folded into the first layer's weights, and each
        ``tanh`` is evaluated as ``2 sigmoid(2 z) - 1`` with the factors folded into the
        neighbouring layers (a float64 ``sigmoid`` costs under half a ``tanh`` on a
        CPU). Differentiable: made under autograd, gradients reach the module's own
        weights. Made once per solve (or per replay), as the solver evaluates the flux
        thousands of times with the same weights. ``None`` for a network that is not
        an alternation of ``nn.Linear`` and activation modules (then the module runs as is).
        """
        layers = list(self.net)
        steps: list[tuple[torch.Tensor, torch.Tensor, Callable | None]] = []
        i = 0
        w0 = layers[0].weight if layers and isinstance(layers[0], nn.Linear) else None
        if w0 is None:
            return None
        dtype = w0.dtype
        # the affine map of the inputs of the next linear layer: h -> a * h + c
        a = 1.0 / self.input_scale.to(dtype)
        c = -self.input_loc.to(dtype) * a
        while i < len(layers):
            lin = layers[i]
            if not isinstance(lin, nn.Linear):
                return None
            wt = lin.weight.t()
            wt_eff = a[:, None] * wt if isinstance(a, torch.Tensor) else a * wt
            b = c @ wt if isinstance(c, torch.Tensor) else c * wt.sum(0)
            b_eff = b if lin.bias is None else lin.bias + b
            act_mod = layers[i + 1] if i + 1 < len(layers) else None
            if act_mod is None:
                steps.append((wt_eff, b_eff, None))
                break
            if isinstance(act_mod, nn.Linear):
                return None
            if type(act_mod) is nn.Tanh:
                # tanh(z) = 2 sigmoid(2z) - 1: scale this layer by 2, the next one's inputs by (2, -1)
                steps.append((2.0 * wt_eff, 2.0 * b_eff, torch.sigmoid))
                a, c = 2.0, -1.0
            else:
                steps.append((wt_eff, b_eff, act_mod.forward))
                a, c = 1.0, 0.0
            i += 2
        return _Plan(tuple(steps), self.output_scale.to(dtype) / math.log(2.0))

    def _limit(self, out: torch.Tensor, v: Vars, i: int) -> torch.Tensor:
        store = self.limit_by[i]
        if store is None:
            return out
        s = torch.relu(v[store])
        # Goes to zero as the store empties, ~1 once it holds a few limit_scale
        return out * (s / (s + self.limit_scale))


class NeuralFlux(_NeuralBase, Flux):
    """A flux given by a small MLP of declared inputs; non-negative by construction.

    ``rate = output_scale * softplus(MLP((x - loc) / scale)) / log(2)``, so an
    untrained network with a zero last layer returns ``output_scale``.

    Args:
        name, source, target, units: as for :class:`Flux`. ``source``/``target``
            may be left out when the flux replaces one of the same name
            (:meth:`adjointhydro.model.Model.replace_flux` keeps the wiring).
        inputs: names of stores, forcing variables, parameters or earlier fluxes.
        hidden: widths of the hidden layers.
        input_loc, input_scale: per-input centring and scale (default 0 and 1).
        output_scale: typical size of the rate (e.g. mm/day).
        limit_by: a store whose content limits the flux: the rate is multiplied by
            ``S / (S + limit_scale)``, so it vanishes as the store empties.
    """

    def __init__(
        self,
        name: str,
        inputs: Sequence[str],
        source: str | None = None,
        target: str | None = None,
        *,
        hidden: Sequence[int] = (16, 16),
        activation: type[nn.Module] = nn.Tanh,
        input_loc: Mapping[str, float] | None = None,
        input_scale: Mapping[str, float] | None = None,
        output_scale: float = 1.0,
        limit_by: str | None = None,
        limit_scale: float = 1.0,
        units: str = "mm/day",
        description: str = "",
        wired: bool | None = None,
    ) -> None:
        _NeuralBase.__init__(
            self, inputs, 1, hidden, activation, input_loc, input_scale, output_scale,
            (limit_by,), limit_scale,
        )
        self.name = name
        self.source = source
        self.target = target
        self.units = units
        self.description = description or f"neural network of {', '.join(inputs)}"
        # wired=False means source/target are still to be taken from the flux it replaces
        self._wired = (source is not None or target is not None) if wired is None else wired

    def forward(self, v: Vars, plan: _Plan | None = None) -> torch.Tensor:
        return self._limit(self._raw(v, plan)[..., 0], v, 0)


class NeuralFluxGroup(_NeuralBase):
    """One network that gives several fluxes at once (e.g. Hoge et al.'s M100).

    Every output is non-negative: ``output_scale * softplus(z) / log(2)`` of its raw
    network output ``z``, optionally times a ``limit_by`` factor, as for
    :class:`NeuralFlux`. Outputs named in ``partition`` are instead shares of a
    variable: for ``partition={"P": ("snowfall", "rainfall")}``

        ``(snowfall, rainfall) = softmax(z_snowfall, z_rainfall) * P``

    so they are non-negative (for ``P >= 0``) and sum exactly (to rounding) to ``P``
    whatever the weights and inputs: the network decides how P is split, never how
    much of it there is. An untrained network (zero last layer) splits equally.

    Args:
        fluxes: ``(name, source, target)`` for each output.
        inputs, hidden, ...: as for :class:`NeuralFlux`; ``output_scale`` and
            ``limit_by`` may be given per output (both are ignored for, resp. must be
            ``None`` for, partitioned outputs).
        partition: variable name -> names of the outputs that split it (each output
            in at most one group). The variable is read by name like an input (a
            forcing variable, store, parameter or earlier flux); it need not be one
            of ``inputs``.
    """

    def __init__(
        self,
        fluxes: Sequence[tuple[str, str | None, str | None]],
        inputs: Sequence[str],
        *,
        hidden: Sequence[int] = (32, 32),
        activation: type[nn.Module] = nn.Tanh,
        input_loc: Mapping[str, float] | None = None,
        input_scale: Mapping[str, float] | None = None,
        output_scale: float | Sequence[float] = 1.0,
        limit_by: Sequence[str | None] | None = None,
        limit_scale: float = 1.0,
        units: str = "mm/day",
        name: str = "network",
        partition: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(
            inputs, len(fluxes), hidden, activation, input_loc, input_scale, output_scale,
            limit_by, limit_scale,
        )
        self._wiring = tuple((str(n), s, t) for n, s, t in fluxes)
        self.name = name
        self.units = units
        names = [w[0] for w in self._wiring]
        if len(self.limit_by) != len(names):
            raise ValueError(f"limit_by needs {len(names)} values, got {len(self.limit_by)}")
        groups: list[tuple[str, tuple[int, ...]]] = []
        seen: set[str] = set()
        for var, members in (partition or {}).items():
            members = (members,) if isinstance(members, str) else tuple(members)
            if not members:
                raise ValueError(f"partition of {var!r} names no outputs")
            for m in members:
                if m not in names:
                    raise ValueError(f"partition of {var!r}: {m!r} is not an output; outputs: {names}")
                if m in seen:
                    raise ValueError(f"partition: output {m!r} is in more than one group")
                if self.limit_by[names.index(m)] is not None:
                    raise ValueError(f"partition: output {m!r} cannot also have limit_by "
                                     f"(its share of {var!r} would no longer sum to it)")
                seen.add(m)
            groups.append((str(var), tuple(names.index(m) for m in members)))
        self._partition = tuple(groups)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(w[0] for w in self._wiring)

    @property
    def wiring(self) -> tuple[tuple[str, str | None, str | None], ...]:
        return self._wiring

    @property
    def partition(self) -> dict[str, tuple[str, ...]]:
        """Variable -> names of the outputs that split it (empty without a partition)."""
        names = self.names
        return {var: tuple(names[i] for i in idx) for var, idx in self._partition}

    def forward(self, v: Vars, plan: _Plan | None = None) -> torch.Tensor:
        if not self._partition:
            out = self._raw(v, plan)
            if any(s is not None for s in self.limit_by):
                cols = [self._limit(out[..., i], v, i) for i in range(out.shape[-1])]
                out = torch.stack(cols, dim=-1)
            return out
        z = self._net_out(v, plan)
        pos = self._positive(z, plan)
        cols: list[torch.Tensor | None] = [None] * z.shape[-1]
        for var, idx in self._partition:
            try:
                total = v[var]
            except KeyError:
                raise KeyError(f"partition variable {var!r} is not a store, forcing, parameter or "
                               f"earlier flux; available: {sorted(v)}") from None
            share = torch.softmax(z[..., list(idx)], dim=-1) * total.to(z.dtype)[..., None]
            for k, i in enumerate(idx):
                cols[i] = share[..., k]
        for i in range(len(cols)):
            if cols[i] is None:
                cols[i] = self._limit(pos[..., i], v, i)
        return torch.stack(cols, dim=-1)
