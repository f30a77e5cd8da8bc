"""Correct handling of ``jump_t`` in torchdiffeq's adaptive Runge-Kutta solvers.

Private. torchdiffeq 0.2.5 honours a jump only when a step straddles it strictly
(``t0 < jump < t0 + dt``). When a step lands exactly on a jump, the jump index
never advances and every later jump is silently ignored, so the solver steps
across day boundaries of piecewise-constant forcing without knowing it.

We register subclasses of torchdiffeq's adaptive solvers under private names
(``"_ah_dopri5"`` and so on) that (1) skip jumps already reached and (2) widen a
step that would land exactly on the next jump by a hair, so that torchdiffeq's
own strict test triggers and clips the step to the jump, re-evaluating the
right-hand side on the far side of the discontinuity; (3) evaluate the first
slope of every solve on the far side of a jump at its start time. torchdiffeq's global
solver table keeps its own entries untouched.
"""
from __future__ import annotations

import torch
import importlib

_odeint_mod = importlib.import_module("torchdiffeq._impl.odeint")
Perturb = importlib.import_module("torchdiffeq._impl.misc").Perturb

_ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun", "fehlberg2", "dopri8")


def _make(base: type) -> type:
    class JumpSafe(base):  # type: ignore[misc, valid-type]
        def _before_integrate(self, t):
            super()._before_integrate(t)
            # Evaluate the first slope on the far side of a jump at the start time, in the
            # direction of integration (torchdiffeq runs reversed solves in negated time, so
            # NEXT is the left limit there): the adjoint's backward solves start on day boundaries.
            f0 = self.func(t[0], self.y0, perturb=Perturb.NEXT)
            self.rk_state = self.rk_state._replace(f1=f0)

        def _adaptive_step(self, rk_state):  # noqa: D401 - torchdiffeq hook
            if len(self.jump_t):
                t0, dt = rk_state.t1, rk_state.dt
                last = len(self.jump_t) - 1
                while self.next_jump_index < last and self.jump_t[self.next_jump_index] <= t0:
                    self.next_jump_index += 1
                nj = self.jump_t[self.next_jump_index]
                if torch.isfinite(dt) and t0 < nj and t0 + dt.clamp(self.min_step, self.max_step) == nj:
                    rk_state = rk_state._replace(dt=(nj - t0) * (1 + 1e-7) + 1e-12)
            return super()._adaptive_step(rk_state)

    JumpSafe.__name__ = f"JumpSafe{base.__name__}"
    return JumpSafe


def jump_safe_method(method: str) -> str:
    """Name under which a jump-safe version of torchdiffeq's ``method`` is registered."""
    if method not in _ADAPTIVE:
        return method
    name = f"_ah_{method}"
    if name not in _odeint_mod.SOLVERS:
        _odeint_mod.SOLVERS[name] = _make(_odeint_mod.SOLVERS[method])
    return name


def is_adaptive(method: str) -> bool:
    return method in _ADAPTIVE
