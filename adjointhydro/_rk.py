"""Native explicit Runge-Kutta integration over one forcing period, per row.

Private. Every row (basin, or basin x period in the parallel backward pass) has
its own step size: a flashy basin does not force small steps on a slow one.
Steps never cross a period boundary, so piecewise-constant forcing is exact
and the daily flux totals are integrals of the rates over the period.

The state is split in two: stores ``y`` and the period's flux totals ``q``, held
feature-major inside (``[n, rows]``, ``[m, rows]``). Only fluxes are evaluated; the
stores change by ``W^T q`` where ``W`` ``[m, n]`` is the model's wiring matrix (+1
into a store, -1 out of it), so storage change equals net flux total to rounding:
mass balance holds by construction, also for every intermediate stage.
"""
from __future__ import annotations

import math
import types
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from . import _inductor_stack

try:  # (a private module of torch; older versions lack it: the compiled stepper then takes a few steps a call)
    from torch._higher_order_ops.while_loop import while_loop
except ImportError:  # pragma: no cover
    while_loop = None

FluxFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tableau:
    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # a[i] are the weights of stages 0..i-1 for stage i
    b: tuple[float, ...]
    e: tuple[float, ...] | None = None  # b - b_hat; None for fixed-step methods
    order: int = 1  # order of the lower-order solution, for step-size control
    fsal: bool = False


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau("euler", (0.0,), ((),), (1.0,)),
    "midpoint": Tableau("midpoint", (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun": Tableau("heun", (0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": Tableau(
        "rk4", (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
    ),
    "bosh3": Tableau(
        "bosh3",
        (0.0, 0.5, 0.75, 1.0),
        ((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
        (2 / 9, 1 / 3, 4 / 9, 0.0),
        (2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        order=2,
        fsal=True,
    ),
    "dopri5": Tableau(
        "dopri5",
        (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        (
            (),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        (
            35 / 384 - 5179 / 57600,
            0.0,
            500 / 1113 - 7571 / 16695,
            125 / 192 - 393 / 640,
            -2187 / 6784 + 92097 / 339200,
            11 / 84 - 187 / 2100,
            -1 / 40,
        ),
        order=4,
        fsal=True,
    ),
}


_COEF_CACHE: dict = {}


def _coefficients(tab: Tableau, dtype: torch.dtype, device: torch.device) -> dict:
    """Tableau rows as tensors, made once per (method, dtype, device)."""
    key = (tab.name, dtype, device)
    if key not in _COEF_CACHE:
        def t(x):
            return torch.tensor(x, dtype=dtype, device=device)
        # normal tensors even if first made inside inference mode: later solves record graphs
        with torch.inference_mode(False):
            _COEF_CACHE[key] = {
                "b": t(list(tab.b)),
                "e": t(list(tab.e)) if tab.e is not None else None,
            }
    return _COEF_CACHE[key]


def _identity(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``eye(m)``, made once per (size, dtype, device): ``torch.eye`` costs a few evaluations' overhead."""
    key = ("eye", m, dtype, device)
    if key not in _COEF_CACHE:
        with torch.inference_mode(False):
            _COEF_CACHE[key] = torch.eye(m, dtype=dtype, device=device)
    return _COEF_CACHE[key]


WORK_LIMIT = "work limit"  # StepFailure.reason when max_work is exceeded


class StepFailure(RuntimeError):
    """A row could not be advanced (non-finite state or step-size underflow)."""

    def __init__(self, row: int, time: float, reason: str, period: int = 0) -> None:
        super().__init__(reason)
        self.row = row
        self.time = time  # within the period
        self.reason = reason
        self.period = period  # of a stretch (integrate_stretch_compiled)


def integrate_period(
    flux: Callable[[torch.Tensor | None], FluxFn],
    wiring: torch.Tensor,
    y0: torch.Tensor,
    span: float,
    dt0: torch.Tensor | None,
    tab: Tableau,
    rtol: float,
    atol: float,
    fixed_step: float | None,
    max_steps: int,
    max_work: int | None = None,
    groups: int = 1,
    record: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Integrate every row over one period of length ``span``.

    Args:
        flux: ``flux(idx)`` gives the rate function ``f(y, s) -> [m, rows]`` for the rows
            ``idx`` (``None``: all rows), at stores ``y`` ``[n, rows]`` and local time
            ``s`` ``[rows]`` (feature-major: one contiguous row per store or flux, which
            makes every elementwise operation of the fluxes contiguous).
        wiring: ``[m, n]`` matrix, store rates are ``rates @ wiring``.
        y0: stores at the period start ``[rows, n]``.
        dt0: proposed first step per row ``[rows]`` (adaptive methods); ``None``, or NaN
            for a row, chooses it (:func:`_initial_step`).
        fixed_step: step length for fixed-step methods (the last step of a period is
            shortened to end on its boundary).
        max_steps: steps one row may take in the period (:class:`StepFailure` beyond).
        max_work: row-steps all rows together may take (None: no limit); beyond it
            :class:`StepFailure` with reason ``"work limit"``. It bounds the memory of a
            replay under autograd, which keeps every step.
        groups: the rows are ``groups`` copies of ``rows // groups`` base rows (copy-major:
            row ``i`` of copy ``g`` is row ``g * (rows // groups) + i``). Every copy takes
            the steps its base row (copy 0) takes, so that the copies, started from
            perturbed stores, are the same discrete map as the base row: their
            differences are finite-difference Jacobians of that map.
        record: a list that receives, for each iteration, the accepted steps as
            ``(rows, s, h, y)``: their rows, start times ``[k]``, lengths ``[k]`` and
            start stores ``[n, k]`` (detached), for :func:`accepted_step`.

    Rows that have finished the period drop out of the work: once fewer than half the
    rows are still stepping, only those are evaluated (a storm day in one basin, or
    one period among thousands solved in parallel, does not make every row step).

    Returns:
        ``(y1, q, dt_next, dt_start, n_iterations, n_flux_evaluations)`` where ``y1``
        ``[rows, n]`` are the stores at the period end, ``q`` the flux totals over the
        period ``[rows, m]``, ``dt_next`` the proposed first step of the next period and
        ``dt_start`` the first step tried here.
    """
    rows, n = y0.shape
    dtype, device = y0.dtype, y0.device
    m = wiring.shape[0]
    wt = wiring.t()  # [n, m]: store change = wt @ flux totals
    # stores and totals advance together, x = [y; q] [n + m, rows]: x changes by wx @ (flux totals)
    wx = torch.cat([wt, _identity(m, wt.dtype, wt.device)], dim=0)
    s = torch.zeros(rows, dtype=dtype, device=device)
    y = y0.t()
    x = torch.cat([y, torch.zeros(m, rows, dtype=dtype, device=device)], dim=0)
    adaptive = tab.e is not None and fixed_step is None
    min_h = span * 1e-10
    coef = _coefficients(tab, dtype, device)
    f_all = flux(None)
    timed = getattr(f_all, "uses_time", True)  # False: rates constant in time within the period
    k_first = f_all(x[:n], s) if tab.fsal else None
    n_evals = 1 if tab.fsal else 0
    if adaptive:
        if dt0 is None or bool(torch.isnan(dt0).any()):
            with torch.no_grad():
                k0 = k_first if k_first is not None else f_all(x[:n], s)
                dt0 = _chosen_steps(dt0, f_all, wt, y.detach(), s, k0.detach(), span, tab, rtol, atol)
            n_evals += 1 if k_first is not None else 2
            if groups > 1:
                dt0 = dt0.view(groups, -1)[0].repeat(groups)
        h_prop = dt0.to(dtype).clamp(max=span)
    else:
        h_prop = torch.full((rows,), float(fixed_step or span), dtype=dtype, device=device)
    dt_start = h_prop
    n_iter = 0
    idx = None  # rows still stepping (None: all)
    f_sub = f_all
    n_stages = len(tab.c)
    # error exponent on the mean square (no square root): ratio ** (-1 / (order + 1))
    expo = -0.5 / (tab.order + 1)
    # working copies of the active rows
    xs, ss, hs, ks0 = x, s, h_prop, k_first
    work = 0
    while True:
        remaining = span - ss
        active = remaining > span * 1e-12
        n_active = int(active.sum())
        if n_active == 0:
            break
        all_active = n_active == active.shape[0]
        work += n_active
        if max_work is not None and work > max_work:
            r = int(active.nonzero()[0])
            raise StepFailure(r if idx is None else int(idx[r]), float(ss[r]), WORK_LIMIT)
        n_iter += 1
        if n_iter > max_steps:
            r = int(active.nonzero()[0])
            raise StepFailure(r if idx is None else int(idx[r]), float(ss[r]), f"more than {max_steps} steps in one period")
        if n_active <= active.shape[0] // 2:
            # compact: write finished rows back, keep working on the others only
            x, s, h_prop, k_first = _scatter(idx, (x, s, h_prop, k_first), (xs, ss, hs, ks0))
            sel = active.nonzero()[:, 0]
            idx = sel if idx is None else idx[sel]
            f_sub = flux(idx)
            xs, ss, hs = x[:, idx], s[idx], h_prop[idx]
            ks0 = k_first[:, idx] if k_first is not None else None
            remaining = span - ss
            active = torch.ones_like(ss, dtype=torch.bool)
            all_active = True
        ys = xs[:n]
        if not tab.fsal:
            ks0 = f_sub(ys, ss)
            n_evals += 1
        last = hs >= remaining
        h = torch.where(last, remaining, hs)
        if not all_active:
            h = torch.where(active, h, 0.0)
        ks = _stages(f_sub, wt, ys, ss, h, tab, ks0, timed)
        n_evals += n_stages - 1
        K = torch.stack(ks, dim=0).reshape(n_stages, -1)  # [stages, m * rows]
        x_new = torch.addmm(xs, wx, (coef["b"] @ K).view(m, -1) * h)
        s_new = torch.where(last, span, ss + h)
        with torch.no_grad():  # step control: no graph
            if adaptive:
                ex = wx @ ((coef["e"] @ K).view(m, -1) * h)
                scale = torch.maximum(xs.abs(), x_new.abs()).mul_(rtol).add_(atol)
                r2 = ex.div_(scale).square_().mean(dim=0)  # mean square of the scaled error
                if groups > 1:
                    # the base row's error decides for its copies (non-finite if any copy is)
                    r2g = r2.view(groups, -1)
                    r2 = torch.where(torch.isfinite(r2g).all(dim=0), r2g[0], float("nan")).repeat(groups)
                # a non-finite state makes the error non-finite: never accepted
                finite = torch.isfinite(r2)
                accept = (r2 <= 1.0) | ((h <= min_h) & finite)
                if not all_active:
                    accept = accept & active
                factor = r2.clamp_(min=1e-20).pow_(expo).mul_(0.9).clamp_(0.2, 10.0)
                h_next = (h * factor).clamp_(max=span)
                # a truncated last step says little about larger steps: keep the old proposal
                keep = accept & last & (h_next < hs)
                h_next = torch.where(keep, hs, h_next)
                hs = h_next if all_active else torch.where(active, h_next, hs)
                fail = ~accept & (h < 5.0 * min_h)
            else:
                accept = active
                fail = ~(torch.isfinite(x_new).all(dim=0))
            if not all_active:
                fail = fail & active
        if bool(fail.any()):
            r = int(fail.nonzero()[0])
            reason = "non-finite state" if not bool(torch.isfinite(x_new[:, r].detach()).all()) else "step size underflow"
            raise StepFailure(r if idx is None else int(idx[r]), float(ss[r]), reason)
        if record is not None:
            sel = accept.nonzero()[:, 0]
            record.append((sel if idx is None else idx[sel], ss[sel].detach(), h[sel].detach(),
                           xs[:n, sel].detach()))
        xs = torch.where(accept, x_new, xs)
        ss = torch.where(accept, s_new, ss)
        if tab.fsal:
            ks0 = torch.where(accept, ks[-1], ks0)
    x, s, h_prop, k_first = _scatter(idx, (x, s, h_prop, k_first), (xs, ss, hs, ks0))
    return x[:n].t(), x[n:].t(), h_prop, dt_start, n_iter, n_evals


def accepted_step(f: FluxFn, wiring: torch.Tensor, y: torch.Tensor, s: torch.Tensor, h: torch.Tensor,
         tab: Tableau) -> tuple[torch.Tensor, torch.Tensor]:
    """One Runge-Kutta step of each row, of its own length: the stores after it ``[n, rows]``
    and the flux totals over it ``[m, rows]``, from stores ``y`` ``[n, rows]`` at local times
    ``s`` with lengths ``h`` ``[rows]``. The same arithmetic as an accepted step of
    :func:`integrate_period` (whose first stage is the previous step's last, where the
    method is FSAL: here it is evaluated again, the same value)."""
    wt = wiring.t()
    coef = _coefficients(tab, y.dtype, y.device)
    ks = _stages(f, wt, y, s, h, tab, f(y, s), getattr(f, "uses_time", True))
    m = wiring.shape[0]
    dq = (coef["b"] @ torch.stack(ks, dim=0).reshape(len(tab.c), -1)).view(m, -1) * h
    return torch.addmm(y, wt, dq), dq


def _stages(f: FluxFn, wt: torch.Tensor, y: torch.Tensor, s: torch.Tensor, h: torch.Tensor, tab: Tableau,
            k0: torch.Tensor, timed: bool) -> list:
    """The stage rates of a step of lengths ``h`` from stores ``y`` ``[n, rows]`` at times
    ``s``, the first being ``k0``. Each stage's stores, y + wt @ (h * sum_j a_ij k_j), are
    fused multiply-adds (stacking the stages instead copies every earlier stage again)."""
    ks = [k0]
    for i in range(1, len(tab.c)):
        comb = None
        for a_ij, k_j in zip(tab.a[i], ks):
            if a_ij != 0.0:
                comb = k_j * a_ij if comb is None else torch.add(comb, k_j, alpha=a_ij)
        ks.append(f(torch.addmm(y, wt, comb * h), s + tab.c[i] * h if timed else s))
    return ks


def _scatter(idx, full, part):
    """Write the rows ``idx`` (the last dimension) of each ``part`` tensor into its ``full`` tensor (out of place)."""
    if idx is None:
        return part
    return tuple(None if f is None else f.index_copy(f.dim() - 1, idx, p) for f, p in zip(full, part))


def _chosen_steps(dt0, flux, wt, y0, s, k0, span, tab, rtol, atol):
    """``dt0`` with its NaN entries (or all of it, where ``None``) chosen by :func:`_initial_step`."""
    h0 = _initial_step(flux, wt, y0, s, k0, span, tab.order, rtol, atol)
    return h0 if dt0 is None else torch.where(torch.isnan(dt0), h0.to(dt0.dtype), dt0)


def _initial_step(flux, wt, y0, s, k0, span, order, rtol, atol):
    """Per-row first step (Hairer, Norsett & Wanner, II.4), so that a sharp start is not stepped over.

    Feature-major: ``wt`` ``[n, m]``, ``y0`` ``[n, rows]``, ``k0`` ``[m, rows]``.
    """
    scale_y = atol + rtol * y0.abs()
    f0 = wt @ k0
    d0 = torch.sqrt(((y0 / scale_y) ** 2).mean(dim=0))
    d1 = torch.sqrt(torch.cat([(f0 / scale_y) ** 2, (k0 / atol) ** 2], dim=0).mean(dim=0))
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6 * span), 0.01 * d0 / d1.clamp(min=1e-30))
    h0 = h0.clamp(max=span)
    k1 = flux(y0 + h0 * f0, s + h0)
    f1 = wt @ k1
    d2 = torch.sqrt(torch.cat([((f1 - f0) / scale_y) ** 2, ((k1 - k0) / atol) ** 2], dim=0).mean(dim=0)) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(h0 * 1e-3, torch.full_like(h0, 1e-6 * span)),
                     (0.01 / dmax.clamp(min=1e-30)) ** (1.0 / (order + 1)))
    h = torch.minimum(100 * h0, h1).clamp(max=span)
    # non-finite slopes (a failing flux): start small; rejection then reports the failure
    return torch.where(torch.isfinite(h), h, torch.full_like(h, 1e-6 * span))


# --------------------------------------------------------------------------- compiled step
_COMPILED: dict = {}  # structure -> compiled step (or None where compiling failed)
_COMPILE_FAILED: list = []  # the first failure's message, once seen (then eager from there on)
# up to this many rows the compiled CPU loop is scalar code: vectorised along the rows,
# its loops were mostly remainders (forward of 1 basin x 1 year 10.4 -> 6.6 ms, 2 basins
# 12.1 -> 9.7 ms; 4 basins 12.4 -> 14.6 ms, slower)
_SCALAR_ROWS = 2
_VARIANT_FAILED: list = []  # why a preferred variant (stack buffers) failed, where one did


# Runge-Kutta steps per call of the compiled stretch step where it is not one loop: each
# call costs a synchronisation on a GPU (on a CPU, measured before the loop: about 0.2
# ms a call; compiling 1, 2, 4 steps a call took 33, 40, 70 s cold on the 2-core VM, and
# the forward of 16 basins x 1 year 0.079, 0.059, 0.052 s)
_MICRO_STEPS = 4

# Devices where the compiled stretch is one loop (torch's ``while_loop``) over all its
# steps. On a CPU the loop runs in the compiled C++ wrapper: it compiles in about 10 s
# from a warm inductor cache, 28 s cold (four steps a call: 45 s warm), and the forward
# of 16 basins x 1 year takes 0.030 s instead of 0.040 s. On a GPU each iteration would
# read the loop condition back to the host.
_LOOP_DEVICES = ("cpu",) if while_loop is not None else ()


def integrate_stretch_compiled(code: Callable, table: list, stacked: list, c: int, c_pad: int,
                               wiring: torch.Tensor, y0: torch.Tensor, span: float, dt0: torch.Tensor | None,
                               tab: Tableau, rtol: float, atol: float, max_steps: int) -> tuple | None:
    """:func:`integrate_period` for ``c`` consecutive periods of all rows with a compiled step.

    For adaptive FSAL methods, rates constant over each period and a generated rate
    function ``code(stores, table)`` (:meth:`adjointhydro.model._PreparedRates._straight`),
    without autograd. ``table`` holds the stretch's entries: where ``stacked[i]``, entry
    ``i`` is ``[c, ..., rows]`` (one slice per period), else it serves every period.
    Stretches of any length ``c <= c_pad`` share one compiled function.

    Each row runs through the periods at its own pace (its own period index and time in
    it), so that the compiled code steps every row across period ends. On a CPU one call
    takes the whole stretch, a loop (torch's ``while_loop``) in the compiled C++
    wrapper; elsewhere one call takes :data:`_MICRO_STEPS` steps. The per-call cost of
    the compiled code (guards, about 200 us on a CPU; a synchronisation on a GPU) is paid
    once a stretch, or once per few steps, instead of once per step. Each row takes the
    same steps as in :func:`integrate_period`, period by period (rows finished early
    are masked, not compacted, so that the step keeps one shape).

    Returns stores ``[c, n, rows]`` and totals ``[c, m, rows]`` at each period's end, each
    period's first step ``[c, rows]``, the steps proposed for the next period ``[rows]``,
    and the numbers of steps and evaluations; ``None`` where compiling fails (the caller
    then steps eagerly). A failing row raises :class:`StepFailure` with its ``period``.
    """
    rows, n = y0.shape
    m = wiring.shape[0]
    dtype, device = y0.dtype, y0.device
    # stacked entries padded to ``c_pad`` periods (repeating the last): a record's last,
    # shorter stretch and records of other lengths reuse the compiled code
    cp = max(c, c_pad)
    tensors = [t if not st or cp == c else torch.cat([t, t[-1:].expand((cp - c,) + t.shape[1:])])
               for t, st in zip(table, stacked) if isinstance(t, torch.Tensor)]
    flags = tuple(bool(st) for t, st in zip(table, stacked) if isinstance(t, torch.Tensor))
    shapes = (rows, tuple((tuple(t.shape), t.dtype) for t in tensors))
    step = _compiled_stretch(code, table, flags, tab, n, m, shapes, device.type)
    if step is None:
        return None
    wt, wx, scal = _step_constants(wiring, dtype, device, span, rtol, atol)
    x = torch.cat([y0.t(), torch.zeros(m, rows, dtype=dtype, device=device)], dim=0)
    s = torch.zeros(rows, dtype=dtype, device=device)
    n_evals = 0
    if dt0 is None or bool(torch.isnan(dt0).any()):
        first = [t[0] if st else t for t, st in zip(table, stacked)]

        def flux(y, s_):
            return code(y, first)
        dt0 = _chosen_steps(dt0, flux, wt, x[:n], s, code(x[:n], first), span, tab, rtol, atol)
        n_evals += 2
    h = dt0.to(dtype).clamp(max=span)
    kf = torch.zeros(m, rows, dtype=dtype, device=device)
    p = torch.zeros(rows, dtype=torch.int64, device=device)
    nst = torch.zeros(rows, dtype=torch.int64, device=device)
    fresh = torch.ones(rows, dtype=torch.bool, device=device)
    limits = torch.tensor([c, max_steps], dtype=torch.int64, device=device)
    why = torch.zeros(rows, dtype=torch.int64, device=device)
    if step.loop:
        # one call: slot c of X and DT takes the writes of rows that neither end nor start a period
        X = torch.zeros(cp + 1, n + m, rows, dtype=dtype, device=device)
        DT = torch.zeros(cp + 1, rows, dtype=dtype, device=device)
        flat = torch.cat([t.reshape(-1) for t in [wt, wx, scal] + tensors])
        i, x, s, h, kf, p, nst, fresh, why, X, DT = step(x, s, h, kf, p, nst, fresh, why, X, DT, limits, flat)
        n_iter = int(i)
        n_evals += n_iter * len(tab.c)
        X, DT = X[:c], DT[:c]
        failed = bool((why > 0).any())
    else:
        X = torch.empty(c, n + m, rows, dtype=dtype, device=device)
        DT = torch.empty(c, rows, dtype=dtype, device=device)
        n_iter = 0
        while True:
            x, s, h, kf, p, nst, fresh, why, snaps, ended, started, at, hs, status = step(
                x, s, h, kf, p, nst, fresh, why, limits, wt, wx, scal, *tensors)
            n_iter += _MICRO_STEPS
            n_evals += _MICRO_STEPS * len(tab.c)
            status = int(status)  # (one synchronisation a call: 1 all rows done, 2 a row failed)
            # each row's period ends and starts of this call, written where they belong
            j, r = ended.nonzero(as_tuple=True)
            X[at[j, r], :, r] = snaps[j, :, r]
            j, r = started.nonzero(as_tuple=True)
            DT[at[j, r], r] = hs[j, r]
            failed = status >= 2
            if status:
                break
    if failed:
        r = int(why.nonzero()[0])
        reason = {1: "step size underflow", 2: "non-finite state",
                  3: f"more than {max_steps} steps in one period"}[int(why[r])]
        raise StepFailure(r, float(s[r]), reason, int(p[r]))
    return X[:, :n], X[:, n:], DT, h, n_iter, n_evals


_CANONICAL: dict = {}  # value or equivalent module method -> the first object seen


def _canonical(v):
    """One object per value (numbers, strings) or per parameter-free module method (an
    activation's ``forward``); anything else as it is."""
    if isinstance(v, (bool, int, float, str)):
        key = ("value", type(v), v)
    elif (hasattr(v, "__self__") and isinstance(v.__self__, torch.nn.Module)
          and not any(True for _ in v.__self__.parameters())):
        key = ("method", type(v.__self__), repr(v.__self__), getattr(v, "__func__", None))
    else:
        return v
    return _CANONICAL.setdefault(key, v)


_CONSTANTS: dict = {}  # (id(wiring), dtype, device, span, rtol, atol) -> (weak ref, (wt, wx, scalars))


def _step_constants(wiring, dtype, device, span, rtol, atol) -> tuple:
    """``wiring^T``, ``[wiring^T; eye]`` and the step's scalars as tensors, made once per solve setting."""
    key = (id(wiring), dtype, device, span, rtol, atol)
    ref, consts = _CONSTANTS.get(key, (None, None))
    if ref is None or ref() is not wiring:
        wt = wiring.t().contiguous().to(dtype)
        wx = torch.cat([wt, _identity(wiring.shape[0], dtype, device)], dim=0)
        consts = (wt, wx, torch.tensor([span, rtol, atol, span * 1e-10], dtype=dtype, device=device))
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        _CONSTANTS[key] = (weakref.ref(wiring), consts)
    return consts


def _compiled_stretch(code: Callable, table: list, flags: tuple, tab: Tableau, n: int, m: int,
                      shapes: tuple, device_type: str) -> Callable | None:
    """Masked Runge-Kutta steps of all rows across period ends, compiled once per
    structure and ``shapes`` (of the state and the table's tensors): on a CPU the whole
    stretch in one compiled loop, elsewhere :data:`_MICRO_STEPS` steps a call."""
    if _COMPILE_FAILED:
        return None
    loop = device_type in _LOOP_DEVICES
    # the same objects for equal entries (a new plan each solve makes new floats and bound
    # methods): one compiled step serves every solve, and dynamo's guards see the same values
    fixed = tuple((i, _canonical(t)) for i, t in enumerate(table) if not isinstance(t, torch.Tensor))
    key = (code, tuple((i, id(t)) for i, t in fixed), flags, tab.name, n, m, shapes, device_type, loop)
    if key in _COMPILED:
        return _COMPILED[key]
    slots = [i for i, t in enumerate(table) if isinstance(t, torch.Tensor)]
    size = len(table)
    stages = len(tab.c)
    b, e = tab.b, tab.e
    expo = -0.5 / (tab.order + 1)

    def filled(tensors, p):
        """The rate function's table for each row's period ``p``."""
        t = [None] * size
        for i, v in fixed:
            t[i] = v
        for i, v, st in zip(slots, tensors, flags):
            # a stacked entry [c, ..., rows]: each row's slice of its own period
            t[i] = v.gather(0, p.view((1,) * (v.dim() - 1) + (-1,)).expand((1,) + v.shape[1:]))[0] if st else v
        return t

    def one_step(x, s, h_prop, kf, p, nst, fresh, why, limits, wt, wx, scal, tensors):
        """One masked step of every row; also returns what the driver writes into place:
        the stores and totals, which rows ended a period, which started one, and their periods."""
        span, rtol, atol, min_h = scal[0], scal[1], scal[2], scal[3]
        c, max_steps = limits[0], limits[1]
        alive = p < c
        t = filled(tensors, p.clamp(max=c - 1))
        y = x[:n]
        # a period's start: its own first evaluation (the rates change at a period end)
        kf = torch.where(fresh, code(y, t), kf)
        started = fresh & alive
        at, h_start = p, h_prop
        remaining = span - s
        last = h_prop >= remaining
        h = torch.where(alive, torch.where(last, remaining, h_prop), 0.0)
        ks = [kf]
        for i in range(1, stages):
            comb = None
            for a_ij, k_j in zip(tab.a[i], ks):
                if a_ij != 0.0:
                    comb = k_j * a_ij if comb is None else comb + k_j * a_ij
            ks.append(code(y + _times(wt, comb * h), t))
        dq = sum(k_j * b_j for k_j, b_j in zip(ks, b) if b_j != 0.0) * h
        de = sum(k_j * e_j for k_j, e_j in zip(ks, e) if e_j != 0.0) * h
        x_new = x + _times(wx, dq)
        scale = torch.maximum(x.abs(), x_new.abs()) * rtol + atol
        r2 = (_times(wx, de) / scale).square().mean(dim=0)
        accept = ((r2 <= 1.0) | ((h <= min_h) & (r2 < float("inf")))) & alive
        factor = (r2.clamp(min=1e-20) ** expo * 0.9).clamp(0.2, 10.0)
        h_next = torch.minimum(h * factor, span)
        # a truncated last step says little about larger steps: keep the old proposal
        h_next = torch.where(accept & last & (h_next < h_prop), h_prop, h_next)
        h_prop = torch.where(alive, h_next, h_prop)
        nst = nst + alive.to(nst.dtype)
        # why a row fails (the first reason kept): 1 step size underflow, 2 a NaN rate or
        # state (its step proposal would be NaN from then on), 3 too many steps in one
        # period; an infinite error (an overflowing trial step) is a rejection
        why = torch.where(why > 0, why, torch.where(
            ~alive, 0, torch.where(torch.isnan(r2), 2, torch.where(
                ~accept & (h < 5.0 * min_h), 1, torch.where(nst >= max_steps, 3, 0)))))
        x = torch.where(accept, x_new, x)
        end = accept & last
        snap = x
        # the next period starts from the stores, with zero totals and its own evaluation
        x = torch.where(end, torch.cat([x[:n], torch.zeros_like(x[n:])], dim=0), x)
        s = torch.where(end, 0.0, torch.where(accept, s + h, s))
        kf = torch.where(accept, ks[-1], kf)
        nst = torch.where(end, 0, nst)
        return (x, s, h_prop, kf, p + end.to(p.dtype), nst, end, why), (snap, end, started, at, h_start)

    # the loop's constants (wiring, step scalars, the table's tensors) travel as one flat
    # tensor in the state's floating type (other entries, if any, cast back exactly),
    # sliced inside the loop's body: each input of the loop costs a tensor handle an
    # iteration in the compiled wrapper
    layout, o = [], 0
    for shape, dt in [((n, m), None), ((n + m, m), None), ((4,), None)] + list(shapes[1]):
        layout.append((o, math.prod(shape), shape, dt))
        o += math.prod(shape)

    def unpacked(flat):
        return [flat[o:o + k].view(shape).to(dt or flat.dtype) for o, k, shape, dt in layout]

    def looped(run_loop):
        def steps(x, s, h_prop, kf, p, nst, fresh, why, X, DT, limits, flat):
            """Steps until every row is through its ``c`` periods or one fails, in one
            loop: the period ends and starts written into ``X`` and ``DT`` (slot ``c``
            takes the writes of the rows that neither end nor start a period)."""
            # (the loop's functions index ``limits`` themselves: views of one tensor closed
            # over by both would alias, which the loop cannot take)
            # the state carried as two tensors, floating [x; s; h; kf] and integer
            # [p; nst; why; fresh]: each carried tensor costs handles and a buffer an iteration
            nm = x.shape[0]

            def cond(i, F, I, X, DT):
                return (I[0] < limits[0]).any() & (I[2] == 0).all()

            def body(i, F, I, X, DT):
                wt, wx, scal, *tensors = unpacked(flat)
                state, (snap, end, started, at, h_start) = one_step(
                    F[:nm], F[nm], F[nm + 1], F[nm + 2:], I[0], I[1], I[3].bool(), I[2],
                    limits, wt, wx, scal, tensors)
                x, s, h_prop, kf, p, nst, fresh, why = state
                c = limits[0]
                slot = torch.where(end, at, c)
                X = X.scatter(0, slot.view(1, 1, -1).expand(1, snap.shape[0], -1), snap.unsqueeze(0))
                DT = DT.scatter(0, torch.where(started, at, c).view(1, -1), h_start.unsqueeze(0))
                return (i + 1, torch.cat([x, s[None], h_prop[None], kf]),
                        torch.stack([p, nst, why, fresh.to(p.dtype)]), X, DT)

            i0 = torch.zeros((), dtype=torch.int64, device=x.device)
            F0 = torch.cat([x, s[None], h_prop[None], kf])
            I0 = torch.stack([p, nst, why, fresh.to(p.dtype)])
            i, F, I, X, DT = run_loop(cond, body, (i0, F0, I0, X, DT))
            return i, F[:nm], F[nm], F[nm + 1], F[nm + 2:], I[0], I[1], I[3].bool(), I[2], X, DT
        return steps

    def python_loop(cond, body, carried):
        while bool(cond(*carried)):
            carried = body(*carried)
        return carried

    if loop:
        # compiled: torch's loop operator; where compiling fails, the same steps in Python
        steps, eager = looped(while_loop), looped(python_loop)
    else:
        def steps(x, s, h_prop, kf, p, nst, fresh, why, limits, wt, wx, scal, *tensors):
            """:data:`_MICRO_STEPS` steps; the period ends and starts stacked for the caller."""
            outs = []
            state = (x, s, h_prop, kf, p, nst, fresh, why)
            for _ in range(_MICRO_STEPS):
                state, out = one_step(*state, limits, wt, wx, scal, tensors)
                outs.append(out)
            status = (~((state[4] < limits[0]).any())).to(torch.int8) + 2 * (state[7] > 0).any().to(torch.int8)
            return state + tuple(torch.stack(o) for o in zip(*outs)) + (status,)
        eager = steps

    # a code object of its own for each structure and shape: dynamo counts the variants
    # compiled from one code object, and past its limit (8) a full-graph compilation
    # fails, which would end compiling for the process
    compiled = types.FunctionType(steps.__code__.replace(co_name=f"stretch_steps_{len(_COMPILED)}"),
                                  steps.__globals__, steps.__name__, steps.__defaults__, steps.__closure__)
    if len(_COMPILED) >= 64:
        _COMPILED.clear()
    try:
        # on a CPU the compiled function's wrapper in C++, not Python: it allocates the
        # step's few hundred intermediate buffers (1.2-1.4x at 1-16 basins, 5-10 s more
        # compiling); the rate functions' stacked fluxes computed as one pointwise
        # kernel, not as views of their output (each view a tensor the wrapper makes anew
        # every iteration: 53 -> 8 a step)
        options = None
        candidates = []
        if device_type == "cpu":
            import torch._inductor.config as inductor_config

            options = {"cpp_wrapper": True}
            if hasattr(inductor_config, "force_pointwise_cat"):
                options["force_pointwise_cat"] = True
            if shapes[0] <= _SCALAR_ROWS and hasattr(inductor_config.cpp, "simdlen"):
                options["cpp.simdlen"] = 1  # (scalar C++: no vectors of rows to fill)
            # first with the loop's intermediate buffers on the stack (for few basins, 1.6x
            # the forward: most of an iteration went into allocating them); where that
            # fails to build, with inductor's own wrapper
            stack = _inductor_stack.backend(options)
            if stack is not None:
                candidates.append(torch.compile(compiled, fullgraph=True, dynamic=False, backend=stack))
        candidates.append(torch.compile(compiled, fullgraph=True, dynamic=False, options=options))
        fn = _guarded(candidates, eager)
    except Exception as err:  # (torch.compile itself unavailable)
        _compile_failed(err)
        return None
    fn.loop = loop  # (which driver the caller runs: one call, or a call per few steps)
    _COMPILED[key] = fn
    return fn


def _times(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``w @ v`` for a small ``w`` (the wiring, a flux network's layer) as a broadcast
    product and a sum, which the compiler fuses with the operations around it."""
    return (w.unsqueeze(2) * v.unsqueeze(0)).sum(1)


def _guarded(compiled: list, eager: Callable) -> Callable:
    """The first of the ``compiled`` variants that works, else ``eager`` (compilation
    happens at the first call: a variant that fails there is dropped for the next)."""
    state = {"fns": list(compiled)}

    def call(*args):
        while state["fns"]:
            try:
                return state["fns"][0](*args)
            except StepFailure:
                raise
            except Exception as err:
                state["fns"].pop(0)
                if not state["fns"]:
                    _compile_failed(err)
                else:  # (kept for diagnosis; the next variant is tried without a warning)
                    _VARIANT_FAILED.append(f"{type(err).__name__}: {err}"[:2000])
        return eager(*args)

    return call


def _compile_failed(err: Exception) -> None:
    """Warn once, and step eagerly from now on in this process."""
    import warnings

    first_line = str(err).splitlines()[0] if str(err) else ""
    warnings.warn(f"adjointhydro: compiling the Runge-Kutta step failed, stepping eagerly instead "
                  f"({type(err).__name__}: {first_line})", RuntimeWarning, stacklevel=3)
    _COMPILE_FAILED.append(str(err))
