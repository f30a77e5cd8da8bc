"""Calibration of physical parameters and end-to-end training of hybrid models.

Four entry points, all working on a :class:`~adjointhydro.forcing.Forcing` and
observed discharge ``[basin, time]`` (NaN = missing):

* :func:`calibrate` -- gradient-based calibration of a model's physical
  parameters (Adam or L-BFGS) with adjoint gradients, in the unconstrained space
  of :meth:`Model.to_physical` (bounds hold by construction). Several random
  starts run *as one batch*: every basin is replicated ``n_starts`` times as rows
  of a single solve, the per-row losses are summed, so each start gets its own
  gradient at the cost of (nearly) one solve.
* :func:`calibrate_de` -- the gradient-free baseline: scipy's differential
  evolution whose whole population is evaluated as one batched solve.
* :func:`pretrain_fluxes` -- fit the networks of a hybrid to the fluxes of a
  physics run (a cheap, ODE-free start for :func:`train_hybrid`).
* :func:`train_hybrid` -- train network weights (and optionally the physical
  parameters) end to end through the ODE against observed discharge, with
  validation-based early stopping and atomic, resumable checkpoints.

Plus :func:`masks_from_dates` to build warm-up / calibration / test masks.

Counting model runs: one *model run* is the simulation of one parameter set over
the whole record. A batched solve of ``R`` rows counts ``R`` model runs (10
starts of one basin = 10 model runs per solve; 3 basins x 10 starts = 30). A
gradient evaluation (forward solve plus adjoint backward pass) also counts as
one model run per row; its backward pass typically costs well under the forward
pass with the default checkpointed adjoint. Differential evolution counts one
model run per population member evaluated.
"""
from __future__ import annotations

import math
import os
import time as _time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .fluxes import Vars
from .forcing import Forcing
from .metrics import LOSSES
from .model import Model
from .solve import (_SENSITIVITY_NAMES, CheckpointedAdjoint, Solution,
                    SolverError, _as_sensitivity, solve)
from ._io import atomic_torch_save as _atomic_save  # the package's one atomic writer

__all__ = [
    "calibrate",
    "calibrate_de",
    "pretrain_fluxes",
    "train_hybrid",
    "masks_from_dates",
    "CalibrationResult",
    "TrainResult",
    "OPTIMIZERS",
    "LR_SCHEDULES",
]

#: Optimizer names accepted by :func:`calibrate`.
OPTIMIZERS = ("adam", "lbfgs")
#: Learning-rate schedules accepted by :func:`train_hybrid`.
LR_SCHEDULES = (None, "cosine", "step")

#: Random starts are drawn uniformly in this central fraction of each parameter's
#: range (in physical units): a start exactly on a bound has a vanishing gradient
#: in the logit parametrisation.
_START_MARGIN = 0.02
#: Largest L-BFGS trial step in the unconstrained (logit) parameter space, per
#: component: 4 moves a parameter from the middle of its range to 2% from a bound.
_LBFGS_TRUST = 4.0


# ------------------------------------------------------------------ results
@dataclass
class CalibrationResult:
    """Result of :func:`calibrate` / :func:`calibrate_de`.

    Attributes:
        parameters: best physical parameters ``[basin, P]`` (float64, detached).
        loss: best loss per basin ``[basin]`` (e.g. ``1 - NSE`` over the scored period).
        history: one dict per iteration (generation for DE): ``iteration``,
            ``loss`` (best so far, mean over basins), ``seconds`` (since the start),
            ``model_runs`` (cumulative; see the module docstring for the counting).
        n_model_runs: model runs in all (rows of every solve; DE: members evaluated).
        seconds: wall time of the whole calibration.
        all_start_losses: best loss of every start ``[n_starts, basin]`` (DE: ``[1, 1]``).
        parameter_names: names of the columns of ``parameters``.
        all_start_parameters: best physical parameters of every start ``[n_starts, basin, P]``.
        n_solves: number of (batched) solves.
        method: ``"adam"``, ``"lbfgs"`` or ``"de"``.
        stopped_at_target: whether ``target_loss`` was reached.
        n_failed_solves: solves that raised :class:`SolverError` (L-BFGS trial points
            scored as a large loss; DE batches split until the failing member, scored inf).
    """

    parameters: torch.Tensor
    loss: np.ndarray
    history: list[dict]
    n_model_runs: int
    seconds: float
    all_start_losses: np.ndarray
    parameter_names: tuple[str, ...] = ()
    all_start_parameters: torch.Tensor | None = None
    n_solves: int = 0
    method: str = ""
    stopped_at_target: bool = False
    n_failed_solves: int = 0

    def parameters_dict(self) -> dict[str, np.ndarray]:
        """Name -> best values ``[basin]``."""
        p = self.parameters.detach().cpu().numpy()
        return {n: p[:, j] for j, n in enumerate(self.parameter_names)}


@dataclass
class TrainResult:
    """Result of :func:`train_hybrid`.

    Attributes:
        history: one dict per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``lr``,
            ``seconds`` (of that epoch). The losses of epoch ``e`` are those of the
            weights *before* that epoch's gradient step (they come from the same
            forward run that gives the gradient).
        best_epoch: epoch whose (pre-step) weights had the lowest validation loss;
            the model holds these weights on return.
        best_val_loss: that validation loss (train loss if there is no ``val_mask``).
        stopped_early: patience ran out before ``epochs``.
        seconds: wall time of this call.
    """

    history: list[dict]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool = False
    seconds: float = 0.0


# ------------------------------------------------------------------ input checks
def _check_loss_name(loss: str) -> str:
    if not isinstance(loss, str) or loss.lower() not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)}")
    return loss.lower()


