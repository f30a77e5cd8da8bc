"""Run folders: calibrate, train, evaluate and simulate from a configuration.

A run lives in ``<output_dir>/<name>_<timestamp>/``::

    config.toml      copy of the configuration (paths in it stay relative to the
                     original file's folder, which run.json records)
    run.json         command, original config path, stage, timings
    m0.pt            calibrated parameters of the physics model M0 (and its history)
    pretrained.pt    the hybrid's networks after pretraining on M0's fluxes
    checkpoints/     last.pt (every epoch) and best.pt of train_hybrid
    model.pt         the trained hybrid (state_dict, parameters, training history)
    metrics.json     {"models": {"m0": {...}, "hybrid": {...}}} -- see :func:`compute_metrics`
    results.h5       dates, observed and simulated discharge, every store and flux per
                     day, parameters, with units as attributes (:func:`write_results`)
    plots/           hydrograph_<period>_<basin>.png, training_curves.png, fluxes_<basin>.png

Each stage writes its file atomically (temporary file + :func:`os.replace`) when
it is done, so an interrupted run can be continued with :func:`resume` (or
``adjointhydro resume RUN``): finished stages are read back, hybrid training
continues from ``checkpoints/last.pt``, and with the same seed the result equals
that of an uninterrupted run. :func:`load_run` rebuilds the trained models.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time as _time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import h5py
import numpy as np
import torch

from ._io import atomic_path, atomic_torch_save, atomic_write_text
from ._io import jsonable as _jsonable
from .config import PERIODS, Config, build_physics_model, forcing_names, observed_name, parse_config

__all__ = [
    "RunError",
    "RunInterrupted",
    "LoadedRun",
    "new_run_dir",
    "train",
    "resume",
    "evaluate",
    "simulate",
    "load_run",
    "build_hybrid",
    "period_masks",
    "compute_metrics",
    "write_results",
    "read_results",
    "summary_table",
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
]

#: Root attribute ``format`` of results.h5, and its layout version.
RESULTS_FORMAT = "adjointhydro-results"
RESULTS_VERSION = 1
_EPOCH = np.datetime64("1970-01-01", "D")
#: Metrics printed in the summary table.
SUMMARY_METRICS = ("nse", "kge")
#: At most this many basins get their own hydrograph and flux plots.
MAX_PLOTTED_BASINS = 10

Log = Callable[[str], None]


class RunError(ValueError):
    """A run folder is missing, incomplete or inconsistent; the message says which file."""


class RunInterrupted(Exception):
    """Training was interrupted (Ctrl-C); ``run_dir`` can be continued with :func:`resume`."""

    def __init__(self, run_dir: Path, stage: str) -> None:
        super().__init__(f"interrupted during {stage}; continue with: adjointhydro resume {run_dir}")
        self.run_dir = run_dir
        self.stage = stage


def _quiet(_: str) -> None:
    pass


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _torch_load(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise RunError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# ----------------------------------------------------------------- run folder
def new_run_dir(cfg: Config, output_dir: str | os.PathLike | None = None, command: str = "train") -> Path:
    """Create ``<output_dir>/<name>_<timestamp>/`` with the config copy and ``run.json``."""
    out = Path(output_dir) if output_dir is not None else cfg.run.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot create the output folder ({e.strerror})") from None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{cfg.run.name}_{stamp}"
    run_dir = out / base
    i = 1
    while True:
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            i += 1
            run_dir = out / f"{base}-{i}"
    (run_dir / "config.toml").write_text(cfg.text, encoding="utf-8")
    info = {
        "command": command,
        "name": cfg.run.name,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "config_path": str(cfg.path.resolve()) if cfg.path is not None else None,
        "config_dir": str(cfg.path.resolve().parent) if cfg.path is not None else str(Path.cwd()),
        "stage": "created",
        "timings": {},
    }
    _write_json(run_dir / "run.json", info)
    return run_dir


def read_run_info(run_dir: Path) -> dict:
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        raise RunError(f"{run_dir}: not a run folder (no run.json)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _update_info(run_dir: Path, **updates: Any) -> dict:
    info = read_run_info(run_dir)
    for k, v in updates.items():
        if k == "timings":
            info.setdefault("timings", {}).update(v)
        else:
            info[k] = v
    _write_json(run_dir / "run.json", info)
    return info


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The configuration of a run, with relative paths resolved from the original config's folder."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a folder (give the run folder, e.g. runs/<name>_<timestamp>)")
    info = read_run_info(run_dir)
    cfile = run_dir / "config.toml"
    if not cfile.is_file():
        raise RunError(f"{run_dir}: config.toml is missing")
    base = Path(info.get("config_dir") or run_dir)
    return parse_config(cfile.read_text(encoding="utf-8"), path=cfile, base_dir=base)


# ---------------------------------------------------------------- data pieces
def period_masks(cfg: Config, dates: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks ``[time]`` of the scored periods (train, validation, test) over ``dates``."""
    d = np.asarray(dates).astype("datetime64[D]")
    out = {}
    for name, (s, e) in cfg.periods.defined().items():
        out[name] = (d >= s) & (d <= e)
    return out


