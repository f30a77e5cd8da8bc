"""Regional (multi-basin, dPL) run folders: ``adjointhydro train`` on a config with ``[regional]``.

A regional run lives in ``<output_dir>/<name>_<timestamp>/`` like a single-basin run::

    config.toml      copy of the configuration
    run.json         command, mode = "regional", original config path, stage, timings
    config.json      the settings :func:`~adjointhydro.regional.train_regional` ran with
    checkpoints/     last.pt (every epoch) and best.pt
    history.json     one record per epoch
    model.pt         the trained parameter network (and hybrid networks), attribute names
    metrics.json     basin -> period -> metric -> value (train, validation, test; NaN as null)
    summary.json     period -> metric -> median, q25, q75, mean, min, max, n over basins
    parameters.csv   learned physical parameters per basin
    results.h5       dates, basin ids, period masks, observed and simulated daily discharge
                     [basin, day] (mm/day, NaN = not observed) and the parameters per basin,
                     in the layout of :func:`adjointhydro.runs.write_results` (model key
                     "regional"; discharge only, no stores or fluxes)
    plots/           nse_cdf.png, kge_cdf.png (CDF of the per-basin metric, one curve per period)
    dynamic_parameters.npz  with ``regional.dynamic_parameters``: their daily values
                     (name -> [basin, day]), ``basins`` and ``dates``

The network is trained on the record from the simulation start to the end of the
training/validation periods (windows of ``regional.window`` days after
``regional.warmup`` unscored days); evaluation simulates every basin from the
simulation start to the last period and scores each period.

With ``regional.cv_folds = k`` (k >= 2) ``train`` runs k-fold cross-validation over
basins instead (:func:`~adjointhydro.regional.cross_validate_basins`; prediction in
ungauged basins): the basins are shuffled (``run.seed``) into k folds, and for each fold
a fresh network is trained on the other folds' basins and simulates the fold's basins
from their attributes alone. The run folder then holds::

    run.json         mode = "regional", cv_folds = k
    fold<i>/         the run folder of fold i's training (config.json, checkpoints/,
                     history.json; metrics.json, summary.json and parameters.csv of its
                     TRAINING basins) and model.pt (its networks, train_basins, test_basins),
                     heldout_metrics.json (its held-out basins -> period -> metric) and
                     heldout_summary.json (period -> metric -> distribution over them)
    folds.json       per fold: fold, train_basins, test_basins, best_epoch, seconds and
                     summary (period -> metric -> distribution over its held-out basins)
    metrics.json     pooled: every basin, scored while held out (each exactly once)
    summary.json     pooled: period -> metric -> median, q25, q75, ... over all basins
    parameters.csv   every basin's parameters, predicted while it was held out
    results.h5       every basin's simulated discharge while it was held out
    plots/           CDFs of the pooled held-out NSE and KGE

Held-out basins are scored in every configured period (train: ungauged in space;
test: ungauged in space and time). ``evaluate`` re-simulates them from ``fold<i>/model.pt``;
``resume`` continues an interrupted cross-validation fold by fold.
"""
from __future__ import annotations

import contextlib
import json
import os
import time as _time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import distributed as _dist
from ._io import atomic_torch_save, atomic_write_text
from .config import Config, build_physics_model, observed_name
from .runs import (RunError, _dataset_part, _open_run_dir, _sensitivity, _sigint_guard, _torch_load, _update_info,
                   _write_json, load_run_config, period_masks, read_run_info, write_results)

__all__ = ["train_regional_run", "evaluate_regional_run", "regional_summary_table", "cv_folds_table",
           "is_regional_run", "read_regional_metrics", "read_regional_folds", "REGIONAL_METRICS"]

#: Metrics written to metrics.json of a regional run.
REGIONAL_METRICS = ("nse", "kge", "rmse", "pbias")
#: Metrics whose distribution over basins is printed and plotted.
SUMMARY_METRICS = ("nse", "kge")
#: Key and kinds of the model block in results.h5 of a regional run.
RESULTS_KEY = "regional"
_KIND = "regional (parameters from attributes)"
_KIND_CV = "regional, each basin held out (k-fold cross-validation over basins)"