def _period_str(forcing: Forcing, mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return "(empty)"
    i, j = int(idx[0]), int(idx[-1])
    if forcing.dates is not None:
        return f"{forcing.dates[i]}..{forcing.dates[j]}"
    return f"steps {i}..{j}"


def _as_mask(mask: Any, T: int, what: str) -> np.ndarray:
    if mask is None:
        return np.ones(T, dtype=bool)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.dtype != bool:
        if m.dtype.kind in "iu" and np.isin(m, (0, 1)).all():
            m = m.astype(bool)
        else:
            raise ValueError(f"{what} must be a boolean array [time], got dtype {m.dtype}")
    if m.shape != (T,):
        raise ValueError(f"{what} must have shape [time] = ({T},) like the forcing, got {m.shape}")
    return m


def _as_observed(observed: Any, forcing: Forcing) -> np.ndarray:
    B, T = forcing.n_basins, forcing.n_steps
    if isinstance(observed, torch.Tensor):
        observed = observed.detach().cpu().numpy()
    try:
        o = np.asarray(observed, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"observed must be a numeric array [basin, time], got {type(observed).__name__}") from None
    if o.ndim == 1 and B == 1:
        o = o[None]
    if o.shape != (B, T):
        raise ValueError(
            f"observed has shape {o.shape} but the forcing is [basin={B}, time={T}]; "
            f"give observed discharge as [basin, time] on the forcing's time grid"
        )
    if np.isinf(o).any():
        raise ValueError("observed has infinite values; use NaN for missing observations")
    return o


def _scored_observations(
    observed: Any, forcing: Forcing, mask: Any, loss: str, what: str = "score_mask"
) -> tuple[np.ndarray, np.ndarray]:
    """Observed ``[B, T]`` with NaN outside ``mask``; checks every basin can be scored."""
    o = _as_observed(observed, forcing)
    m = _as_mask(mask, forcing.n_steps, what)
    if not m.any():
        raise ValueError(f"{what} selects no time step: nothing to score")
    period = _period_str(forcing, m)
    scored = np.where(m[None], o, np.nan)
    need = 1 if loss == "mse" else 2
    for b in range(o.shape[0]):
        ok = scored[b][~np.isnan(scored[b])]
        name = forcing.basins[b] if b < len(forcing.basins) else str(b)
        if len(ok) < need:
            raise ValueError(
                f"basin {name!r}: no valid observation in the scored period {period} "
                f"({len(ok)} non-missing value(s) where {what} is True; {loss} needs at least {need})"
            )
        if loss in ("nse", "kge") and ok.max() == ok.min():
            raise ValueError(
                f"basin {name!r}: observations are constant in the scored period {period}; "
                f"{loss} is undefined there"
            )
        if loss == "kge" and ok.mean() == 0:
            raise ValueError(f"basin {name!r}: zero mean observation in the scored period {period}; kge is undefined")
    return scored, m


def _row_losses(sim: torch.Tensor, obs: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of every row ``[R]`` (``1 - NSE``, ``1 - KGE`` or MSE), NaN in ``obs`` = not scored."""
    if loss == "kge":
        fn = LOSSES["kge"]
        return torch.stack([fn(sim[i : i + 1], obs[i : i + 1]) for i in range(sim.shape[0])])
    valid = ~torch.isnan(obs)
    o = torch.where(valid, obs, torch.zeros_like(obs))
    zero = torch.zeros_like(sim)
    err2 = torch.where(valid, (sim - o) ** 2, zero).sum(-1)
    n = valid.sum(-1).clamp_min(1).to(sim.dtype)
    if loss == "mse":
        return err2 / n
    mean_o = o.sum(-1, keepdim=True) / n[:, None]
    sst = torch.where(valid, (o - mean_o) ** 2, zero).sum(-1)
    return err2 / sst


def _replicate_initial_state(initial_state: Any, B: int, reps: int, n_stores: int) -> Any:
    """Tile a per-basin initial state over ``reps`` row blocks (row ``r*B + b`` is basin ``b``)."""
    if initial_state is None:
        return None
    if isinstance(initial_state, Mapping):
        out = {}
        for k, v in initial_state.items():
            t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
            if t.numel() == 1:
                out[k] = t
            elif t.numel() == B:
                out[k] = t.repeat(reps)
            else:
                raise ValueError(f"initial_state[{k!r}] has {t.numel()} values for {B} basins")
        return out
    t = torch.as_tensor(initial_state, dtype=torch.float64)
    if t.ndim == 1:
        t = t[None].expand(B, -1)
    if tuple(t.shape) != (B, n_stores):
        raise ValueError(f"initial_state must have shape [{B}, {n_stores}], got {tuple(t.shape)}")
    return t.repeat(reps, 1)


@contextmanager
def _frozen_networks(model: Model) -> Iterator[None]:
    """Network weights do not require grad inside (the solve then skips their gradients)."""
    ws = [p for f in model.neural_fluxes() for p in f.parameters()]
    old = [p.requires_grad for p in ws]
    try:
        for p in ws:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in zip(ws, old):
            p.requires_grad_(r)


def _progress_bar(total: int, enabled: bool, desc: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False)


class _TargetReached(Exception):
    pass


_CHECKPOINT_NAMES = tuple(k for k, v in _SENSITIVITY_NAMES.items() if v is CheckpointedAdjoint)

# A run given the checkpointed adjoint by name compiles its Runge-Kutta stepper
# (``CheckpointedAdjoint(compile=True)``) on a CPU where its solves have at most 64 basins
# and add up to at least this many basin-days. Measured on the 2-core VM (train_hybrid,
# benchmarks/bench_train_run.py): compiling costs 28 s from a cold cache (9 s from
# inductor's disk cache), and an epoch is then about 8e-6 s a basin-day faster (64
# basins x 1 year: 0.30 against 0.50 s; 16 x 2 years: 0.20 against 0.29 s), so from here
# it saves at least twice the cold cost. For 1-4 basins the gain per basin-day is larger
# (1 basin x 1 year: 0.019 against 0.027 s a training step, 2e-5 s a basin-day; 18 s of
# cold compiling); from 256 basins it is a quarter of that (1.02 against 1.23 s a
# gradient at 256 x 1 year).
_AUTO_COMPILE_BASIN_DAYS = 10_000_000
_AUTO_COMPILE_MAX_BASINS = 64


def _long_run_sensitivity(sensitivity: Any, rows: int, periods: int, solves: int, device: torch.device) -> Any:
    """``sensitivity``, or a compiled :class:`CheckpointedAdjoint` for a long run on a CPU.

    Only the name ``"checkpoint"`` is upgraded (an instance is used as given, so
    ``CheckpointedAdjoint()`` keeps a run uncompiled), and only where the compiled
    stepper is chosen for such batches and the run is long enough to repay compiling:
    ``rows`` basins a solve, ``periods`` periods, ``solves`` solves.
    """
    if not (isinstance(sensitivity, str) and sensitivity.lower() in _CHECKPOINT_NAMES):
        return sensitivity
    if (torch.device(device).type != "cpu" or rows > _AUTO_COMPILE_MAX_BASINS
            or rows * periods * solves < _AUTO_COMPILE_BASIN_DAYS):
        return sensitivity
    return CheckpointedAdjoint(compile=True, _automatic=True)


def _calibration_sensitivity(sensitivity: Any) -> Any:
    """The string ``"checkpoint"`` -> one checkpointed adjoint for the whole calibration.

    Its forward pass is parallel in time for the few rows of one or a few basins'
    starts (10-20x faster than period by period there) and period by period for large
    batches (the automatic rule of :class:`CheckpointedAdjoint`). Random starts and line
    searches visit stiff corners of the parameter box (e.g. EXP-HYDRO with ``f`` near 0
    and ``Qmax`` near 50, which needs thousands of steps a period); there a Newton
    replay that would need too many steps stops and its window is solved period by
    period, so memory stays bounded (about 340 MB for such corners of Leaf River). One
    instance serves every solve, so that each Newton solve starts from the previous
    trajectory. An explicit :class:`CheckpointedAdjoint` instance is used as given.
    """
    if isinstance(sensitivity, str) and sensitivity.lower() in _CHECKPOINT_NAMES:
        return CheckpointedAdjoint(parallel_forward=None)
    return sensitivity


# ------------------------------------------------------------------ calibrate
def calibrate(
    model: Model,
    forcing: Forcing,
    observed: Any,
    *,
    score_mask: Any = None,
    loss: str = "nse",
    optimizer: str = "adam",
    n_starts: int = 1,
    iterations: int = 100,
    lr: float | None = None,
    seed: int = 0,
    sensitivity: Any = "checkpoint",
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    initial_state: Any = None,
    target_loss: float | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> CalibrationResult:
    """Calibrate the physical parameters of ``model`` with adjoint gradients.

    The optimisation runs on unconstrained values ``raw`` with
    ``physical = model.to_physical(raw)``, so the bounds hold by construction.
    ``n_starts`` random starts per basin are drawn uniformly within the bounds
    (the central 96% of each range) from ``seed`` and run as ONE batched solve
    (rows ``start * B + basin``); the per-row losses are summed, so every start
    gets exactly its own gradient. With Adam (element-wise) each start follows
    the same path it would alone; with L-BFGS the starts share the line search
    and curvature history of the summed objective. The best start per basin is
    returned. The model itself is not changed (network weights are held fixed).

    Args:
        model: the model; its ``parameters_spec`` bounds define the search space.
        forcing: forcing ``[basin, time, variable]``.
        observed: observed discharge ``[basin, time]`` (``[time]`` for one basin), NaN = missing.
        score_mask: bool ``[time]``; False in the warm-up and outside the calibration
            period (default: all True).
        loss: ``"nse"`` (1 - NSE), ``"kge"`` (1 - KGE) or ``"mse"``, per basin.
        optimizer: ``"adam"`` or ``"lbfgs"`` (torch.optim.LBFGS, strong-Wolfe line search;
            one iteration = one L-BFGS iteration, which may evaluate several points).
        n_starts: random starts per basin, solved as one batch.
        iterations: optimizer iterations.
        lr: Adam learning rate in logit space (default 0.05), or L-BFGS initial step
            scale (default 1.0, the quasi-Newton step).
        seed: seed of the random starts.
        sensitivity, method, rtol, atol, initial_state: passed to :func:`~adjointhydro.solve.solve`
            (``initial_state`` per basin; it is replicated over the starts). The string
            ``"checkpoint"`` means one checkpointed adjoint for the whole calibration,
            parallel in time for a few rows (``CheckpointedAdjoint(parallel_forward=False)``
            solves period by period), compiled on a CPU where the calibration is long
            (at most 64 rows and ``rows x periods x iterations`` of at least ten million:
            10-30 s of compiling, then about 1.5x faster solves; ``CheckpointedAdjoint()``
            keeps it uncompiled). An L-BFGS trial point the solver cannot
            integrate (:class:`SolverError`) counts as a large loss.
        target_loss: stop as soon as the best loss of every basin is <= this value.
        progress: show a tqdm progress bar.
        dtype: floating type of the solves (default as :func:`~adjointhydro.solve.solve`:
            the networks' weights, else float64). The solves run on the forcing's device
            (``forcing.to(device=...)``, with the model moved there too); the optimiser's
            values and the results stay float64.

    Returns:
        a :class:`CalibrationResult`; ``n_model_runs`` counts ``n_starts * basins`` per solve.

    Raises:
        ValueError: unknown loss or optimizer, observed not ``[basin, time]`` of the
            forcing, or a basin without valid observations in the scored period;
            all before any solve.
    """
    t_start = _time.perf_counter()
    loss = _check_loss_name(loss)
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {list(OPTIMIZERS)}")
    optimizer = optimizer.lower()
    if not isinstance(model, Model):
        raise TypeError(f"model must be an adjointhydro Model, got {type(model).__name__}")
    if not isinstance(forcing, Forcing):
        raise TypeError(f"forcing must be an adjointhydro Forcing, got {type(forcing).__name__}")
    if int(n_starts) < 1:
        raise ValueError(f"n_starts must be at least 1, got {n_starts}")
    if int(iterations) < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not model.parameter_names:
        raise ValueError(f"model {model.name!r} has no physical parameters to calibrate")
    if lr is None:
        lr = 0.05 if optimizer == "adam" else 1.0
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    n_starts, iterations = int(n_starts), int(iterations)
    scored, _ = _scored_observations(observed, forcing, score_mask, loss)
    B, P = forcing.n_basins, len(model.parameter_names)
    R = n_starts * B
    sensitivity = _calibration_sensitivity(
        _long_run_sensitivity(sensitivity, R, forcing.n_steps, iterations, forcing.values.device))
    dev = forcing.values.device
    rows_forcing = forcing if n_starts == 1 else forcing.select(basins=list(range(B)) * n_starts)
    obs_rows = torch.as_tensor(np.tile(scored, (n_starts, 1)), device=dev)
    y0_rows = _replicate_initial_state(initial_state, B, n_starts, model.n_stores)

    # the starts are drawn on the CPU: the same seed gives the same starts on every device
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(n_starts, B, P, generator=gen, dtype=torch.float64)
    u = _START_MARGIN + (1 - 2 * _START_MARGIN) * u
    raw = (torch.log(u) - torch.log1p(-u)).reshape(R, P).to(dev).clone().requires_grad_(True)

    best_loss = torch.full((R,), float("inf"), dtype=torch.float64, device=dev)
    best_raw = raw.detach().clone()
    counters = {"solves": 0, "runs": 0, "failed": 0, "rejected": 0}
    history: list[dict] = []

    def evaluate(x: torch.Tensor) -> torch.Tensor:
        sol = solve(
            model, rows_forcing, parameters=model.to_physical(x), initial_state=y0_rows,
            method=method, rtol=rtol, atol=atol, sensitivity=sensitivity, dtype=dtype,
        )
        counters["solves"] += 1
        counters["runs"] += R
        L = _row_losses(sol.discharge, obs_rows.to(sol.discharge.dtype), loss)
        with torch.no_grad():
            Ld = torch.where(torch.isfinite(L), L.detach(), torch.full_like(L.detach(), float("inf")))
            better = Ld.to(torch.float64) < best_loss
            best_loss[better] = Ld.to(torch.float64)[better]
            best_raw[better] = x.detach()[better]
        return L

    def per_basin_best() -> torch.Tensor:
        return best_loss.view(n_starts, B).min(0).values

    def reached() -> bool:
        return target_loss is not None and bool((per_basin_best() <= target_loss).all())

    def record(it: int) -> None:
        history.append({
            "iteration": it,
            "loss": float(per_basin_best().mean()),
            "seconds": _time.perf_counter() - t_start,
            "model_runs": counters["runs"],
        })

    bar = _progress_bar(iterations, progress, f"calibrate ({optimizer})")
    stopped = False
    try:
        with _frozen_networks(model):
            if optimizer == "adam":
                opt = torch.optim.Adam([raw], lr=lr)
                for it in range(iterations):
                    opt.zero_grad()
                    L = evaluate(raw)
                    record(it)
                    if reached():
                        stopped = True
                        break
                    L = torch.where(torch.isfinite(L), L, torch.zeros_like(L))
                    L.sum().backward()
                    raw.grad.nan_to_num_(0.0, 0.0, 0.0)
                    opt.step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                if not stopped and iterations > 0:
                    with torch.no_grad():
                        evaluate(raw)  # the point after the last step
                    record(iterations)
                    stopped = reached()
            else:
                opt = torch.optim.LBFGS(
                    [raw], lr=lr, max_iter=1, max_eval=25, history_size=10, line_search_fn="strong_wolfe",
                    tolerance_grad=1e-10, tolerance_change=1e-12,
                )
                cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

                anchor = raw.detach().clone()

                def closure() -> torch.Tensor:
                    x = raw.detach()
                    for cx, cl, cg in cache:
                        if torch.equal(cx, x):  # LBFGS re-evaluates the accepted point
                            raw.grad = cg.clone()
                            return cl.clone()
                    opt.zero_grad()
                    # a trial point the solver cannot integrate (or a non-finite row loss)
                    # counts as a large loss with zero gradient: the line search steps back
                    finite = best_loss[torch.isfinite(best_loss)]
                    penalty = 10.0 * max(1.0, float(finite.max()) if len(finite) else 1.0)
                    if float((x - anchor).abs().max()) > _LBFGS_TRUST:
                        # so is a trial step that leaps across the bounds' sigmoid: near
                        # the bounds the gradient vanishes, the quasi-Newton step blows up
                        # and lands in a corner of the parameter box (on Leaf River, a
                        # bucket that empties and turns stiff: one trial solve took 156 s
                        # of a 4-minute calibration)
                        counters["rejected"] += 1
                        raw.grad = torch.zeros_like(raw)
                        return torch.tensor(penalty * R, dtype=torch.float64, device=dev)
                    try:
                        L = evaluate(raw)
                    except SolverError:
                        counters["failed"] += 1
                        counters["solves"] += 1
                        counters["runs"] += R
                        raw.grad = torch.zeros_like(raw)
                        return torch.tensor(penalty * R, dtype=torch.float64, device=dev)
                    L = torch.where(torch.isfinite(L), L, torch.full_like(L, penalty))
                    total = L.sum()
                    total.backward()
                    raw.grad.nan_to_num_(0.0, 0.0, 0.0)
                    cache.append((x.clone(), total.detach().clone(), raw.grad.clone()))
                    del cache[:-30]
                    if reached():
                        raise _TargetReached
                    return total.detach()

                for it in range(iterations):
                    before = raw.detach().clone()
                    anchor.copy_(before)
                    try:
                        opt.step(closure)
                    except _TargetReached:
                        record(it)
                        stopped = True
                        break
                    record(it)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                    if torch.equal(before, raw.detach()):
                        break  # converged (or the line search cannot progress)
    finally:
        if bar is not None:
            bar.close()

    if counters["solves"] == 0:  # iterations == 0: score the starts
        with torch.no_grad(), _frozen_networks(model):
            evaluate(raw)
        record(0)
        stopped = reached()
    start_losses = best_loss.view(n_starts, B)
    start_raw = best_raw.view(n_starts, B, P)
    pick = start_losses.argmin(0)
    best = start_raw[pick, torch.arange(B, device=dev)]
    with torch.no_grad():
        phys = model.to_physical(best).to(torch.float64).cpu()
        all_phys = model.to_physical(start_raw).to(torch.float64).cpu()
    start_losses = start_losses.cpu()
    return CalibrationResult(
        parameters=phys.detach(),
        loss=start_losses.min(0).values.numpy().copy(),
        history=history,
        n_model_runs=counters["runs"],
        seconds=_time.perf_counter() - t_start,
        all_start_losses=start_losses.numpy().copy(),
        parameter_names=tuple(model.parameter_names),
        all_start_parameters=all_phys.detach(),
        n_solves=counters["solves"],
        method=optimizer,
        stopped_at_target=bool(stopped and target_loss is not None and reached()),
        n_failed_solves=counters["failed"],
    )


# --------------------------------------------------------------- calibrate_de
def calibrate_de(
    model: Model,
    forcing: Forcing,
    observed: Any,
    *,
    score_mask: Any = None,
    loss: str = "nse",
    popsize: int = 15,
    maxiter: int = 100,
    seed: int = 0,
    tol: float = 0.0,
    target_loss: float | None = None,
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    initial_state: Any = None,
    polish: bool = False,
    dtype: torch.dtype | None = None,
) -> CalibrationResult:
    """Gradient-free baseline: scipy's differential evolution, population solved as one batch.

    Runs ``scipy.optimize.differential_evolution(vectorized=True, updating="deferred")``
    in the physical parameter box of ``model``; every generation's population
    (``popsize * P`` members) is evaluated as the rows of one solve without
    gradients, with the same model, data, solver and loss as :func:`calibrate`
    (the sequential forward pass, which keeps bounded memory in every corner of
    the box). A batch that raises :class:`SolverError` is split in halves until
    the failing members are found; they score ``inf``.

    Args:
        popsize, maxiter, tol, polish: as for scipy (``maxiter`` generations; ``tol=0``
            disables scipy's convergence test, so it runs ``maxiter`` generations
            unless ``target_loss`` is reached).
        seed: seed of scipy's random generator.
        target_loss: stop after the first generation whose best loss is <= this value.
        other arguments: as for :func:`calibrate`.

    Returns:
        a :class:`CalibrationResult` (``history`` per generation, ``iteration`` 0 being
        the initial population); ``n_model_runs`` = population members evaluated
        (plus single runs of the polish, if any).

    Raises:
        ValueError: forcing with more than one basin, and the input errors of :func:`calibrate`.
    """
    from scipy.optimize import differential_evolution

    t_start = _time.perf_counter()
    loss = _check_loss_name(loss)
    if not isinstance(model, Model):
        raise TypeError(f"model must be an adjointhydro Model, got {type(model).__name__}")
    if not isinstance(forcing, Forcing):
        raise TypeError(f"forcing must be an adjointhydro Forcing, got {type(forcing).__name__}")
    if forcing.n_basins != 1:
        raise ValueError(
            f"calibrate_de calibrates one basin at a time; the forcing has {forcing.n_basins} basins "
            f"(use forcing.select(basins=[i]) per basin, or calibrate() for all at once)"
        )
    if not model.parameter_names:
        raise ValueError(f"model {model.name!r} has no physical parameters to calibrate")
    scored, _ = _scored_observations(observed, forcing, score_mask, loss)
    obs = torch.as_tensor(scored, device=forcing.values.device)
    low = model.param_low.detach().cpu().numpy().astype(np.float64)
    high = model.param_high.detach().cpu().numpy().astype(np.float64)
    forcing_cache: dict[int, Forcing] = {}
    counters = {"solves": 0, "runs": 0, "failed": 0}
    best = {"loss": float("inf"), "x": None}
    history: list[dict] = []

    def func(x: np.ndarray) -> np.ndarray:
        xs = np.atleast_2d(np.asarray(x, dtype=np.float64).T) if np.ndim(x) == 2 else np.asarray(x)[None]
        xs = np.clip(xs, low, high)
        L = batch_losses(xs)
        i = int(np.argmin(L))
        if L[i] < best["loss"]:
            best["loss"], best["x"] = float(L[i]), xs[i].copy()
        if not history:
            record()  # the initial population
        return L if np.ndim(x) == 2 else float(L[0])

    def batch_losses(xs: np.ndarray) -> np.ndarray:
        """Losses of the members ``xs`` ``[S, P]``, one solve; halves on a solver failure."""
        S = xs.shape[0]
        if S not in forcing_cache:
            forcing_cache[S] = forcing if S == 1 else forcing.select(basins=[0] * S)
        y0 = _replicate_initial_state(initial_state, 1, S, model.n_stores)
        counters["solves"] += 1
        counters["runs"] += S
        try:
            with torch.no_grad():
                sol = solve(
                    model, forcing_cache[S], parameters=torch.as_tensor(xs), initial_state=y0,
                    method=method, rtol=rtol, atol=atol, sensitivity="direct", dtype=dtype,
                )
                sim = sol.discharge
                L = _row_losses(sim, obs.to(sim.dtype).expand(S, -1), loss).to(torch.float64).cpu().numpy()
        except SolverError:
            counters["failed"] += 1
            if S == 1:
                return np.array([np.inf])
            h = S // 2
            return np.concatenate([batch_losses(xs[:h]), batch_losses(xs[h:])])
        return np.where(np.isfinite(L), L, np.inf)

    def record() -> None:
        history.append({
            "iteration": len(history),
            "loss": best["loss"],
            "seconds": _time.perf_counter() - t_start,
            "model_runs": counters["runs"],
        })

    def callback(intermediate_result) -> None:  # noqa: ANN001 - scipy's OptimizeResult
        record()
        if target_loss is not None and best["loss"] <= target_loss:
            raise StopIteration

    import inspect

    seeding = (
        {"rng": np.random.default_rng(seed)}
        if "rng" in inspect.signature(differential_evolution).parameters
        else {"seed": np.random.default_rng(seed)}  # scipy < 1.15
    )
    with _frozen_networks(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*vectorized.*")
        res = differential_evolution(
            func, list(zip(low, high)), popsize=popsize, maxiter=maxiter, tol=tol,
            callback=callback, polish=polish, vectorized=True, updating="deferred", **seeding,
        )
    x = best["x"] if best["x"] is not None else np.clip(res.x, low, high)
    L = best["loss"]
    if polish and res.fun < L:
        x, L = np.clip(res.x, low, high), float(res.fun)
    phys = torch.as_tensor(x, dtype=torch.float64)[None]
    return CalibrationResult(
        parameters=phys,
        loss=np.array([L]),
        history=history,
        n_model_runs=counters["runs"],
        seconds=_time.perf_counter() - t_start,
        all_start_losses=np.array([[L]]),
        parameter_names=tuple(model.parameter_names),
        all_start_parameters=phys[None].clone(),
        n_solves=counters["solves"],
        method="de",
        stopped_at_target=bool(target_loss is not None and L <= target_loss),
        n_failed_solves=counters["failed"],
    )


# ------------------------------------------------------------ pretrain_fluxes
def _physics_parameter_vars(
    physics_parameters: Any, names: Sequence[str], B: int, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Physical parameters (tensor ``[P]``/``[B, P]`` or mapping) -> name -> ``[B]`` (float64, on ``device``)."""
    if isinstance(physics_parameters, Mapping):
        out = {}
        for k, v in physics_parameters.items():
            t = torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1)
            out[k] = t.expand(B) if t.numel() == 1 else t
        return out
    p = torch.as_tensor(physics_parameters, dtype=torch.float64, device=device).detach()
    if p.ndim == 1:
        p = p[None]
    if p.shape[-1] != len(names):
        raise ValueError(
            f"physics_parameters has {p.shape[-1]} values per basin but the parameters are {list(names)}"
        )
    if p.shape[0] not in (1, B):
        raise ValueError(f"physics_parameters for {p.shape[0]} basins, forcing has {B}")
    p = p.expand(B, -1)
    return {n: p[:, j] for j, n in enumerate(names)}


def pretrain_fluxes(
    hybrid: Model,
    physics_solution: Solution,
    forcing: Forcing,
    physics_parameters: Any,
    *,
    epochs: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    score_mask: Any = None,
    physics_model: Model | None = None,
) -> dict[str, list[float]]:
    """Fit the networks of ``hybrid`` to the fluxes of a physics run (no ODE solve).

    For each :class:`NeuralFlux` / :class:`NeuralFluxGroup` of ``hybrid`` whose
    flux names exist in ``physics_solution``: its inputs are taken from the
    physics run at every period start (stores ``physics_solution.stores[:, :-1]``,
    the period's forcing, the parameters, and the physics fluxes), its input
    normalisation is set to their mean and std (:meth:`set_normalisation`), and its
    output (including any ``limit_by`` factor) is fitted by full-batch Adam to

    * with ``physics_model``: the exact instantaneous rates of the physics model at
      those states (``physics_model.fluxes(stores, forcing, parameters)``);
    * without: the period totals divided by ``forcing.step`` (period-mean rates,
      an approximation to the rate at the period start).

    The objective is the sum over a module's outputs of MSE / variance of the
    target, so outputs of different size weigh alike. Networks whose fluxes are
    not in the physics run are left untouched (with a warning).

    Args:
        hybrid: the hybrid model whose networks are fitted (in place).
        physics_solution: a solve of the physics model over ``forcing``.
        forcing: the forcing of that solve ``[basin, time, variable]``.
        physics_parameters: the physics model's physical parameters, ``[P]`` /
            ``[basin, P]`` (names of ``physics_model`` or, without it, of ``hybrid``)
            or a mapping name -> value(s).
        epochs: Adam steps (full batch).
        lr: Adam learning rate.
        seed: sets torch's RNG before fitting (the fit itself is deterministic).
        score_mask: bool ``[time]``: periods used for the fit (default all).
        physics_model: the physics model, for exact instantaneous target rates.

    Returns:
        flux name -> MSE (rate units squared) after each epoch.
    """
    B, T = forcing.n_basins, forcing.n_steps
    if tuple(physics_solution.stores.shape[:2]) != (B, T + 1):
        raise ValueError(
            f"physics_solution has stores {tuple(physics_solution.stores.shape)} but the forcing is "
            f"[basin={B}, time={T}]: expected stores [{B}, {T + 1}, store]"
        )
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    mask = _as_mask(score_mask, T, "score_mask")
    if not mask.any():
        raise ValueError("score_mask selects no time step: nothing to fit")
    torch.manual_seed(int(seed))
    dev = forcing.values.device
    mt = torch.as_tensor(mask, device=dev)
    n_rows = B * int(mask.sum())

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, T] -> [rows]
        return x.detach()[:, mt].reshape(-1).to(torch.float64)

    stores = physics_solution.stores[:, :-1].detach()
    v: dict[str, torch.Tensor] = {}
    for i, n in enumerate(physics_solution.store_names):
        v[n] = rows(stores[..., i])
    for n in forcing.names:
        v[n] = rows(forcing[n])
    pnames = physics_model.parameter_names if physics_model is not None else hybrid.parameter_names
    pv = _physics_parameter_vars(physics_parameters, pnames, B, dev)
    for n, p in pv.items():
        v[n] = p.to(torch.float64)[:, None].expand(B, int(mask.sum())).reshape(-1)
    if physics_model is not None:
        srows = torch.stack([v[n] for n in physics_model.store_names], -1)
        with torch.no_grad():
            rates = physics_model.fluxes(
                srows.to(physics_model.param_low.dtype),
                Vars((n, v[n]) for n in physics_model.forcing_names),
                Vars((n, v[n]) for n in physics_model.parameter_names),
            ).to(torch.float64)
        flux_names = physics_model.flux_names
    else:
        rates = torch.stack([rows(physics_solution.fluxes[..., j]) for j in range(len(physics_solution.flux_names))], -1)
        rates = rates / float(forcing.step)
        flux_names = physics_solution.flux_names
    targets_all = {n: rates[:, j] for j, n in enumerate(flux_names)}
    for n, r in targets_all.items():
        v.setdefault(n, r)

    history: dict[str, list[float]] = {}
    for f in hybrid.neural_fluxes():
        outs = [i for i, n in enumerate(f.names) if n in targets_all]
        if not outs:
            warnings.warn(
                f"pretrain_fluxes: network for {list(f.names)} has no matching flux in the physics "
                f"run ({list(flux_names)}); left untouched",
                stacklevel=2,
            )
            continue
        missing = [n for n in f.inputs if n not in v]
        if missing:
            raise ValueError(
                f"pretrain_fluxes: inputs {missing} of the network for {list(f.names)} are not available "
                f"from the physics run (stores, forcing, parameters, physics fluxes: {sorted(v)})"
            )
        dtype = next(f.parameters()).dtype
        loc = {n: float(v[n].mean()) for n in f.inputs}
        scale = {}
        for n in f.inputs:
            s = float(v[n].std()) if n_rows > 1 else 0.0
            scale[n] = s if s > 1e-12 * max(1.0, abs(loc[n])) else max(1.0, abs(loc[n]))
        f.set_normalisation(loc, scale)
        vd = Vars((k, t.to(dtype)) for k, t in v.items())
        tgt = torch.stack([targets_all[f.names[i]] for i in outs], -1).to(dtype)
        var = tgt.var(0, unbiased=False).clamp_min(1e-12)
        hist = {f.names[i]: [] for i in outs}
        params = [p for p in f.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(int(epochs)):
                opt.zero_grad()
                out = f.forward(vd)
                if out.ndim == 1:
                    out = out[:, None]
                mse = ((out[:, outs] - tgt) ** 2).mean(0)
                (mse / var).sum().backward()
                opt.step()
                for k, i in enumerate(outs):
                    hist[f.names[i]].append(float(mse[k].detach()))
        history.update(hist)
    return history


# ------------------------------------------------------------- train_hybrid
def _lr_at(schedule: str | None, base: float, epoch: int, epochs: int) -> float:
    if schedule is None:
        return base
    if schedule == "cosine":  # CosineAnnealingLR with T_max = epochs, eta_min = 0
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    step = max(1, round(epochs / 3))  # "step": x0.1 after each third of the epochs
    return base * 0.1 ** (epoch // step)


def _clone_state(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_hybrid(
    model: Model,
    forcing: Forcing,
    observed: Any,
    *,
    train_mask: Any,
    val_mask: Any = None,
    loss: str = "nse",
    epochs: int = 50,
    lr: float = 5e-3,
    lr_schedule: str | None = "cosine",
    patience: int | None = 10,
    seed: int = 0,
    parameters: Any = None,
    train_parameters: bool = False,
    sensitivity: Any = "checkpoint",
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    initial_state: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[int, dict], Any] | None = None,
    grad_clip: float | None = 1.0,
) -> TrainResult:
    """Train the networks of a hybrid (and optionally its parameters) through the ODE.

    One epoch is one Adam step on the whole record: one solve of every basin over
    the full forcing (warm-up included, but scored only where ``train_mask`` is
    True), the loss against observed discharge, the adjoint gradient, a step. The
    validation loss comes from the same forward run, scored on ``val_mask``
    (train loss if ``val_mask`` is None), so it belongs to the weights *before*
    the step. Early stopping after ``patience`` epochs without improvement of the
    validation loss; on return the model holds the weights with the best one.

    Fixed ``seed`` gives identical runs: the training itself draws no random
    numbers, and torch's RNG is seeded (and checkpointed) for any flux that does.
    The initial weights are those of ``model`` as given (build it after
    ``torch.manual_seed`` for a reproducible initialisation).

    Checkpoints (``checkpoint_dir``): after every epoch ``last.pt`` holds the model
    state_dict, optimizer and schedule state, epoch, history, best state and loss,
    early-stopping counter and torch's RNG state; ``best.pt`` the best weights when
    the validation loss improves. Both are written atomically (temporary file in
    the same folder, flush + fsync, ``os.replace``), so a crash never leaves a
    partial file. ``resume=True`` loads ``last.pt`` (if present) and continues:
    with the same settings the result equals that of an uninterrupted run.
    ``epochs`` may be raised on resume (the schedule then follows the new length).

    Args:
        model: a hybrid model (with neural fluxes), trained in place.
        forcing: forcing ``[basin, time, variable]``.
        observed: observed discharge ``[basin, time]``, NaN = missing.
        train_mask, val_mask: bool ``[time]`` of scored steps.
        loss: ``"nse"``, ``"kge"`` or ``"mse"`` (mean over basins).
        epochs: maximum number of epochs (gradient steps).
        lr: Adam learning rate; ``lr_schedule``: None, ``"cosine"`` (to 0 over
            ``epochs``) or ``"step"`` (x0.1 after each third of ``epochs``).
        patience: epochs without validation improvement before stopping (None: never).
        seed: torch seed.
        parameters: physical parameters to set on the model first (``[P]``,
            ``[basin, P]`` or mapping); default: the model's own.
        train_parameters: also train the physical parameters (``model.raw``).
        sensitivity, method, rtol, atol, initial_state: passed to :func:`solve`. The
            string ``"checkpoint"`` is compiled (``CheckpointedAdjoint(compile=True)``)
            on a CPU where the run is long: at most 64 basins and ``basins x periods x
            epochs`` of at least ten million (64 basins x 10 years x 43 epochs), which
            repays 10-30 s of compiling with 1.4-1.7x faster epochs. Pass
            ``CheckpointedAdjoint()`` to keep a run uncompiled.
        checkpoint_dir, resume: see above.
        progress: tqdm progress bar.
        on_epoch: called as ``on_epoch(epoch, record)`` after each epoch's checkpoint.
        grad_clip: max gradient norm (None: no clipping).

    The solves run in the networks' floating type (``model.to(torch.float32)`` for
    single precision) on the forcing's device: move both there first
    (``model.to("cuda")``, ``forcing.to(device="cuda")``).
    """
    t_start = _time.perf_counter()
    loss = _check_loss_name(loss)
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; use one of {list(LR_SCHEDULES)}")
    if not isinstance(model, Model):
        raise TypeError(f"model must be an adjointhydro Model, got {type(model).__name__}")
    if not isinstance(forcing, Forcing):
        raise TypeError(f"forcing must be an adjointhydro Forcing, got {type(forcing).__name__}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience must be at least 1 (or None), got {patience}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    epochs = int(epochs)
    train_obs, _ = _scored_observations(observed, forcing, train_mask, loss, "train_mask")
    if val_mask is not None:
        val_obs, _ = _scored_observations(observed, forcing, val_mask, loss, "val_mask")
    else:
        val_obs = None
    weights = [p for f in model.neural_fluxes() for p in f.parameters()]
    if not weights and not train_parameters:
        raise ValueError(
            f"model {model.name!r} has no neural fluxes to train; use calibrate() or train_parameters=True"
        )
    loss_fn = LOSSES[loss]
    torch.manual_seed(int(seed))
    if parameters is not None:
        model.set_parameters(parameters)
    grad_flags = [(p, p.requires_grad) for p in weights + [model.raw]]
    try:
        return _train_hybrid(
            model, forcing, train_obs, val_obs, weights, loss_fn, loss=loss, epochs=epochs, lr=lr,
            lr_schedule=lr_schedule, patience=patience, seed=seed, train_parameters=train_parameters,
            sensitivity=sensitivity, method=method, rtol=rtol, atol=atol, initial_state=initial_state,
            checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, on_epoch=on_epoch,
            grad_clip=grad_clip, t_start=t_start,
        )
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)


def _train_hybrid(
    model, forcing, train_obs, val_obs, weights, loss_fn, *, loss, epochs, lr, lr_schedule, patience, seed,
    train_parameters, sensitivity, method, rtol, atol, initial_state, checkpoint_dir, resume, progress,
    on_epoch, grad_clip, t_start,
) -> TrainResult:
    for p in weights:
        p.requires_grad_(True)
    model.raw.requires_grad_(bool(train_parameters))
    trainable = weights + ([model.raw] if train_parameters else [])
    opt = torch.optim.Adam(trainable, lr=lr)
    # one sensitivity object for the whole run: the checkpointed adjoint's parallel-in-time
    # forward solve then starts Newton from the previous epoch's trajectory (the weights
    # move little per step; ~20% less time per epoch on Leaf River)
    sensitivity = _as_sensitivity(_long_run_sensitivity(sensitivity, forcing.n_basins, forcing.n_steps, epochs,
                                                        forcing.values.device))
    warm = sensitivity._cache if isinstance(sensitivity, CheckpointedAdjoint) and sensitivity.warm_start else None
    config = {
        "loss": loss, "lr": float(lr), "lr_schedule": lr_schedule, "seed": int(seed),
        "train_parameters": bool(train_parameters), "method": method, "rtol": float(rtol),
        "atol": float(atol), "grad_clip": None if grad_clip is None else float(grad_clip),
    }

    start_epoch = 0
    history: list[dict] = []
    best_val = float("inf")
    best_epoch = -1
    best_state: dict | None = None
    bad_epochs = 0
    stopped = False
    last_path = best_path = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        last_path = os.path.join(os.fspath(checkpoint_dir), "last.pt")
        best_path = os.path.join(os.fspath(checkpoint_dir), "best.pt")
    if resume:
        if os.path.exists(last_path):
            ck = torch.load(last_path, map_location="cpu", weights_only=True)
            differ = {k: (ck["config"].get(k), v) for k, v in config.items() if ck["config"].get(k) != v}
            if differ:
                raise ValueError(
                    f"{last_path} was written with different settings; resume needs the same "
                    f"(checkpoint, now): {differ}"
                )
            try:
                model.load_state_dict(ck["model"])
            except RuntimeError as e:
                raise ValueError(f"{last_path} does not fit this model: {str(e).splitlines()[0]}") from None
            opt.load_state_dict(ck["optimizer"])
            start_epoch = int(ck["epoch"])
            history = list(ck["history"])
            best_val = float(ck["best_val"])
            best_epoch = int(ck["best_epoch"])
            best_state = ck["best_state"]
            bad_epochs = int(ck["bad_epochs"])
            stopped = bool(ck["stopped"])
            torch.set_rng_state(ck["rng_state"])
            if warm is not None and ck.get("warm_start") is not None:
                # the trajectory the next solve would have started from, so that a
                # resumed run takes the same steps as an uninterrupted one
                ws = ck["warm_start"]
                # a dict {"stores", "dt"}; runs saved before step proposals were kept hold the stores only
                ws = ws if isinstance(ws, dict) else {"stores": ws}
                dev = forcing.values.device
                warm.update({k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in ws.items()})
        else:
            warnings.warn(f"resume=True but {last_path} does not exist; starting from scratch", stacklevel=2)

    obs_t = torch.as_tensor(train_obs, device=forcing.values.device)
    obs_v = torch.as_tensor(val_obs, device=forcing.values.device) if val_obs is not None else None
    bar = _progress_bar(epochs, progress, "train", initial=start_epoch)
    try:
        epoch = start_epoch
        while epoch < epochs and not stopped:
            t0 = _time.perf_counter()
            lr_e = _lr_at(lr_schedule, lr, epoch, epochs)
            for g in opt.param_groups:
                g["lr"] = lr_e
            opt.zero_grad()
            params = model.physical_parameters()
            if not train_parameters:
                params = params.detach()
            sol = solve(
                model, forcing, parameters=params, initial_state=initial_state,
                method=method, rtol=rtol, atol=atol, sensitivity=sensitivity,
            )
            sim = sol.discharge
            L = loss_fn(sim, obs_t.to(sim.dtype))
            if not torch.isfinite(L):
                raise FloatingPointError(
                    f"train_hybrid: non-finite training loss at epoch {epoch}; lower lr or check the model"
                )
            V = float(loss_fn(sim.detach(), obs_v.to(sim.dtype))) if obs_v is not None else float(L.detach())
            improved = V < best_val
            if improved:
                best_val, best_epoch, bad_epochs = V, epoch, 0
                best_state = _clone_state(model)  # weights before this epoch's step
            else:
                bad_epochs += 1
            L.backward()
            for p in trainable:
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, float(grad_clip))
            opt.step()
            record = {
                "epoch": epoch,
                "train_loss": float(L.detach()),
                "val_loss": V,
                "lr": lr_e,
                "seconds": _time.perf_counter() - t0,
            }
            history.append(record)
            if patience is not None and bad_epochs >= int(patience):
                stopped = True
            epoch += 1
            if last_path is not None:
                if improved:
                    _atomic_save(
                        {"model": best_state, "epoch": best_epoch, "val_loss": best_val, "config": config},
                        best_path,
                    )
                _atomic_save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": {"name": lr_schedule, "base_lr": float(lr), "epochs": epochs, "last_epoch": epoch},
                        "epoch": epoch,
                        "history": history,
                        "best_state": best_state,
                        "best_val": best_val,
                        "best_epoch": best_epoch,
                        "bad_epochs": bad_epochs,
                        "stopped": stopped,
                        "rng_state": torch.get_rng_state(),
                        "config": config,
                        "warm_start": None if warm is None else dict(warm),
                    },
                    last_path,
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{record['train_loss']:.4f}", val=f"{V:.4f}")
            if on_epoch is not None:
                on_epoch(record["epoch"], record)
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_val,
        stopped_early=stopped,
        seconds=_time.perf_counter() - t_start,
    )


