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
    plots/           nse_cdf.png, kge_cdf.png (CDF of the per-basin metric, one curve per period)

The network is trained on the record from the simulation start to the end of the
training/validation periods (windows of ``regional.window`` days after
``regional.warmup`` unscored days); evaluation simulates every basin from the
simulation start to the last period and scores each period.
"""
from __future__ import annotations

import json
import os
import time as _time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .config import Config, build_physics_model, observed_name
from .runs import (RunError, _atomic_torch_save, _sigint_guard, _torch_load, _update_info, _write_json, load_run_config, new_run_dir, period_masks, read_run_info)

__all__ = ["train_regional_run", "evaluate_regional_run", "regional_summary_table", "is_regional_run",
           "REGIONAL_METRICS"]

#: Metrics written to metrics.json of a regional run.
REGIONAL_METRICS = ("nse", "kge", "rmse", "pbias")
#: Metrics whose distribution over basins is printed and plotted.
SUMMARY_METRICS = ("nse", "kge")

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
    else:
        model = build_physics_model(m)
    network = AttributeParameters(model, g.attributes, hidden=tuple(g.hidden))
    return model, network


def _dataset_segment(cfg: Config, end=None):
    """The data set restricted to the simulation span (and to ``end``)."""
    ds = cfg.dataset()
    start = cfg.periods.simulation_start
    start = ds.dates[0] if start is None else start
    stop = end if end is not None else cfg.periods.simulation_end
    stop = ds.dates[-1] if stop is None else stop
    return ds.period(start, stop)


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

    With ``run_dir`` an interrupted run is continued from ``checkpoints/last.pt``.
    """
    from .regional import train_regional

    if cfg.regional is None:
        raise cfg.error("regional", "not a regional configuration (no [regional] section)")
    p, g = cfg.periods, cfg.regional
    if p.train_start is None:
        raise cfg.error("periods.train_start", "required to train (with periods.train_end)")
    part = _dataset_segment(cfg, p.training_end)
    dates = part.dates
    masks = period_masks(cfg, dates)
    if g.window:
        from .regional import _windows

        try:
            _windows(masks["train"], g.warmup, g.window)
        except ValueError:
            raise cfg.error("regional.window", f"{g.window} days do not fit after the first training day "
                            f"{p.train_start} and before {dates[-1]}; shorten it (0: the whole training "
                            f"period)") from None
    model, network = _models(cfg)
    obs = observed_name(cfg)
    resuming = run_dir is not None
    run_dir = Path(run_dir) if resuming else new_run_dir(cfg, output_dir, "train")
    _update_info(run_dir, mode="regional")
    log(f"run folder: {run_dir}")
    cont = resuming and (run_dir / "checkpoints" / "last.pt").is_file()
    log(("resuming" if cont else "training") + f" {model.name} on {len(part.basins)} basins from "
        f"{len(g.attributes)} attributes: up to {g.epochs} epochs, lr {g.lr} ({g.lr_schedule}), loss {g.loss}, "
        f"batches of {g.batch_basins} basins, windows of {g.window or 'all'} days after {g.warmup} days warm-up")
    _update_info(run_dir, stage="training")
    t0 = _time.perf_counter()
    with _sigint_guard(run_dir, "training"):
        result = train_regional(
            model, part, attribute_names=g.attributes, network=network, observed=part.observed(obs),
            train_mask=masks["train"], val_mask=masks.get("validation"), warmup=g.warmup,
            window=g.window or None, batch_size=g.batch_basins, epochs=g.epochs, lr=g.lr,
            lr_schedule=None if g.lr_schedule == "constant" else g.lr_schedule, loss=g.loss,
            patience=g.patience, val_every=g.val_every, seed=cfg.run.seed, sensitivity=cfg.solver.sensitivity,
            method=cfg.solver.method, rtol=cfg.solver.rtol, atol=cfg.solver.atol, grad_clip=g.grad_clip,
            out_dir=run_dir, resume=cont, final_metrics=False, progress=progress, on_epoch=on_epoch,
        )
    log(f"training done in {result.seconds:.1f} s: {len(result.history)} epochs, best epoch {result.best_epoch} "
        f"({'validation' if 'validation' in masks else 'training'} loss {result.best_val_loss:.4f})"
        + (", stopped early" if result.stopped_early else ""))
    _atomic_torch_save({
        "network": network.state_dict(), "model": model.state_dict(),
        "attributes": list(network.attribute_names), "parameter_names": list(network.parameter_names),
        "model_name": model.name, "history": result.history, "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss, "stopped_early": result.stopped_early,
    }, run_dir / "model.pt")
    _update_info(run_dir, stage="trained", timings={"training": _time.perf_counter() - t0})
    _update_info(run_dir, stage="evaluation")
    evaluate_regional_run(run_dir, log=log, cfg=cfg)
    _update_info(run_dir, stage="done")
    return run_dir


def evaluate_regional_run(run_dir: str | os.PathLike, *, log: Log = print, cfg: Config | None = None) -> dict:
    """Simulate every basin of a regional run over all periods; write metrics.json, summary.json, plots/.

    Returns the metrics (basin -> period -> metric -> value).
    """
    from .regional import _json_safe, _summaries, evaluate_regional, plot_metric_cdf

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_run_config(run_dir)
    if cfg.regional is None:
        raise RunError(f"{run_dir}: config.toml has no [regional] section")
    path = run_dir / "model.pt"
    if not path.is_file():
        raise RunError(f"{run_dir}: no model.pt (the training did not finish; `adjointhydro resume {run_dir}`)")
    state = _torch_load(path)
    model, network = _models(cfg)
    try:
        network.load_state_dict(state["network"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise RunError(f"{path}: does not match config.toml ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    network.eval()
    part = _dataset_segment(cfg)
    masks = period_masks(cfg, part.dates) or {"all": np.ones(len(part.dates), dtype=bool)}
    log(f"evaluating {len(part.basins)} basins over {part.dates[0]}..{part.dates[-1]} ({len(part.dates)} days)")
    metrics, _ = evaluate_regional(model, network, part, part.observed(observed_name(cfg)), periods=masks,
                                   metrics=REGIONAL_METRICS, method=cfg.solver.method, rtol=cfg.solver.rtol,
                                   atol=cfg.solver.atol)
    _write_json(run_dir / "metrics.json", _json_safe(metrics))
    summ = {p: {m: _summaries(metrics, m)[p] for m in REGIONAL_METRICS} for p in masks}
    _write_json(run_dir / "summary.json", _json_safe(summ))
    with torch.no_grad():
        params = network(np.stack([part.attribute(a) for a in network.attribute_names], axis=1)).numpy()
    lines = ["basin," + ",".join(network.parameter_names)]
    lines += [b + "," + ",".join(f"{v:.8g}" for v in params[i]) for i, b in enumerate(part.basins)]
    (run_dir / "parameters.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    for m in SUMMARY_METRICS:
        plot_metric_cdf(metrics, m, path=plots / f"{m}_cdf.png",
                        title=f"{cfg.run.name}: {m.upper()} over {len(part.basins)} basins")
    log(f"wrote metrics.json, summary.json, parameters.csv and plots/ in {run_dir}")
    return metrics


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


def read_regional_metrics(run_dir: str | os.PathLike) -> dict:
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        raise RunError(f"{run_dir}: no metrics.json (evaluate the run first)")
    return json.loads(p.read_text(encoding="utf-8"))

