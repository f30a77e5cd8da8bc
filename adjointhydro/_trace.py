"""Physics fluxes split into what changes within a period and what does not.

Private. A physics flux is a Python function of named variables. Traced once with
``torch.fx`` (on proxies, not numbers), its operations fall in two parts: those that
read only values constant over a period (parameters, piecewise-constant forcing,
fluxes of those), evaluated once per period, and the rest, evaluated at every
stage of the solver. EXP-HYDRO's melt, ``step(T - Tmax) * step(snow) *
min(snow, Df*(T - Tmax))``, keeps 5 of its 10 operations per stage.

A function that cannot be traced (Python control flow on values, a call outside
torch, tensors captured from outside) is run as it is, every stage; tracing never
changes what a flux computes.
"""
from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Sequence

import torch
import torch.fx as fx


class Split(NamedTuple):
    """A flux function in two parts.

    ``hoist(*const)`` takes the values of ``const_inputs`` and returns the tuple of
    constant intermediates; ``rate(*varying, *hoisted)`` takes the values of
    ``var_inputs`` followed by those and returns the rate. ``rate`` is ``None`` where
    the whole flux is constant: then ``hoist`` returns ``(rate,)``.
    """

    const_inputs: tuple[str, ...]
    hoist: Callable[..., tuple]
    var_inputs: tuple[str, ...]
    rate: Callable[..., torch.Tensor] | None


# arguments a traced operation may have besides other operations' values
_PLAIN = (fx.Node, int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout,
          torch.memory_format, slice, type(Ellipsis))

_RANDOM = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout", "exponential_", "uniform_")

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _TracingVars(dict):
    """What a flux sees while traced: a proxy per name, made on first use."""

    __slots__ = ("_make", "_known")

    def __init__(self, make: Callable[[str], fx.Proxy | None], known: frozenset) -> None:
        super().__init__()
        self._make = make
        self._known = known

    def __contains__(self, name) -> bool:  # as at run time, where every known name is there
        return name in self._known

    def _refuse(self, *args, **kwargs):
        # a function that looks at all variables sees other ones at run time: not traced
        raise TypeError("a flux that iterates over its variables is run as written")

    keys = values = items = __iter__ = __len__ = _refuse

    def __missing__(self, name: str):
        p = self._make(name)
        if p is None:
            raise KeyError(name)
        self[name] = p
        return p

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default


def split_flux(owner: object, fn: Callable, const: Sequence[str], known: Sequence[str]) -> Split | None:
    """``fn`` split at the names ``const`` (constant over a period) among the ``known`` ones.

    Cached per ``owner`` (the flux module), function and set of constant names.
    ``None`` where ``fn`` cannot be traced.
    """
    key = (fn, frozenset(const), tuple(known))
    per_owner = _CACHE.setdefault(owner, {})
    if key not in per_owner:
        try:
            per_owner[key] = _split(fn, frozenset(const), frozenset(known))
        except Exception:  # not traceable: run as written
            per_owner[key] = None
    return per_owner[key]


def _split(fn: Callable, const: frozenset, known: frozenset) -> Split | None:
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    names: dict[fx.Node, str] = {}

    def make(name: str) -> fx.Proxy | None:
        if name not in known:
            return None
        node = graph.placeholder(f"v{len(names)}")
        names[node] = name
        return fx.Proxy(node, tracer)

    out = fn(_TracingVars(make, known))
    if not isinstance(out, fx.Proxy):
        return None
    graph.output(out.node)
    for node in graph.nodes:
        # in-place operations would change a value the other part still reads
        if node.op == "call_method" and str(node.target).endswith("_"):
            return None
        # random draws: hoisting one would draw once a period instead of at every stage
        name = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_function", "call_method") and any(r in name for r in _RANDOM):
            return None
        # a tensor (or other object) taken from outside is not in the generated code
        leaves: list = []
        fx.node.map_aggregate((node.args, node.kwargs), leaves.append)
        if not all(isinstance(a, _PLAIN) for a in leaves):
            return None
    is_const: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            is_const[node] = names[node] in const
        elif node.op != "output":
            is_const[node] = all(is_const[a] for a in node.all_input_nodes)
    result = out.node
    if is_const[result]:
        boundary = [result]
    else:
        # constant values that a varying operation reads
        boundary = [n for n in graph.nodes if n.op != "output" and is_const[n]
                    and any(u.op != "output" and not is_const[u] for u in n.users)]
    const_ph = [n for n in graph.nodes if n.op == "placeholder" and is_const[n]]
    hoist = _compile(graph, [n for n in graph.nodes if n.op != "output" and is_const[n]], const_ph,
                     tuple(boundary), as_tuple=True)
    if is_const[result]:
        return Split(tuple(names[n] for n in const_ph), hoist, (), None)
    var_ph = [n for n in graph.nodes if n.op == "placeholder" and not is_const[n]]
    varying = [n for n in graph.nodes if n.op not in ("output", "placeholder") and not is_const[n]]
    rate = _compile(graph, varying, var_ph + boundary, result, as_tuple=False)
    return Split(tuple(names[n] for n in const_ph), hoist, tuple(names[n] for n in var_ph), rate)


def _compile(graph: fx.Graph, nodes: list, inputs: list, outputs, as_tuple: bool) -> Callable:
    """A Python function of ``inputs`` computing ``nodes`` (in graph order) and returning ``outputs``."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"x{i}")
    for n in nodes:
        if n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs) if as_tuple else env[outputs])
    # forward, not the module: the generated function without nn.Module's call machinery
    return fx.GraphModule(torch.nn.Module(), g).forward