Log = Callable[[str], None]


def is_regional_run(run_dir: str | os.PathLike) -> bool:
    return read_run_info(Path(run_dir)).get("mode") == "regional"


def _models(cfg: Config):
    """(model, network) freshly built from the configuration (seeded by run.seed)."""
    from .regional import AttributeParameters, regional_hybrid

    g, m = cfg.regional, cfg.model
    torch.manual_seed(int(cfg.run.seed))
    if m.name == "exphydro_m50":
        smoothing = None if m.smoothing == 0 else m.smoothing
        model = regional_hybrid(g.attributes, snow=m.use_snow, smoothing=smoothing, hidden=m.hidden_layers)
        for f in model.neural_fluxes():  # solver.dtype; the bounds stay float64
            f.to(cfg.solver.torch_dtype)
    else:
        model = build_physics_model(m)
    network = AttributeParameters(model, g.attributes, hidden=tuple(g.hidden), dynamic=tuple(g.dynamic_parameters),
                                  dynamic_inputs=g.dynamic_inputs, lookback=g.dynamic_lookback)
    return model, network


def _load_models(cfg: Config, path: Path):
    """(model, network, saved state) of a model.pt written by a regional run."""
    state = _torch_load(path)
    model, network = _models(cfg)
    try:
        network.load_state_dict(state["network"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise RunError(f"{path}: does not match config.toml ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    network.eval()
    return model, network, state


def _model_state(model, network, **extra: Any) -> dict:
    """What model.pt holds: the weights, and what is needed to rebuild and describe them."""
    return {"network": network.state_dict(), "model": model.state_dict(),
            "attributes": list(network.attribute_names), "parameter_names": list(network.parameter_names),
            "model_name": model.name, **extra}


def _check_window(cfg: Config, train_mask: np.ndarray, last: np.datetime64) -> None:
    """The training windows fit the record (ConfigError naming regional.window otherwise)."""
    g = cfg.regional
    if not g.window:
        return
    from .regional import _windows

    try:
        _windows(train_mask, g.warmup, g.window)
    except ValueError:
        raise cfg.error("regional.window", f"{g.window} days do not fit after the first training day "
                        f"{cfg.periods.train_start} and before {last}; shorten it (0: the whole training "
                        f"period)") from None


def _dtype(cfg: Config):
    """solver.dtype for the regional functions: None (their default) for float64."""
    return None if cfg.solver.dtype == "float64" else cfg.solver.torch_dtype


def _train_settings(cfg: Config, progress: bool, on_epoch) -> dict:
    """Keyword arguments of :func:`~adjointhydro.regional.train_regional` from [regional] and [solver]."""
    g, s = cfg.regional, cfg.solver
    return dict(
        warmup=g.warmup, window=g.window or None, batch_size=g.batch_basins, epochs=g.epochs, lr=g.lr,
        lr_schedule=None if g.lr_schedule == "constant" else g.lr_schedule, loss=g.loss, patience=g.patience,
        val_every=g.val_every, sensitivity=_sensitivity(cfg), method=s.method, rtol=s.rtol, atol=s.atol,
        grad_clip=g.grad_clip, progress=progress, on_epoch=on_epoch,
        dynamic_parameters=tuple(g.dynamic_parameters), dynamic_inputs=g.dynamic_inputs,
        dynamic_lookback=g.dynamic_lookback, dtype=_dtype(cfg),
    )


def train_regional_run(
    cfg: Config,
    *,
    output_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict], Any] | None = None,
    log: Log = print,
) -> Path:
    """Train the regional model of ``cfg`` (``[regional]``), evaluate it, return the run folder.

    With ``regional.cv_folds >= 2``, k-fold cross-validation over basins instead (module
    docstring). With ``run_dir`` an interrupted run is continued from its checkpoints.
    """
    from .regional import train_regional

    if cfg.regional is None:
        raise cfg.error("regional", "not a regional configuration (no [regional] section)")
    p, g = cfg.periods, cfg.regional
    if p.train_start is None:
        raise cfg.error("periods.train_start", "required to train (with periods.train_end)")
    # under torchrun every process trains its shard of each batch; rank 0 alone owns
    # the run folder (opens it, writes checkpoints, model.pt and the evaluation)
    writer = _dist.rank() == 0
    if g.cv_folds and _dist.is_distributed():
        raise cfg.error("regional.cv_folds", "cross-validation over basins runs in one process; start it "
                        "without torchrun (or set cv_folds = 0 to train one model on several processes)")
    if g.cv_folds:
        return _train_cv_run(cfg, output_dir=output_dir, run_dir=run_dir, progress=progress, on_epoch=on_epoch,
                             log=log)
    part = _dataset_part(cfg, p.training_end)
    masks = period_masks(cfg, part.dates)
    _check_window(cfg, masks["train"], part.dates[-1])
    model, network = _models(cfg)
    obs = observed_name(cfg)
    opened = None
    if writer:
        run_dir, resuming = _open_run_dir(cfg, output_dir, run_dir, log)
        _update_info(run_dir, mode="regional", world_size=_dist.world_size())
        opened = (str(run_dir), resuming and (run_dir / "checkpoints" / "last.pt").is_file())
    run_dir, cont = _dist.broadcast_object(opened)
    run_dir = Path(run_dir)
    log(("resuming" if cont else "training") + f" {model.name} on {len(part.basins)} basins from "
        f"{len(g.attributes)} attributes: up to {g.epochs} epochs, lr {g.lr} ({g.lr_schedule}), loss {g.loss}, "
        f"batches of {g.batch_basins} basins, windows of {g.window or 'all'} days after {g.warmup} days warm-up"
        + (f", {_dist.world_size()} processes" if _dist.is_distributed() else ""))
    if writer:
        _update_info(run_dir, stage="training")
    t0 = _time.perf_counter()
    with _sigint_guard(run_dir, "training") if writer else contextlib.nullcontext():
        result = train_regional(
            model, part, attribute_names=g.attributes, network=network, observed=part.observed(obs),
            train_mask=masks["train"], val_mask=masks.get("validation"), seed=cfg.run.seed,
            out_dir=run_dir, resume=cont, final_metrics=False,
            **_train_settings(cfg, progress and writer, on_epoch),
        )
    if not writer:
        return run_dir
    log(f"training done in {result.seconds:.1f} s: {len(result.history)} epochs, best epoch {result.best_epoch} "
        f"({'validation' if 'validation' in masks else 'training'} loss {result.best_val_loss:.4f})"
        + (", stopped early" if result.stopped_early else ""))
    atomic_torch_save(_model_state(
        model, network, history=result.history, best_epoch=result.best_epoch,
        best_val_loss=result.best_val_loss, stopped_early=result.stopped_early,
    ), run_dir / "model.pt")
    _update_info(run_dir, stage="trained", timings={"training": _time.perf_counter() - t0})
    _update_info(run_dir, stage="evaluation")
    evaluate_regional_run(run_dir, log=log, cfg=cfg)
    _update_info(run_dir, stage="done")
    return run_dir


def _train_cv_run(cfg: Config, *, output_dir, run_dir, progress: bool, on_epoch, log: Log) -> Path:
    """k-fold cross-validation over basins (regional.cv_folds = k); evaluate; return the run folder."""
    from .regional import cross_validate_basins

    g = cfg.regional
    k = int(g.cv_folds)
    # the whole simulation span: held-out basins are also scored in the test period
    part = _dataset_part(cfg)
    masks = period_masks(cfg, part.dates)
    _check_window(cfg, masks["train"], part.dates[-1])
    run_dir, resuming = _open_run_dir(cfg, output_dir, run_dir, log)
    _update_info(run_dir, mode="regional", cv_folds=k)
    log(("resuming" if resuming else "running") + f" {k}-fold cross-validation over {len(part.basins)} basins "
        f"({cfg.model.name} from {len(g.attributes)} attributes): per fold up to {g.epochs} epochs, lr {g.lr} "
        f"({g.lr_schedule}), loss {g.loss}, batches of {g.batch_basins} basins, windows of {g.window or 'all'} "
        f"days after {g.warmup} days warm-up")
    _update_info(run_dir, stage="cross-validation")
    t0 = _time.perf_counter()
    with _sigint_guard(run_dir, "cross-validation"):
        # resume=True: each fold continues from its checkpoints/last.pt where there is one
        # (finished folds are only read back), else starts afresh
        cv = cross_validate_basins(
            lambda: _models(cfg)[0], part, k, seed=cfg.run.seed, attribute_names=g.attributes,
            observation=observed_name(cfg),
            train_mask=masks["train"], val_mask=masks.get("validation"), test_mask=masks.get("test"),
            metrics=REGIONAL_METRICS, out_dir=run_dir, hidden=tuple(g.hidden), resume=True,
            **_train_settings(cfg, progress, on_epoch),
        )
    for f in cv.folds:
        atomic_torch_save(_model_state(
            f["model"], f["network"], fold=f["fold"], train_basins=f["train_basins"],
            test_basins=f["test_basins"], best_epoch=f["best_epoch"], seconds=f["seconds"],
        ), run_dir / f"fold{f['fold']}" / "model.pt")
    log(f"cross-validation done in {_time.perf_counter() - t0:.1f} s")
    _update_info(run_dir, stage="trained", timings={"cross-validation": _time.perf_counter() - t0})
    _update_info(run_dir, stage="evaluation")
    evaluate_regional_run(run_dir, log=log, cfg=cfg)
    _update_info(run_dir, stage="done")
    return run_dir


def _parameters(network, part) -> np.ndarray:
    """Physical parameters ``[basin, P]`` the network gives the basins of ``part``."""
    with torch.no_grad():
        return network(np.stack([part.attribute(a) for a in network.attribute_names], axis=1)).numpy()


def _summary(metrics: Mapping, periods) -> dict:
    """period -> metric -> distribution over the basins of ``metrics``."""
    from .regional import _summaries

    return {p: {m: _summaries(metrics, m)[p] for m in REGIONAL_METRICS} for p in periods}


def evaluate_regional_run(run_dir: str | os.PathLike, *, log: Log = print, cfg: Config | None = None) -> dict:
    """Simulate every basin of a regional run over all periods; write metrics.json, summary.json,
    parameters.csv, results.h5 and plots/ (of a cross-validation: every basin by the network of
    the fold that held it out, plus folds.json and each fold's held-out metrics).

    Returns the metrics (basin -> period -> metric -> value).
    """
    from .regional import evaluate_regional

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_run_config(run_dir)
    if cfg.regional is None:
        raise RunError(f"{run_dir}: config.toml has no [regional] section")
    if cfg.regional.cv_folds:
        return _evaluate_cv_run(run_dir, cfg, log)
    path = run_dir / "model.pt"
    if not path.is_file():
        raise RunError(f"{run_dir}: no model.pt (the training did not finish; `adjointhydro resume {run_dir}`)")
    model, network, _ = _load_models(cfg, path)
    part = _dataset_part(cfg)
    masks = period_masks(cfg, part.dates) or {"all": np.ones(len(part.dates), dtype=bool)}
    log(f"evaluating {len(part.basins)} basins over {part.dates[0]}..{part.dates[-1]} ({len(part.dates)} days)")
    metrics, sim, dyn = evaluate_regional(model, network, part, part.observed(observed_name(cfg)), periods=masks,
                                          metrics=REGIONAL_METRICS, method=cfg.solver.method, rtol=cfg.solver.rtol,
                                          atol=cfg.solver.atol, return_dynamic=True, dtype=_dtype(cfg))
    _write_outputs(run_dir, cfg, part, masks, metrics, sim, _parameters(network, part), model, _KIND, log)
    if dyn:  # regional.dynamic_parameters: their daily values over the evaluated record
        from .regional import write_dynamic_parameters

        write_dynamic_parameters(run_dir / "dynamic_parameters.npz", dyn, part.basins, part.dates)
        log(f"wrote dynamic_parameters.npz ({', '.join(dyn)} per basin and day)")
    return metrics


def _evaluate_cv_run(run_dir: Path, cfg: Config, log: Log) -> dict:
    """Evaluation of a cross-validation run: each basin simulated by its fold's network."""
    from .regional import _json_safe, evaluate_regional

    k = int(cfg.regional.cv_folds)
    part = _dataset_part(cfg)
    masks = period_masks(cfg, part.dates)
    obs = observed_name(cfg)
    row = {b: i for i, b in enumerate(part.basins)}
    sim = np.full((len(part.basins), len(part.dates)), np.nan)
    params = None
    dynamic: dict[str, np.ndarray] = {}  # name -> [basin, time], each basin from the fold that held it out
    pooled: dict[str, dict] = {}
    folds = []
    log(f"evaluating the held-out basins of {k} folds over {part.dates[0]}..{part.dates[-1]} "
        f"({len(part.dates)} days)")
    for i in range(k):
        path = run_dir / f"fold{i}" / "model.pt"
        if not path.is_file():
            raise RunError(f"{run_dir}: no fold{i}/model.pt (the cross-validation did not finish; "
                           f"`adjointhydro resume {run_dir}`)")
        model, network, state = _load_models(cfg, path)
        test = list(state["test_basins"])
        unknown = [b for b in test if b not in row]
        if unknown:
            raise RunError(f"{path}: held-out basin(s) {unknown[:5]} are not in the data of config.toml")
        twice = [b for b in test if b in pooled]
        if twice:
            raise RunError(f"{path}: basin(s) {twice[:5]} are held out by an earlier fold too")
        held = part.select_basins(test)
        met, q, dyn = evaluate_regional(model, network, held, held.observed(obs), periods=masks,
                                        metrics=REGIONAL_METRICS, method=cfg.solver.method, rtol=cfg.solver.rtol,
                                        atol=cfg.solver.atol, return_dynamic=True, dtype=_dtype(cfg))
        p = _parameters(network, held)
        if params is None:
            params = np.full((len(part.basins), p.shape[1]), np.nan)
        for n in dyn:
            dynamic.setdefault(n, np.full((len(part.basins), len(part.dates)), np.nan))
        for j, b in enumerate(test):
            sim[row[b]], params[row[b]] = q[j], p[j]
            for n, v in dyn.items():
                dynamic[n][row[b]] = v[j]
        pooled.update(met)
        summ = _summary(met, masks)
        _write_json(path.parent / "heldout_metrics.json", _json_safe(met))
        _write_json(path.parent / "heldout_summary.json", _json_safe(summ))
        folds.append({"fold": i, "train_basins": list(state["train_basins"]), "test_basins": test,
                      "best_epoch": state.get("best_epoch"), "seconds": state.get("seconds"), "summary": summ})
    missing = [b for b in part.basins if b not in pooled]
    if missing:
        raise RunError(f"{run_dir}: basin(s) {missing[:5]} are held out by no fold (fold<i>/model.pt do not "
                       f"match config.toml)")
    metrics = {b: pooled[b] for b in part.basins}
    _write_json(run_dir / "folds.json", _json_safe(folds))
    _write_outputs(run_dir, cfg, part, masks, metrics, sim, params, model, _KIND_CV, log)
    if dynamic:  # each basin's daily dynamic parameters, predicted while it was held out
        from .regional import write_dynamic_parameters

        write_dynamic_parameters(run_dir / "dynamic_parameters.npz", dynamic, part.basins, part.dates)
        log(f"wrote dynamic_parameters.npz ({', '.join(dynamic)} per basin and day, held out)")
    return metrics


def _write_outputs(run_dir: Path, cfg: Config, part, masks, metrics: dict, sim: np.ndarray, params: np.ndarray,
                   model, kind: str, log: Log) -> None:
    """metrics.json, summary.json, parameters.csv, results.h5 and plots/ of an evaluation."""
    from .regional import _json_safe, plot_metric_cdf

    _write_json(run_dir / "metrics.json", _json_safe(metrics))
    _write_json(run_dir / "summary.json", _json_safe(_summary(metrics, masks)))
    names = list(model.parameter_names)
    lines = ["basin," + ",".join(names)]
    lines += [b + "," + ",".join(f"{v:.8g}" for v in params[i]) for i, b in enumerate(part.basins)]
    atomic_write_text(run_dir / "parameters.csv", "\n".join(lines) + "\n")
    obs = observed_name(cfg)
    units = part.observation_units[part.observation_names.index(obs)] or "mm/day"
    k = int(cfg.regional.cv_folds)
    write_results(
        run_dir / "results.h5", dates=part.dates, basins=list(part.basins), observed=part.observed(obs),
        observed_name=obs, observed_units=units, masks=masks,
        models={RESULTS_KEY: {"model": model, "discharge": sim, "parameters": torch.as_tensor(params),
                              "kind": kind, "method": cfg.solver.method}},
        attrs={"run": cfg.run.name, "config": cfg.text, "command": "train", "mode": "regional",
               "cv_folds": np.int64(k)},
    )
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    what = f"held-out basins ({k}-fold cross-validation)" if k else f"{len(part.basins)} basins"
    for m in SUMMARY_METRICS:
        plot_metric_cdf(metrics, m, path=plots / f"{m}_cdf.png", title=f"{cfg.run.name}: {m.upper()}, {what}")
    log(f"wrote metrics.json, summary.json, parameters.csv, results.h5 and plots/ in {run_dir}")


def regional_summary_table(metrics: Mapping, names=SUMMARY_METRICS) -> str:
    """Median and quartiles over basins of ``names`` per period (from a regional metrics.json)."""
    from .regional import _summaries

    if not metrics:
        return "(no metrics)"
    first = next(iter(metrics.values()))
    periods = [p for p in ("train", "validation", "test", "all") if p in first]
    lines = [f"{'period':<12}{'metric':<8}{'median':>9}{'q25':>9}{'q75':>9}{'n':>6}"]
    lines.append("-" * len(lines[0]))
    for p in periods:
        for m in names:
            s = _summaries({b: {p: {k: (np.nan if v is None else v) for k, v in per[p].items()}}
                            for b, per in metrics.items()}, m)[p]
            lines.append(f"{p:<12}{m.upper():<8}{s['median']:>9.3f}{s['q25']:>9.3f}{s['q75']:>9.3f}{s['n']:>6d}")
    return "\n".join(lines)


def cv_folds_table(folds: list, names=SUMMARY_METRICS) -> str:
    """Per fold and period: held-out basins and the median and quartiles of ``names`` (from folds.json)."""
    def num(x) -> float:
        return np.nan if x is None else float(x)

    head = f"{'fold':<6}{'basins':>7}  {'period':<12}" + "".join(
        f"{m.upper() + ' ' + s:>12}" for m in names for s in ("median", "q25", "q75"))
    lines = [head, "-" * len(head)]
    for f in folds:
        for p, per in f["summary"].items():
            vals = "".join(f"{num(per[m][s]):>12.3f}" for m in names for s in ("median", "q25", "q75"))
            lines.append(f"{f['fold']:<6}{len(f['test_basins']):>7}  {p:<12}{vals}")
    return "\n".join(lines)


def read_regional_metrics(run_dir: str | os.PathLike) -> dict:
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        raise RunError(f"{run_dir}: no metrics.json (evaluate the run first)")
    return json.loads(p.read_text(encoding="utf-8"))


def read_regional_folds(run_dir: str | os.PathLike) -> list:
    """folds.json of a cross-validation run (see the module docstring)."""
    p = Path(run_dir) / "folds.json"
    if not p.is_file():
        raise RunError(f"{run_dir}: no folds.json (not a cross-validation run, or not evaluated yet)")
    return json.loads(p.read_text(encoding="utf-8"))