# ------------------------------------------------------------------- masks
def _parse_bound(value: Any, end: bool) -> np.datetime64:
    """A date ('YYYY', 'YYYY-MM', 'YYYY-MM-DD' or datetime64); an end at coarse precision
    means the last day of that year/month."""
    try:
        d = value if isinstance(value, np.datetime64) else np.datetime64(str(value))
    except ValueError:
        raise ValueError(f"cannot read date {value!r}; use 'YYYY-MM-DD', 'YYYY-MM' or 'YYYY'") from None
    unit = np.datetime_data(d.dtype)[0]
    if end and unit in ("Y", "M"):
        return (d + np.timedelta64(1, unit)).astype("datetime64[D]") - np.timedelta64(1, "D")
    return d.astype("datetime64[D]")


def masks_from_dates(
    dates: Any, warmup_end: Any = None, start: Any = None, end: Any = None
) -> np.ndarray:
    """Boolean mask ``[time]`` of the dates in ``start..end`` (inclusive) after the warm-up.

    Args:
        dates: the dates of the record (datetime64 or 'YYYY-MM-DD' strings).
        warmup_end: last day of the warm-up (inclusive; e.g. ``"1957"`` = to 1957-12-31):
            these dates are never selected.
        start, end: first and last day (inclusive; ``None``: open). Year or month
            precision is allowed (``start="1958"``, ``end="1977"`` = 1958-01-01..1977-12-31).

    Raises:
        ValueError: unreadable dates, or no date selected (naming the period and the data range).

    Example (Leaf River: warm-up 1957, calibration 1958-1977, test 1978-1987)::

        cal = masks_from_dates(ds.dates, warmup_end="1957", start="1958", end="1977")
        test = masks_from_dates(ds.dates, warmup_end="1957", start="1978", end="1987")
    """
    d = np.asarray(dates)
    if d.dtype.kind in "US":
        d = np.array([_parse_bound(x, False) for x in d])
    try:
        d = d.astype("datetime64[D]")
    except (TypeError, ValueError):
        raise ValueError(f"dates must be datetime64 values or 'YYYY-MM-DD' strings, got dtype {d.dtype}") from None
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"dates must be a non-empty 1-D array, got shape {d.shape}")
    mask = np.ones(len(d), dtype=bool)
    if warmup_end is not None:
        mask &= d > _parse_bound(warmup_end, True)
    s = _parse_bound(start, False) if start is not None else None
    e = _parse_bound(end, True) if end is not None else None
    if s is not None and e is not None and e < s:
        raise ValueError(f"empty period {s}..{e}: the end is before the start")
    if s is not None:
        mask &= d >= s
    if e is not None:
        mask &= d <= e
    if not mask.any():
        raise ValueError(
            f"no date in the period {s if s is not None else '...'}..{e if e is not None else '...'}"
            f"{f' after the warm-up (to {_parse_bound(warmup_end, True)})' if warmup_end is not None else ''}; "
            f"the data cover {d[0]}..{d[-1]}"
        )
    return mask