def _dataset_part(cfg: Config, end: np.datetime64 | None = None):
    """The data set from the simulation start to ``end`` (default: the end of the last period)."""
    ds = cfg.dataset()
    # (not ``x or default``: np.datetime64('1970-01-01') is the epoch, which is falsy)
    start = cfg.periods.simulation_start
    if start is None:
        start = ds.dates[0]
    stop = end if end is not None else cfg.periods.simulation_end
    if stop is None:
        stop = ds.dates[-1]
    return ds.period(start, stop)


def _segment(cfg: Config, end: np.datetime64 | None = None):
    """Forcing, observed ``[B, T]`` and dates from the simulation start to ``end``."""
    part = _dataset_part(cfg, end)
    forcing = part.to_forcing(forcing_names(cfg))
    return forcing, part.observed(observed_name(cfg)), part.dates


def _sensitivity(cfg: Config, long_run: bool = False):
    """The configured sensitivity: its name, or a :class:`CheckpointedAdjoint` with a
    compiled step (``compile = true``). For a calibration or training run
    (``long_run``) the name leaves compiling to the run (``compile = "auto"``), and
    ``compile = false`` gives an uncompiled instance, which no run compiles."""
    s = cfg.solver
    if s.sensitivity == "checkpoint" and (s.compile is True or (long_run and s.compile is False)):
        from .solve import CheckpointedAdjoint

        return CheckpointedAdjoint(parallel_forward=False if s.parallel_forward is False else None,
                                   compile=s.compile is True)
    return s.sensitivity


def _solve_kw(cfg: Config) -> dict:
    return {"method": cfg.solver.method, "rtol": cfg.solver.rtol, "atol": cfg.solver.atol}


def _place(model, dtype: torch.dtype, device: torch.device):
    """``model`` on ``device`` with its networks as ``dtype`` (in place; returns it).

    The physical parameters and their bounds stay float64: rounding a bound to float32
    could put a calibrated value just outside it.
    """
    if model is None:
        return None
    for f in model.neural_fluxes():
        f.to(dtype)
    return model.to(device)


