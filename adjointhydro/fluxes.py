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

import contextlib
import math
import threading
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
    """A network prepared for repeated evaluation (:meth:`_NeuralBase._plan`).

    Feature-major: each layer is ``x <- act(W @ x + b)`` on ``x`` ``[features, rows]``
    (a contiguous row per feature; for the small matrices here a CPU ``addmm`` is about
    twice as fast this way round as ``x @ W.T``).
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor, Callable | None], ...]  # (W [out, in], b [out, 1], act)
    out_scale: torch.Tensor | None  # [n_out, 1]; None: folded into the last layer, see beta
    beta: float | None  # softplus(z, beta) of the last layer's output (out_scale folded in)
    store_w: torch.Tensor | None  # [h, n_stores]: first-layer weights of the inputs that are stores
    store_inputs: frozenset  # names of those inputs


class _Bound(NamedTuple):
    """A plan bound to the inputs that stay constant over a period (:meth:`_NeuralBase._bind`)."""

    first: torch.Tensor  # [h, rows] (or [h, 1]): bias plus the constant inputs' share of the first layer
    store_w: torch.Tensor | None
    rest_w: torch.Tensor | None  # [h, k]: first-layer weights of the inputs read at each call
    rest: tuple[str, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor, Callable | None], ...]  # first layer's act, then the rest
    out_scale: torch.Tensor | None
    beta: float | None


_grad_state = threading.local()


@contextlib.contextmanager
def _state_gradients_only():
    """Within: reverse passes through the networks' products skip the weight gradients
    (the solver's Jacobian passes ask only for gradients of the stores; the built-in
    ``addmm`` knows that from the autograd engine, a custom Function does not)."""
    before = getattr(_grad_state, "state_only", False)
    _grad_state.state_only = True
    try:
        yield
    finally:
        _grad_state.state_only = before


class _FeatureMajorAddmm(torch.autograd.Function):
    """``addmm(bias, W, x)`` on feature-major ``x`` ``[k, rows]``, with a reverse pass that stays fast.

    Mathematically the built-in ``addmm``. Its own reverse pass, vectorised over
    several cotangents (the solver's Jacobians), folds ``W^T @ g`` into one matrix
    product with a copy of every batch when ``W`` requires grad; here ``W`` enters the
    input gradient detached (outside ``create_graph``), which makes it a plain batched
    product: about a quarter less time for a replay and its two reverse passes.
    """

    # (forward with ctx, no setup_context: then apply binds no signature, about 50 us a call)
    @staticmethod
    def forward(ctx, bias: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, x)
        ctx.bias_broadcast = bias.shape[-1] == 1 and x.shape[-1] != 1
        return torch.addmm(bias, w, x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, x = ctx.saved_tensors
        # detached unless the reverse pass itself records a graph (double backward)
        if not torch.is_grad_enabled():
            w, x = w.detach(), x.detach()
        g_bias = g_w = g_x = None
        if ctx.needs_input_grad[2]:
            # (one output row: an outer product, which a broadcast product does in half the
            # time of a matrix product when vectorised over cotangents)
            g_x = w.t() * g if w.shape[0] == 1 else w.t() @ g
        # the bias always: it may carry the stores (a first layer whose inputs are split,
        # stores and rates varying within a period, is two products, the first the
        # second's bias); the weights are never functions of the stores
        if ctx.needs_input_grad[0]:
            g_bias = g.sum(-1, keepdim=True) if ctx.bias_broadcast else g
        if ctx.needs_input_grad[1] and not getattr(_grad_state, "state_only", False):
            g_w = g @ x.t()
        return g_bias, g_w, g_x


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

    _partition: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (variable, output positions) it splits

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

    def _net_out(self, v: Vars) -> torch.Tensor:
        """The network's raw outputs ``[..., n_out]``."""
        try:
            x = torch.stack([v[n] for n in self._inputs], dim=-1)
        except KeyError as e:
            raise KeyError(
                f"neural flux input {e.args[0]!r} is not a store, forcing, parameter or earlier flux; "
                f"available: {sorted(v)}"
            ) from None
        x = (x - self.input_loc.to(x.dtype)) / self.input_scale.to(x.dtype)
        for layer in self.net:
            x = layer.forward(x)  # skip nn.Module call machinery: runs once per stage and row batch
        return x

    def _net_out_bound(self, v: Vars, bound: _Bound, stores: torch.Tensor) -> torch.Tensor:
        """Raw outputs ``[n_out, rows]`` from a bound plan; ``stores`` ``[n_stores, rows]``.

        The products run feature-major (``W @ x``: about twice as fast for these small
        matrices on a CPU as ``x @ W^T``). Under autograd they go through
        :class:`_FeatureMajorAddmm`, whose reverse pass stays feature-major and fast
        in the solver's vectorised reverse passes (one per cotangent).
        """
        try:
            xr = [v[n] for n in bound.rest]
        except KeyError as e:
            raise KeyError(
                f"neural flux input {e.args[0]!r} is not a store, forcing, parameter or earlier flux; "
                f"available: {sorted(v)}"
            ) from None
        addmm = _FeatureMajorAddmm.apply if torch.is_grad_enabled() else torch.addmm
        x = bound.first
        if bound.store_w is not None:
            x = addmm(x, bound.store_w, stores)
        if xr:
            x = addmm(x, bound.rest_w, torch.stack(xr, dim=0))
        for i, (w, b, act) in enumerate(bound.layers):
            if i:
                x = addmm(b, w, x)
            if act is not None:
                x = act(x)
        return x

    def _columns(self, v: Vars, bound: _Bound | None = None, stores: torch.Tensor | None = None,
                 cache: dict | None = None) -> list[torch.Tensor]:
        """Each output's rate, ``[...]`` (the module) or ``[rows]`` (a bound plan).

        ``cache``: values shared by the fluxes of one evaluation (the ``limit_by``
        factors, which several networks limited by one store would each compute).
        """
        if bound is None:
            z = self._net_out(v)
            dim = -1
            pos = nn.functional.softplus(z) * (self.output_scale.to(z.dtype) / math.log(2.0))
        else:
            z = self._net_out_bound(v, bound, stores)
            dim = 0
            if bound.beta is not None:
                pos = nn.functional.softplus(z, beta=bound.beta)  # (= out_scale * softplus(z / out_scale))
            else:
                pos = nn.functional.softplus(z) * bound.out_scale
        # softplus / log 2 maps a zero net output to exactly output_scale; always >= 0
        cols: list[torch.Tensor | None] = list(pos.unbind(dim)) if pos.shape[dim] > 1 else [pos.select(dim, 0)]
        if self._partition:
            zc = z.unbind(dim)
            for var, idx in self._partition:
                try:
                    total = v[var]
                except KeyError:
                    raise KeyError(f"partition variable {var!r} is not a store, forcing, parameter or "
                                   f"earlier flux; available: {sorted(v)}") from None
                share = torch.softmax(torch.stack([zc[i] for i in idx], dim), dim) * total.to(z.dtype).unsqueeze(dim)
                for k, c in zip(idx, share.unbind(dim)):
                    cols[k] = c
        for i, store in enumerate(self.limit_by):
            if store is not None:  # (never a partitioned output)
                key = (store, self.limit_scale)
                factor = None if cache is None else cache.get(key)
                if factor is None:
                    s = torch.relu(v[store])
                    # Goes to zero as the store empties, ~1 once it holds a few limit_scale
                    factor = s / (s + self.limit_scale)
                    if cache is not None:
                        cache[key] = factor
                cols[i] = cols[i] * factor
        return cols

    def _plan(self, store_names: Sequence[str] = ()) -> "_Plan | None":
        """The network as ``x <- act(W @ x + b)`` steps on the raw inputs, for repeated evaluation.

        Mathematically the same function as the module, with fewer operations per call:
        the input normalisation is folded into the first layer's weights, and each
        ``tanh`` is evaluated as ``2 sigmoid(2 z) - 1`` with the factors folded into the
        neighbouring layers (a float64 ``sigmoid`` costs under half a ``tanh`` on a
        CPU). Inputs that are stores (``store_names``, in state order) get their
        first-layer weights as a ``[h, n_stores]`` matrix, so that the state is fed in
        without gathering. Differentiable: made under autograd, gradients reach the
        module's own weights. Made once per solve (or per replay), as the solver
        evaluates the flux thousands of times with the same weights. ``None`` for a
        network that is not an alternation of ``nn.Linear`` and activation modules
        (then the module runs as is).
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
            w = lin.weight
            w_eff = w * a if isinstance(a, torch.Tensor) else a * w
            b = w @ c if isinstance(c, torch.Tensor) else c * w.sum(1)
            b_eff = (b if lin.bias is None else lin.bias + b)[:, None]
            act_mod = layers[i + 1] if i + 1 < len(layers) else None
            if act_mod is None:
                steps.append((w_eff, b_eff, None))
                break
            if isinstance(act_mod, nn.Linear):
                return None
            if type(act_mod) is nn.Tanh:
                # tanh(z) = 2 sigmoid(2z) - 1: scale this layer by 2, the next one's inputs by (2, -1)
                steps.append((2.0 * w_eff, 2.0 * b_eff, torch.sigmoid))
                a, c = 2.0, -1.0
            else:
                steps.append((w_eff, b_eff, act_mod.forward))
                a, c = 1.0, 0.0
            i += 2
        out_scale = (self.output_scale.to(dtype) / math.log(2.0))[:, None]
        beta = None
        if out_scale.shape[0] == 1 and not self._partition and steps[-1][2] is None:
            # one output: scale * softplus(z) = softplus(scale * z, beta=1/scale), with the
            # scale folded into the last layer (one operation less at every evaluation)
            scale = float(out_scale)
            if scale > 0:
                w_last, b_last, _ = steps[-1]
                steps[-1] = (w_last * scale, b_last * scale, None)
                out_scale, beta = None, 1.0 / scale
        store_w = None
        from_stores = [(j, store_names.index(n)) for j, n in enumerate(self._inputs) if n in store_names]
        if from_stores:
            w_first = steps[0][0]
            cols = [j for j, _ in from_stores]
            at = torch.tensor([k for _, k in from_stores], device=w_first.device)
            store_w = w_first.new_zeros(w_first.shape[0], len(store_names)).index_copy(1, at, w_first[:, cols])
        return _Plan(tuple(steps), out_scale, beta, store_w,
                     frozenset(self._inputs[j] for j, _ in from_stores))

    def _bind(self, plan: _Plan, const: Mapping[str, torch.Tensor]) -> _Bound:
        """``plan`` with the inputs in ``const`` (``[rows]`` each, constant over a period) folded in."""
        w0, b0, act0 = plan.layers[0]
        ci = [j for j, n in enumerate(self._inputs) if n in const and n not in plan.store_inputs]
        first = b0
        if ci:
            xc = torch.stack([const[self._inputs[j]] for j in ci], dim=0).to(w0.dtype)
            first = torch.addmm(b0, w0[:, ci], xc)
        ri = [j for j, n in enumerate(self._inputs) if n not in const and n not in plan.store_inputs]
        rest_w = w0[:, ri] if ri else None
        layers = plan.layers[1:]
        rows = _rows_of(const)
        if rows is not None:
            # biases as [out, rows] views: a CPU addmm with a [out, 1] bias takes twice as long
            first = first.expand(-1, rows)
            layers = tuple((w, b.expand(-1, rows), act) for w, b, act in layers)
        return _Bound(first, plan.store_w, rest_w, tuple(self._inputs[j] for j in ri),
                      ((None, None, act0),) + layers, plan.out_scale, plan.beta)


def _rows_of(const: Mapping[str, torch.Tensor]) -> int | None:
    """The number of rows of bound constants ``[rows]`` (``None``: none has a row dimension)."""
    return next((t.shape[-1] for t in const.values() if isinstance(t, torch.Tensor) and t.dim()), None)


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

    def forward(self, v: Vars) -> torch.Tensor:
        return self._columns(v)[0]


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

    def forward(self, v: Vars) -> torch.Tensor:
        return torch.stack(self._columns(v), dim=-1)