def _cpu_state(model) -> dict:
    """``model.state_dict()`` on the CPU: run folders read back on any machine."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the models
def build_hybrid(cfg: Config, physics=None):
    """The hybrid of ``cfg.model`` with freshly initialised networks (seeded by ``run.seed``), or None."""
    from .fluxes import NeuralFlux
    from .models import exphydro_m50, exphydro_m100

    m = cfg.model
    if not m.is_hybrid:
        return None
    physics = physics if physics is not None else build_physics_model(m)
    smoothing = None if m.smoothing == 0 else m.smoothing
    torch.manual_seed(cfg.run.seed)
    if m.name == "exphydro_m50":
        hybrid = exphydro_m50(snow=m.use_snow, smoothing=smoothing, hidden=m.hidden_layers)
    elif m.name == "exphydro_m100":
        hybrid = exphydro_m100(smoothing=smoothing, hidden=m.hidden_layers)
    else:
        import copy

        hybrid = copy.deepcopy(physics)
        wiring = {n: (s, t) for n, s, t in physics.wiring}
        default_inputs = list(physics.store_names) + list(physics.forcing_names)
        for name in m.network_fluxes:
            src, _ = wiring[name]
            nf = NeuralFlux(
                name, m.inputs.get(name) or default_inputs, hidden=m.hidden_layers,
                limit_by=src, limit_scale=1.0, units="mm/day",
                description=f"network replacing the physics flux {name!r}",
            )
            hybrid = hybrid.replace_flux(nf)
        hybrid.name = f"{physics.name} with networks for {', '.join(m.network_fluxes)}"
    return hybrid.to(device="cpu", dtype=torch.float64)


def _physics_with(cfg: Config, parameters: torch.Tensor | None):
    model = build_physics_model(cfg.model)
    if parameters is not None:
        model.set_parameters(parameters)
    elif cfg.model.parameters:
        model.set_parameters(dict(cfg.model.parameters))
    return model


# ---------------------------------------------------------------- stages
def _calibrate_m0(cfg: Config, physics, forcing, observed, train_mask, progress: bool, log: Log) -> dict:
    from .training import calibrate, calibrate_de

    c = cfg.calibration
    t0 = _time.perf_counter()
    if c.iterations == 0:
        log("calibration: iterations = 0, M0 keeps its given/default parameters")
        params = physics.physical_parameters().detach().cpu().expand(forcing.n_basins, -1).clone()
        return {"parameters": params, "parameter_names": list(physics.parameter_names), "history": [],
                "loss": None, "seconds": 0.0, "n_model_runs": 0, "optimizer": None}
    log(f"calibrating M0 ({physics.name}): {c.optimizer}, {c.iterations} iterations, "
        f"{c.n_starts} start(s), loss {c.loss}, {cfg.solver.method} with {cfg.solver.sensitivity} gradients")
    # always float64 (solver.dtype is for the networks): the L-BFGS line search compares
    # losses to 1e-12; in float32, Leaf River's calibration took another path, 2.7x longer
    kw = dict(score_mask=train_mask, loss=c.loss, seed=cfg.run.seed, target_loss=c.target_loss, **_solve_kw(cfg))
    if c.optimizer == "de":
        results = []
        for b in range(forcing.n_basins):
            results.append(calibrate_de(physics, forcing.select(basins=[b]), observed[b:b + 1],
                                        popsize=c.popsize, maxiter=c.iterations, **kw))
        params = torch.cat([r.parameters for r in results])
        loss = np.concatenate([r.loss for r in results])
        history = results[0].history if len(results) == 1 else [
            {"iteration": i, "loss": float(np.mean([r.history[min(i, len(r.history) - 1)]["loss"] for r in results]))}
            for i in range(max(len(r.history) for r in results))
        ]
        runs = sum(r.n_model_runs for r in results)
    else:
        sens = _sensitivity(cfg, long_run=True)
        if sens == "checkpoint" and cfg.solver.parallel_forward is False:
            from .solve import CheckpointedAdjoint

            sens = CheckpointedAdjoint(parallel_forward=False)  # period by period, as configured
        r = calibrate(physics, forcing, observed, optimizer=c.optimizer, n_starts=c.n_starts,
                      iterations=c.iterations, lr=c.lr, sensitivity=sens, progress=progress, **kw)
        params, loss, history, runs = r.parameters, r.loss, r.history, r.n_model_runs
    seconds = _time.perf_counter() - t0
    pretty = ", ".join(f"{n}={float(v):.4g}" for n, v in zip(physics.parameter_names, params[0]))
    log(f"calibration done in {seconds:.1f} s: {c.loss} loss {np.round(loss, 4).tolist()}; {pretty}"
        + (" (first basin)" if params.shape[0] > 1 else ""))
    return {"parameters": params.detach().to(torch.float64), "parameter_names": list(physics.parameter_names),
            "history": history, "loss": np.asarray(loss, dtype=np.float64).tolist(), "seconds": seconds,
            "n_model_runs": int(runs), "optimizer": c.optimizer}


def _pretrain(cfg: Config, hybrid, physics, params, forcing, log: Log) -> dict:
    from .solve import solve
    from .training import pretrain_fluxes

    t = cfg.training
    t0 = _time.perf_counter()
    with torch.no_grad():
        sol = solve(physics, forcing, parameters=params, sensitivity=_sensitivity(cfg), **_solve_kw(cfg))
    _scale_outputs(hybrid, physics, sol, forcing, params)
    log(f"pretraining the networks on M0's fluxes: {t.pretrain_epochs} epochs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        history = pretrain_fluxes(hybrid, sol, forcing, params, epochs=t.pretrain_epochs, lr=t.pretrain_lr,
                                  seed=cfg.run.seed, physics_model=physics)
    final = ", ".join(f"{k} {v[-1]:.3g}" for k, v in history.items() if v)
    log(f"pretraining done in {_time.perf_counter() - t0:.1f} s" + (f": MSE {final}" if final else ""))
    return history


def _scale_outputs(hybrid, physics, sol, forcing, params) -> None:
    """Set each network output's ``output_scale`` to the RMS of M0's rate of that flux at M0's states.

    A network's output is ``output_scale * softplus(z) / log 2``: with the scale of the
    flux it replaces, the pretraining (and training) need no large last-layer weights
    to reach the flux's typical size.
    """
    from .plots import flux_rates_at_states

    B, T = forcing.n_basins, forcing.n_steps
    stores = sol.stores[:, :-1].detach().reshape(B * T, -1)
    fv = forcing.values.reshape(B * T, -1)
    p = params.detach().to(dtype=torch.float64, device=stores.device)
    p = p.expand(B, -1)[:, None].expand(B, T, -1).reshape(B * T, -1)
    rates = flux_rates_at_states(physics, stores.to(torch.float64), fv, forcing.names, p)
    rms = np.sqrt(np.mean(rates ** 2, axis=0))
    for f in hybrid.neural_fluxes():
        with torch.no_grad():
            for i, name in enumerate(f.names):
                if name in physics.flux_names:
                    value = float(rms[physics.flux_names.index(name)])
                    if np.isfinite(value) and value > 1e-6:
                        f.output_scale[i] = value


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left behind.

    They are hidden files ``.<name>.<...>.tmp`` next to their target (see
    :mod:`adjointhydro._io`), in the run folder or below it (``checkpoints/``, the
    ``fold<i>/`` folders of a cross-validation); the target itself is always the
    previous complete version, so nothing is lost.
    """
    for p in run_dir.rglob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def _open_run_dir(cfg: Config, output_dir: str | os.PathLike | None, run_dir: str | os.PathLike | None,
                  log: Log, command: str = "train") -> tuple[Path, bool]:
    """``(run folder, resuming)``: a new run folder, or ``run_dir`` to continue.

    A continued run first loses the temporary files a killed process left behind.
    """
    resuming = run_dir is not None
    run_dir = Path(run_dir) if resuming else new_run_dir(cfg, output_dir, command)
    log(f"run folder: {run_dir}")
    if resuming:
        _remove_stale_temporaries(run_dir)
    return run_dir, resuming


def _sigint_guard(run_dir: Path, stage: str):
    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            if et is not None and issubclass(et, KeyboardInterrupt):
                try:
                    _update_info(run_dir, stage=f"interrupted ({stage})")
                except Exception:
                    pass
                raise RunInterrupted(run_dir, stage) from None
            return False

    return _Guard()


def train(
    cfg: Config,
    *,
    output_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict], Any] | None = None,
    log: Log = print,
) -> Path:
    """Calibrate M0, then (for a hybrid) pretrain and train the hybrid; evaluate; return the run folder.

    With ``run_dir`` an existing run folder is continued (finished stages are read
    back, training resumes from ``checkpoints/last.pt``); otherwise a new one is made.

    Raises:
        ConfigError: the configuration lacks a training period.
        RunInterrupted: on Ctrl-C (``KeyboardInterrupt``), after recording the stage.
    """
    from .training import train_hybrid

    p = cfg.periods
    if p.train_start is None:
        raise cfg.error("periods.train_start", "required to train (with periods.train_end)")
    cfg.dataset()  # validate against the data before creating anything
    dtype, device = cfg.solver.torch_dtype, cfg.torch_device()
    # the forcing checks (NaN, negative rates) also come before the run folder
    forcing, observed, dates = _segment(cfg, p.training_end)
    forcing = forcing.to(device=device)
    run_dir, resuming = _open_run_dir(cfg, output_dir, run_dir, log)
    t_all = _time.perf_counter()
    masks = period_masks(cfg, dates)
    train_mask, val_mask = masks["train"], masks.get("validation")

    # 1. M0
    physics = _place(build_physics_model(cfg.model), dtype, device)
    m0_path = run_dir / "m0.pt"
    if resuming and m0_path.is_file():
        m0 = _torch_load(m0_path)
        log(f"M0: calibrated parameters read from {m0_path.name}")
    else:
        _update_info(run_dir, stage="calibration")
        if cfg.model.parameters:
            physics.set_parameters(dict(cfg.model.parameters))
        with _sigint_guard(run_dir, "calibration"):
            m0 = _calibrate_m0(cfg, physics, forcing, observed, train_mask, progress, log)
        atomic_torch_save(m0, m0_path)
        _update_info(run_dir, stage="calibrated", timings={"calibration": m0["seconds"]})
    physics.set_parameters(m0["parameters"])
    params = m0["parameters"]

    # 2. hybrid
    hybrid = _place(build_hybrid(cfg, physics), dtype, device)
    if hybrid is not None:
        t = cfg.training
        pre_path = run_dir / "pretrained.pt"
        model_path = run_dir / "model.pt"
        if resuming and model_path.is_file():
            log(f"hybrid: already trained ({model_path.name})")
        else:
            if resuming and pre_path.is_file():
                pre = _torch_load(pre_path)
                _load_hybrid_state(hybrid, params, pre["state_dict"], pre_path)
                log(f"hybrid: pretrained networks read from {pre_path.name}")
            else:
                _update_info(run_dir, stage="pretraining")
                t0 = _time.perf_counter()
                hybrid.set_parameters(params)
                with _sigint_guard(run_dir, "pretraining"):
                    history = _pretrain(cfg, hybrid, physics, params, forcing, log)
                pre = {"state_dict": _cpu_state(hybrid), "history": history}
                atomic_torch_save(pre, pre_path)
                _update_info(run_dir, stage="pretrained", timings={"pretraining": _time.perf_counter() - t0})
            result = None
            if t.epochs > 0:
                ckdir = run_dir / "checkpoints"
                cont = resuming and (ckdir / "last.pt").is_file()
                log(("resuming" if cont else "training") + f" the hybrid ({hybrid.name}): up to {t.epochs} epochs, "
                    f"lr {t.lr} ({t.lr_schedule}), loss {t.loss}, patience {t.patience}")
                _update_info(run_dir, stage="training")
                t0 = _time.perf_counter()
                with _sigint_guard(run_dir, "training"):
                    result = train_hybrid(
                        hybrid, forcing, observed, train_mask=train_mask, val_mask=val_mask, loss=t.loss,
                        epochs=t.epochs, lr=t.lr, lr_schedule=None if t.lr_schedule == "constant" else t.lr_schedule,
                        patience=t.patience, seed=cfg.run.seed, parameters=params,
                        train_parameters=t.train_parameters, sensitivity=_sensitivity(cfg, long_run=True),
                        checkpoint_dir=ckdir, resume=cont, progress=progress, on_epoch=on_epoch,
                        grad_clip=t.grad_clip, **_solve_kw(cfg),
                    )
                log(f"training done in {result.seconds:.1f} s: {len(result.history)} epochs in all, best epoch "
                    f"{result.best_epoch} ({'validation' if val_mask is not None else 'training'} loss "
                    f"{result.best_val_loss:.4f})" + (", stopped early" if result.stopped_early else ""))
                _update_info(run_dir, timings={"training": _time.perf_counter() - t0})
            else:
                hybrid.set_parameters(params)
                log("training.epochs = 0: the hybrid keeps its pretrained networks")
            atomic_torch_save({
                "state_dict": _cpu_state(hybrid),
                "parameters": hybrid.physical_parameters().detach().cpu(),
                "parameter_names": list(hybrid.parameter_names),
                "history": result.history if result else [],
                "best_epoch": result.best_epoch if result else None,
                "best_val_loss": result.best_val_loss if result else None,
                "stopped_early": result.stopped_early if result else False,
                "pretrain_history": pre.get("history", {}),
            }, model_path)
            _update_info(run_dir, stage="trained")
    _update_info(run_dir, stage="evaluation")
    evaluate(run_dir, log=log)
    _update_info(run_dir, stage="done", timings={"total_this_session": _time.perf_counter() - t_all})
    return run_dir


def resume(run_dir: str | os.PathLike, *, progress: bool = True, on_epoch=None, log: Log = print,
           device: str | None = None) -> Path:
    """Continue an interrupted :func:`train` run in ``run_dir`` (see :func:`train`).

    ``device`` overrides the run's ``solver.device`` (a run started on a GPU may go on
    on a CPU; the results then differ by rounding only).
    """
    cfg = load_run_config(run_dir)
    if device is not None:
        cfg.solver.device = cfg.checked_device(device, "--device")
    info = read_run_info(Path(run_dir))
    if info.get("command") != "train":
        raise RunError(f"{run_dir}: a {info.get('command')!r} run, not a training run; nothing to resume")
    return train(cfg, run_dir=run_dir, progress=progress, on_epoch=on_epoch, log=log)


def _load_hybrid_state(hybrid, params, state: dict, source: Path) -> None:
    hybrid.set_parameters(params)  # gives raw the [basin, P] shape of the saved state
    raw = state.get("raw")
    if raw is not None and tuple(raw.shape) != tuple(hybrid.raw.shape):
        hybrid.raw = torch.nn.Parameter(torch.zeros_like(raw, device=hybrid.param_low.device))
    try:
        hybrid.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(f"{source}: does not fit the model of config.toml ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- load_run
class LoadedRun(NamedTuple):
    """A run folder read back by :func:`load_run`."""

    config: Config
    #: the trained model: the hybrid, or M0 with its calibrated parameters for a physics-only run
    model: Any
    dataset: Any
    #: M0 with its calibrated parameters
    physics: Any
    #: the hybrid (None for a physics-only run)
    hybrid: Any
    run_dir: Path
    info: dict
    #: contents of m0.pt and model.pt (histories)
    m0_state: dict
    hybrid_state: dict | None


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild the configuration, data and trained models of a run folder.

    Returns a :class:`LoadedRun`, which unpacks as ``(config, model, dataset, physics, hybrid, ...)``.

    Raises:
        RunError: the folder is not a finished run (names the missing file).
        ConfigError, DataError: the saved configuration or its data cannot be used.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    info = read_run_info(run_dir)
    ds = cfg.dataset()
    m0_path = run_dir / "m0.pt"
    if not m0_path.is_file():
        stage = info.get("stage", "?")
        raise RunError(f"{run_dir}: no m0.pt, the run has not finished calibration (stage: {stage}); "
                       f"continue it with: adjointhydro resume {run_dir}")
    m0 = _torch_load(m0_path)
    physics = build_physics_model(cfg.model)
    physics.set_parameters(m0["parameters"])
    hybrid = None
    hstate = None
    if cfg.model.is_hybrid:
        mp = run_dir / "model.pt"
        if not mp.is_file():
            raise RunError(f"{run_dir}: no model.pt, the hybrid has not finished training (stage: "
                           f"{info.get('stage', '?')}); continue it with: adjointhydro resume {run_dir}")
        hstate = _torch_load(mp)
        hybrid = build_hybrid(cfg, physics)
        _load_hybrid_state(hybrid, hstate["parameters"], hstate["state_dict"], mp)
    model = hybrid if hybrid is not None else physics
    return LoadedRun(cfg, model, ds, physics, hybrid, run_dir, info, m0, hstate)


# ---------------------------------------------------------------- evaluation
def compute_metrics(observed: np.ndarray, simulated: np.ndarray, masks: Mapping[str, np.ndarray],
                    basins: Sequence[str], metrics: Sequence[str] | None = None) -> dict:
    """``{basin: {period: {metric: value}}}`` of ``simulated`` against ``observed`` ``[basin, time]``."""
    from .metrics import calculate_metrics

    out: dict[str, dict] = {}
    for b, basin in enumerate(basins):
        out[basin] = {}
        for name, mask in masks.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                vals = calculate_metrics(observed[b, mask], simulated[b, mask], metrics)
            out[basin][name] = {k: (float(v) if np.isfinite(v) else None) for k, v in vals.items()}
    return out


def _simulate(model, forcing, params, cfg: Config):
    """Solve on the configured device (a hybrid in the configured dtype, a physics model in float64);
    the solution comes back float64 on the CPU, and so does the model."""
    from .solve import solve

    device = cfg.torch_device()
    dtype = cfg.solver.torch_dtype if model.neural_fluxes() else torch.float64
    _place(model, dtype, device)
    try:
        with torch.no_grad():
            sol = solve(model, forcing.to(device=device), parameters=params.to(device), dtype=dtype,
                        sensitivity=_sensitivity(cfg), **_solve_kw(cfg))
        return sol.to("cpu", torch.float64)
    finally:
        _place(model, torch.float64, torch.device("cpu"))


def _model_block(model, sol, params, kind: str) -> dict:
    return {"model": model, "solution": sol, "parameters": params.detach().expand(sol.stores.shape[0], -1),
            "kind": kind}


def write_results(path: str | os.PathLike, *, dates: np.ndarray, basins: Sequence[str], observed: np.ndarray,
                  observed_name: str, observed_units: str, models: Mapping[str, dict],
                  masks: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> Path:
    """Write results.h5 atomically (temporary file + :func:`os.replace`).

    Layout (version 1)::

        /                 attrs format="adjointhydro-results", version=1, run, config (text), created
        /dates            int64 [time], days since 1970-01-01 (attrs units, first, last)
        /basins           utf-8 [basin]
        /observed         float64 [basin, time], NaN = missing (attrs name, units)
        /periods/<name>   bool [time]: train, validation, test where configured
        /models/<key>/    key "m0" (physics), "hybrid" or "regional"; attrs name, kind, method, networks
            discharge     float64 [basin, time], mm/day (sum of the discharge fluxes)
            stores/<s>    float64 [basin, time], content at the END of each day (attrs units,
                          initial = content at the start of the first day [basin])
            fluxes/<f>    float64 [basin, time], total over each day (attrs units = mm/day,
                          source, target, network = whether a network computes it)
            parameters    float64 [basin, P] (attrs names, units)

    Each block of ``models`` holds ``model``, ``parameters`` ``[basin, P]``, ``kind`` and
    either ``solution`` (a :class:`~adjointhydro.solve.Solution`: discharge, stores and
    fluxes are written) or ``discharge`` ``[basin, time]`` mm/day alone with ``method``
    (regional runs, which simulate discharge only: ``stores/`` and ``fluxes/`` are then
    empty groups).
    """
    path = Path(path)
    str_dt = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = RESULTS_FORMAT
        f.attrs["version"] = np.int64(RESULTS_VERSION)
        f.attrs["created"] = _dt.datetime.now().isoformat(timespec="seconds")
        for k, v in (attrs or {}).items():
            f.attrs[k] = v if v is not None else ""
        d = np.asarray(dates).astype("datetime64[D]")
        ds = f.create_dataset("dates", data=(d - _EPOCH).astype(np.int64))
        ds.attrs["units"] = "days since 1970-01-01"
        ds.attrs["first"] = str(d[0])
        ds.attrs["last"] = str(d[-1])
        f.create_dataset("basins", data=np.array(list(basins), dtype=object), dtype=str_dt)
        o = f.create_dataset("observed", data=np.asarray(observed, dtype=np.float64))
        o.attrs["name"] = observed_name
        o.attrs["units"] = observed_units
        o.attrs["missing"] = "NaN"
        g = f.create_group("periods")
        for name, mask in masks.items():
            g.create_dataset(name, data=np.asarray(mask, dtype=bool))
        gm = f.create_group("models")
        for key, block in models.items():
            model, sol, params = block["model"], block.get("solution"), block["parameters"]
            networks = [n for fl in model.neural_fluxes() for n in fl.names]
            mg = gm.create_group(key)
            mg.attrs["name"] = model.name
            mg.attrs["kind"] = block.get("kind", key)
            method = block.get("method") or (sol.stats.get("method", "") if sol is not None else "")
            mg.attrs["method"] = str(method)
            mg.attrs["networks"] = np.array(networks, dtype=object) if networks else np.array([], dtype="S1")
            qsim = sol.discharge.detach().numpy() if sol is not None else np.asarray(block["discharge"])
            q = mg.create_dataset("discharge", data=qsim.astype(np.float64))
            q.attrs["units"] = "mm/day"
            q.attrs["fluxes"] = ", ".join(sol.discharge_names if sol is not None else model.discharge_fluxes)
            sg = mg.create_group("stores")
            fg = mg.create_group("fluxes")
            pd = mg.create_dataset("parameters", data=torch.as_tensor(params).detach().numpy().astype(np.float64))
            pd.attrs["names"] = np.array(list(model.parameter_names), dtype=object)
            pd.attrs["units"] = np.array([p.units for p in model.parameters_spec], dtype=object)
            if sol is None:
                continue
            for i, (s, u) in enumerate(zip(sol.store_names, sol.store_units)):
                x = sol.stores[:, :, i].detach().numpy().astype(np.float64)
                sd = sg.create_dataset(s, data=x[:, 1:])
                sd.attrs["units"] = u
                sd.attrs["initial"] = x[:, 0]
                sd.attrs["description"] = "content at the end of each day"
            wiring = {n: (a, b) for n, a, b in sol.wiring}
            for j, name in enumerate(sol.flux_names):
                fd = fg.create_dataset(name, data=sol.fluxes[:, :, j].detach().numpy().astype(np.float64))
                unit = sol.flux_units[j]
                fd.attrs["units"] = f"{unit}/day" if unit and "/" not in unit else unit
                fd.attrs["source"] = wiring[name][0] or "outside"
                fd.attrs["target"] = wiring[name][1] or "outside"
                fd.attrs["network"] = name in networks
                fd.attrs["description"] = "total over each day"
    return path


def read_results(path: str | os.PathLike) -> dict:
    """Read results.h5 into plain numpy: ``dates``, ``basins``, ``observed``, ``periods``, ``models``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")

    def s(x):
        return x.decode() if isinstance(x, bytes) else str(x)

    with h5py.File(path, "r") as f:
        if s(f.attrs.get("format", "")) != RESULTS_FORMAT:
            raise RunError(f"{path}: not an adjointhydro results file")
        out = {
            "attrs": {k: f.attrs[k] for k in f.attrs},
            "dates": _EPOCH + f["dates"][()].astype(np.int64),
            "basins": [s(b) for b in f["basins"][()]],
            "observed": f["observed"][()],
            "periods": {k: f["periods"][k][()] for k in f["periods"]},
            "models": {},
        }
        for key, g in f["models"].items():
            out["models"][key] = {
                "name": s(g.attrs["name"]),
                "discharge": g["discharge"][()],
                "stores": {k: g["stores"][k][()] for k in g["stores"]},
                "fluxes": {k: g["fluxes"][k][()] for k in g["fluxes"]},
                "units": {**{k: s(g["stores"][k].attrs["units"]) for k in g["stores"]},
                          **{k: s(g["fluxes"][k].attrs["units"]) for k in g["fluxes"]}},
                "parameters": g["parameters"][()],
                "parameter_names": [s(x) for x in g["parameters"].attrs["names"]],
            }
    return out


_LABELS = {"m0": "M0", "hybrid": "hybrid"}


def _write_outputs(run_dir: Path, cfg: Config, dates, basins, observed, masks, blocks: dict, *,
                   command: str, histories: dict | None, log: Log) -> dict:
    """metrics.json, results.h5 and plots of evaluated models."""
    from . import plots

    ds = cfg.dataset()
    obs_units = ds.observation_units[ds.observation_names.index(observed_name(cfg))] or "mm/day"
    metrics = {
        "run": cfg.run.name,
        "command": command,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "simulation": [str(dates[0]), str(dates[-1])],
        "periods": {k: [str(np.asarray(dates)[v][0]), str(np.asarray(dates)[v][-1])] for k, v in masks.items()},
    }
    for key, block in blocks.items():
        sim = block["solution"].discharge.detach().numpy()
        metrics[key] = {
            "model": block["model"].name,
            "basins": compute_metrics(observed, sim, masks, basins),
        }
    _write_json(run_dir / "metrics.json", metrics)
    write_results(run_dir / "results.h5", dates=dates, basins=basins, observed=observed,
                  observed_name=observed_name(cfg), observed_units=obs_units, models=blocks, masks=masks,
                  attrs={"run": cfg.run.name, "config": cfg.text, "command": command})
    # plots
    pdir = run_dir / "plots"
    pdir.mkdir(exist_ok=True)
    plot_period = "test" if "test" in masks else (list(masks)[-1] if masks else None)
    sel = masks[plot_period] if plot_period else np.ones(len(dates), dtype=bool)
    for b, basin in enumerate(basins[:MAX_PLOTTED_BASINS]):
        sims = {_LABELS.get(k, k): bl["solution"].discharge[b].detach().numpy()[sel] for k, bl in blocks.items()}
        mets = {_LABELS.get(k, k): metrics[k]["basins"][basin].get(plot_period, {}) for k in blocks} if plot_period else None
        plots.hydrograph(pdir / f"hydrograph_{plot_period or 'all'}_{_safe(basin)}.png", np.asarray(dates)[sel],
                         observed[b, sel], sims, metrics=mets, units=obs_units,
                         title=f"{basin}: {plot_period or 'whole'} period")
    if histories is not None:
        plots.training_curves(pdir / "training_curves.png", calibration=histories.get("calibration"),
                              pretraining=histories.get("pretraining"), training=histories.get("training"),
                              best_epoch=histories.get("best_epoch"), loss=histories.get("loss", "loss"))
    if "hybrid" in blocks and "m0" in blocks:
        hb, mb = blocks["hybrid"], blocks["m0"]
        hybrid, physics = hb["model"], mb["model"]
        networks = [n for fl in hybrid.neural_fluxes() for n in fl.names if n in physics.flux_names]
        forcing = blocks["hybrid"]["forcing"]
        if networks:
            for b, basin in enumerate(basins[:MAX_PLOTTED_BASINS]):
                st = hb["solution"].stores[b, :-1].detach()
                plots.flux_comparison(
                    pdir / f"fluxes_{_safe(basin)}.png", hybrid, physics, st, forcing.values[b],
                    forcing.names, hb["parameters"][b:b + 1], mb["parameters"][b:b + 1], networks,
                    title=f"{basin}: network fluxes against M0's physics fluxes at the hybrid's states",
                    seed=cfg.run.seed,
                )
    log(f"wrote {run_dir / 'metrics.json'}, results.h5 and plots/")
    return metrics


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def evaluate(run: str | os.PathLike | LoadedRun, *, log: Log = print, device: str | None = None) -> dict:
    """Simulate the saved models of a run over all periods; write metrics.json, results.h5 and plots.

    ``device`` overrides the run's ``solver.device`` for these simulations.
    Returns the metrics (as written to metrics.json).
    """
    lr = run if isinstance(run, LoadedRun) else load_run(run)
    cfg = lr.config
    if device is not None:
        cfg.solver.device = cfg.checked_device(device, "--device")
    forcing, observed, dates = _segment(cfg)
    masks = period_masks(cfg, dates)
    log(f"evaluating over {dates[0]}..{dates[-1]} ({len(dates)} days)")
    blocks = {}
    pm = lr.physics.physical_parameters().detach()
    blocks["m0"] = _model_block(lr.physics, _simulate(lr.physics, forcing, pm, cfg), pm, "physics")
    blocks["m0"]["forcing"] = forcing
    if lr.hybrid is not None:
        ph = lr.hybrid.physical_parameters().detach()
        blocks["hybrid"] = _model_block(lr.hybrid, _simulate(lr.hybrid, forcing, ph, cfg), ph, "hybrid")
        blocks["hybrid"]["forcing"] = forcing
    hist = {
        "calibration": lr.m0_state.get("history"),
        "loss": cfg.training.loss if lr.hybrid is not None else cfg.calibration.loss,
    }
    if lr.hybrid_state is not None:
        hist["pretraining"] = lr.hybrid_state.get("pretrain_history")
        hist["training"] = lr.hybrid_state.get("history")
        hist["best_epoch"] = lr.hybrid_state.get("best_epoch")
    return _write_outputs(lr.run_dir, cfg, dates, list(forcing.basins), observed, masks, blocks,
                          command=lr.info.get("command", "train"), histories=hist, log=log)


def simulate(cfg: Config, *, parameters: Mapping[str, float] | None = None,
             output_dir: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
             log: Log = print) -> Path:
    """Forward run of M0 with the configured (or given) parameters, no training.

    Writes a run folder (config.toml, run.json, results.h5, metrics.json, plots/) and
    returns the path of results.h5; with ``output``, only that results file is written.
    Periods: the simulation covers the configured periods (warm-up included), or the
    whole data set when none are given (scored as period ``all``).
    """
    physics = build_physics_model(cfg.model)
    given = dict(cfg.model.parameters)
    given.update(parameters or {})
    for k, v in given.items():
        if k not in physics.parameter_names:
            raise cfg.error("parameters", f"model {physics.name!r} has no parameter {k!r}; parameters: "
                            f"{', '.join(physics.parameter_names)}")
        spec = physics.parameters_spec[physics.parameter_names.index(k)]
        if not spec.low <= v <= spec.high:
            raise cfg.error(f"parameters.{k}", f"{v} is outside its bounds [{spec.low}, {spec.high}] {spec.units}")
    if given:
        physics.set_parameters(given)
    forcing, observed, dates = _segment(cfg)
    masks = period_masks(cfg, dates) or {"all": np.ones(len(dates), dtype=bool)}
    pm = physics.physical_parameters().detach()
    pretty = ", ".join(f"{n}={float(v):.4g}" for n, v in zip(physics.parameter_names, pm[0]))
    log(f"simulating {physics.name} over {dates[0]}..{dates[-1]} ({len(dates)} days) with {pretty}")
    t0 = _time.perf_counter()
    sol = _simulate(physics, forcing, pm, cfg)
    log(f"solved in {_time.perf_counter() - t0:.1f} s ({cfg.solver.method})")
    blocks = {"m0": _model_block(physics, sol, pm, "physics")}
    ds = cfg.dataset()
    if output is not None:
        out = Path(output)
        if not out.parent.is_dir():
            raise FileNotFoundError(f"{out.parent}: folder not found (for --output)")
        obs_units = ds.observation_units[ds.observation_names.index(observed_name(cfg))] or "mm/day"
        write_results(out, dates=dates, basins=list(forcing.basins), observed=observed,
                      observed_name=observed_name(cfg), observed_units=obs_units, models=blocks, masks=masks,
                      attrs={"run": cfg.run.name, "config": cfg.text, "command": "simulate"})
        log(f"wrote {out}")
        return out
    run_dir, _ = _open_run_dir(cfg, output_dir, None, log, "simulate")
    _write_outputs(run_dir, cfg, dates, list(forcing.basins), observed, masks, blocks, command="simulate",
                   histories=None, log=log)
    _update_info(run_dir, stage="done", parameters={n: pm[:, j].tolist() for j, n in enumerate(physics.parameter_names)})
    return run_dir / "results.h5"


# ---------------------------------------------------------------- summary
def summary_table(metrics: Mapping, names: Sequence[str] = SUMMARY_METRICS) -> str:
    """A text table of ``names`` per basin and period for M0 and the hybrid (from metrics.json)."""
    keys = [k for k in ("m0", "hybrid") if k in metrics]
    if not keys:
        return "(no metrics)"
    cols = [f"{_LABELS[k]} {n.upper()}" for n in names for k in keys]
    basins = list(metrics[keys[0]]["basins"])
    periods = [p for p in (*PERIODS, "all") if p in metrics[keys[0]]["basins"][basins[0]]]
    wb = max(5, *(len(b) for b in basins))
    wp = max(6, *(len(p) for p in periods))
    wc = max(8, *(len(c) for c in cols))
    lines = [f"{'basin':<{wb}}  {'period':<{wp}}  " + "  ".join(f"{c:>{wc}}" for c in cols)]
    lines.append("-" * len(lines[0]))
    for b in basins:
        for p in periods:
            vals = []
            for n in names:
                for k in keys:
                    v = metrics[k]["basins"][b].get(p, {}).get(n)
                    vals.append(f"{v:>{wc}.3f}" if v is not None else f"{'n/a':>{wc}}")
            lines.append(f"{b:<{wb}}  {p:<{wp}}  " + "  ".join(vals))
    return "\n".join(lines)


def read_metrics(run_dir: str | os.PathLike) -> dict:
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        raise RunError(f"{run_dir}: no metrics.json (evaluate the run first)")
    return json.loads(p.read_text(encoding="utf-8"))
