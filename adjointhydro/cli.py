"""The ``adjointhydro`` command line.

::

    adjointhydro train CONFIG        calibrate M0; for a hybrid also pretrain and train it end to end;
                                     evaluate on all periods; write a run folder; print NSE/KGE
    adjointhydro resume RUN          continue an interrupted training run
    adjointhydro evaluate RUN        recompute metrics.json, results.h5 and plots from the saved models
    adjointhydro simulate CONFIG     forward run of M0 with default or given parameters (no training)
    adjointhydro inspect RUN         symbolic inspection of the hybrid's networks (into RUN/inspect)

A configuration with a ``[regional]`` section trains one model for many basins
(parameters learned from catchment attributes, dPL; :mod:`adjointhydro.regional_runs`):
``train``, ``resume`` and ``evaluate`` then write and print per-basin metrics and
their distribution (median and quartiles per period; CDF plots in RUN/plots) and write
the simulated discharge of every basin to RUN/results.h5. With ``regional.cv_folds = k``
``train`` runs k-fold cross-validation over basins instead (prediction in ungauged
basins): per-fold and pooled held-out metrics, printed per fold and pooled.
Regional ``train`` and ``resume`` are data-parallel when started by ``torchrun``
(``torchrun --standalone --nproc_per_node=2 -m adjointhydro train CONFIG``): each
process trains its shard of every batch, gradients are summed, rank 0 writes the run.

Problems with the configuration, the data, the model or the solver are reported
as one line ``adjointhydro: error: ...`` with exit status 2 (``--debug`` shows the
traceback). Ctrl-C during training leaves a run that ``resume`` continues (exit 130).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]

PROG = "adjointhydro"


class _StopTraining(KeyboardInterrupt):
    """Raised by the hidden --stop-after-epochs hook: behaves like Ctrl-C after a checkpoint."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Differentiable hydrological models: calibration and neural-ODE hybrid training.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress messages")
    common.add_argument(
        "--threads", type=int, default=1, metavar="N",
        help="torch CPU threads (default 1: the solver's many small operations run fastest, "
             "and far faster than with several threads on a busy machine)",
    )
    placed = argparse.ArgumentParser(add_help=False)
    placed.add_argument(
        "--device", default=None, metavar="DEVICE",
        help="cpu, cuda, cuda:N or auto: overrides the configuration's solver.device",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", parents=[common, placed], help="calibrate M0 and train the hybrid; write a run folder")
    t.add_argument("config", help="the TOML configuration")
    t.add_argument("-o", "--output-dir", help="folder for the run folder (default: run.output_dir)")
    t.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)

    r = sub.add_parser("resume", parents=[common, placed], help="continue an interrupted training run")
    r.add_argument("run", help="the run folder")
    r.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)

    e = sub.add_parser("evaluate", parents=[common, placed], help="recompute metrics and plots of a run from its saved models")
    e.add_argument("run", help="the run folder")

    s = sub.add_parser("simulate", parents=[common, placed], help="forward run with default or given parameters")
    s.add_argument("config", help="the TOML configuration")
    s.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a physical parameter (repeatable); overrides [model] parameters")
    s.add_argument("-o", "--output-dir", help="folder for the run folder (default: run.output_dir)")
    s.add_argument("--output", help="write only this results .h5 file (no run folder)")

    i = sub.add_parser("inspect", parents=[common, placed], help="symbolic inspection of the learned fluxes")
    i.add_argument("run", help="the run folder")
    i.add_argument("--recalibrate", action="store_true",
                   help="also refit the chosen expressions' constants through the ODE (L-BFGS on the "
                        "training period) and report that model too")
    i.add_argument(
        "--selection", choices=("auto", "parsimonious", "ic"), default="auto",
        help="how one expression per flux is chosen: 'parsimonious' (the simplest that fits the network "
             "within the noise level of the hybrid's residuals), 'ic' (the lowest information criterion), "
             "or 'auto' (default): parsimonious, unless its re-simulation on the TRAINING period is more "
             f"than {0.03} NSE below the hybrid's; then 'ic'. The test period never takes part in the choice.",
    )
    return p


def _parse_params(items: Sequence[str]) -> dict[str, float]:
    from .config import ConfigError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE, e.g. --param Smax=1200")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--param {item!r}: {value!r} is not a number") from None
    return out


def _epoch_hook(stop_after: int | None):
    if stop_after is None:
        return None
    count = {"n": 0}

    def hook(epoch: int, record: dict) -> None:
        count["n"] += 1
        if count["n"] >= stop_after:
            raise _StopTraining()

    return hook


def _print_summary(metrics: dict, out) -> None:
    from .runs import summary_table

    print("", file=out)
    print(summary_table(metrics), file=out)


def _print_regional(run_dir, t0: float | None = None) -> None:
    from .regional_runs import cv_folds_table, read_regional_folds, read_regional_metrics, regional_summary_table
    from .runs import read_run_info

    metrics = read_regional_metrics(run_dir)
    k = read_run_info(Path(run_dir)).get("cv_folds")
    print("")
    if k:
        print(f"{k}-fold cross-validation over basins: each basin simulated from its attributes by the "
              f"network of the fold that held it out")
        print(cv_folds_table(read_regional_folds(run_dir)))
        print("")
        print(f"pooled held-out metrics ({len(metrics)} basins, each held out once): distribution over basins")
    else:
        print(f"per-basin metrics ({len(metrics)} basins): distribution over basins")
    print(regional_summary_table(metrics))
    tail = f" ({time.perf_counter() - t0:.0f} s)" if t0 is not None else ""
    print(f"\nrun folder: {run_dir}{tail}")


def _regional_on_cpu(args) -> None:
    from .config import ConfigError

    if getattr(args, "device", None) not in (None, "cpu", "auto"):  # auto: the CPU is what there is
        raise ConfigError(f"--device {args.device}: a regional run ([regional]) runs on the CPU in this version")


def _train_regional_cli(cfg, args, log, t0: float, **where) -> int:
    """Regional training, in one process or (under ``torchrun``) data-parallel over several:
    every process trains its shard of each batch; rank 0 writes the run folder and prints."""
    _regional_on_cpu(args)
    from . import distributed as D
    from .regional_runs import train_regional_run

    launched = D.launched_by_torchrun()
    if launched:
        D.init_distributed()
    with D.tear_down_after(launched):
        writer = D.rank() == 0
        run_dir = train_regional_run(cfg, progress=not args.quiet and writer,
                                     on_epoch=_epoch_hook(args.stop_after_epochs),
                                     log=log if writer else (lambda msg: None), **where)
        if writer:
            _print_regional(run_dir, t0)
    return 0


def _no_torchrun(what: str) -> None:
    from . import distributed as D

    if D.launched_by_torchrun():
        raise ValueError(f"{what} runs in one process; torchrun with several processes is for regional "
                         f"training (a configuration with a [regional] section)")


def _cmd_train(args, log) -> int:
    from .config import load_config
    from .runs import read_metrics, train

    t0 = time.perf_counter()
    cfg = load_config(args.config)
    if args.device is not None:
        cfg.solver.device = cfg.checked_device(args.device, "--device")
    if cfg.regional is not None:
        return _train_regional_cli(cfg, args, log, t0, output_dir=args.output_dir)
    _no_torchrun(f"{args.config}: single-basin training")
    run_dir = train(cfg, output_dir=args.output_dir, progress=not args.quiet,
                    on_epoch=_epoch_hook(args.stop_after_epochs), log=log)
    _print_summary(read_metrics(run_dir), sys.stdout)
    print(f"\nrun folder: {run_dir} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _cmd_resume(args, log) -> int:
    from .runs import read_metrics, resume

    t0 = time.perf_counter()
    from .regional_runs import is_regional_run

    if Path(args.run).is_dir() and (Path(args.run) / "run.json").is_file() and is_regional_run(args.run):
        from .runs import load_run_config

        return _train_regional_cli(load_run_config(args.run), args, log, t0, run_dir=args.run)
    _no_torchrun(f"{args.run}: resuming a single-basin run")
    run_dir = resume(args.run, progress=not args.quiet, on_epoch=_epoch_hook(args.stop_after_epochs), log=log,
                     device=args.device)
    _print_summary(read_metrics(run_dir), sys.stdout)
    print(f"\nrun folder: {run_dir} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _cmd_evaluate(args, log) -> int:
    from .runs import evaluate
    from .regional_runs import evaluate_regional_run, is_regional_run

    if Path(args.run).is_dir() and (Path(args.run) / "run.json").is_file() and is_regional_run(args.run):
        _regional_on_cpu(args)
        evaluate_regional_run(args.run, log=log)
        _print_regional(args.run)
        return 0
    metrics = evaluate(args.run, log=log, device=args.device)
    _print_summary(metrics, sys.stdout)
    return 0


def _cmd_simulate(args, log) -> int:
    from .config import load_config
    from .runs import read_metrics, simulate

    params = _parse_params(args.param)
    cfg = load_config(args.config)
    if args.device is not None:
        cfg.solver.device = cfg.checked_device(args.device, "--device")
    out = simulate(cfg, parameters=params, output_dir=args.output_dir, output=args.output, log=log)
    if args.output is None:
        _print_summary(read_metrics(out.parent), sys.stdout)
    print(f"\nresults: {out}")
    return 0


#: The symbolic model re-simulated should be within this NSE of the hybrid on the test period.
INSPECT_NSE_TOLERANCE = 0.03


def _cmd_inspect(args, log) -> int:
    import numpy as np

    from .runs import RunError, _segment, _simulate, _solve_kw, load_run, period_masks

    try:
        from .symbolic import inspect_model
    except ImportError as e:
        raise RunError(f"symbolic inspection is not available (adjointhydro.symbolic: {e})") from None
    t_all = time.perf_counter()
    from .regional_runs import is_regional_run

    if Path(args.run).is_dir() and (Path(args.run) / "run.json").is_file() and is_regional_run(args.run):
        raise RunError(f"{args.run}: a regional run; inspect works on single-basin hybrid runs")
    lr = load_run(args.run)
    if lr.hybrid is None:
        raise RunError(f"{args.run}: a physics-only run ({lr.physics.name}) has no networks to inspect")
    cfg = lr.config
    if args.device is not None:
        cfg.solver.device = cfg.checked_device(args.device, "--device")
    params = lr.hybrid.physical_parameters().detach()
    # the search sees only the record the hybrid was trained on (warm-up to the end of
    # training/validation); the chosen expressions are then re-simulated over every period
    fit_end = cfg.periods.training_end
    forcing_fit, observed_fit, dates_fit = _segment(cfg, fit_end)
    fit_masks = period_masks(cfg, dates_fit)
    scored = np.zeros(len(dates_fit), dtype=bool)
    for name in ("train", "validation"):
        if name in fit_masks:
            scored |= fit_masks[name]
    if scored.any():  # the warm-up is not scored: its residuals do not set the noise level
        observed_fit = np.where(scored[None, :], observed_fit, np.nan)
    forcing, observed, dates = _segment(cfg)
    masks = period_masks(cfg, dates)
    log(f"simulating the hybrid over {dates_fit[0]}..{dates_fit[-1]} (the search samples this record)")
    sol = _simulate(lr.hybrid, forcing_fit, params, cfg)
    out_dir = Path(args.run) / "inspect"
    out_dir.mkdir(exist_ok=True)
    log(f"inspecting the networks of {lr.hybrid.name}; re-simulating over {dates[0]}..{dates[-1]}")
    solve_kwargs = dict(_solve_kw(cfg), sensitivity=cfg.solver.sensitivity)

    def run(rule: str):
        return inspect_model(lr.hybrid, forcing_fit, sol, observed=observed_fit, parameters=params,
                             periods=masks, out_dir=out_dir, resimulate_forcing=forcing,
                             resimulate_observed=observed, solve_kwargs=solve_kwargs, seed=cfg.run.seed,
                             regressor_kw={"selection": rule}, recalibrate=recalibrate)

    recalibrate = False  # only for the final choice

    rule = "parsimonious" if args.selection == "auto" else args.selection
    report = run(rule)
    selection_note = f"Selection rule: {rule}."
    if args.selection == "auto":
        gap = _nse_gap(report, "train")
        if gap is not None and gap > INSPECT_NSE_TOLERANCE:
            first = {n: fi.chosen.text() for n, fi in report.fluxes.items()}
            log(f"the parsimonious expressions re-simulate {gap:.3f} NSE below the hybrid on the training period; "
                f"choosing by the information criterion instead")
            report = run("ic")
            selection_note = (
                "Selection rule: ic (lowest information criterion). The parsimonious choice ("
                + "; ".join(f"`{n} = {e}`" for n, e in first.items())
                + f") fits the networks within the noise level of the hybrid's discharge residuals, but "
                f"re-simulated it was {gap:.3f} NSE below the hybrid on the training period (more than "
                f"{INSPECT_NSE_TOLERANCE}): a flux error far below the observation noise still accumulates "
                f"in the store. The test period took no part in this choice.")
    if args.recalibrate:
        log("recalibrating the constants of the chosen expressions through the ODE (training period)")
        recalibrate = True
        report = run(rule if args.selection != "auto" else ("ic" if "ic (" in selection_note else rule))
    report.settings["selection"] = selection_note
    report.write(out_dir)
    verdict = _inspect_verdict(report, masks)
    verdict = selection_note + "\n\n" + verdict if verdict else selection_note
    if verdict:
        md = out_dir / "report.md"
        text = md.read_text(encoding="utf-8")
        tmp = md.with_name(f".{md.name}.tmp")
        tmp.write_text(text.rstrip("\n") + "\n\n## Verdict\n\n" + verdict + "\n", encoding="utf-8")
        os.replace(tmp, md)
    print("")
    for name, fi in report.fluxes.items():
        c = fi.chosen
        print(f"{name} = {c.text()}   [{c.form}, {c.method}; R2 {c.r2:.4f}, RMSE {c.rmse:.3g}; "
              f"search {fi.seconds:.1f} s]")
    res = report.resimulation
    if res is not None and res.metrics:
        print("")
        recal = any(r["model"] == "recalibrated" for r in res.metrics)
        print(f"{'period':<12}{'hybrid NSE':>12}{'symbolic NSE':>14}{'hybrid KGE':>12}{'symbolic KGE':>14}"
              + (f"{'recalibrated NSE':>18}{'recalibrated KGE':>18}" if recal else ""))
        for period in masks:
            try:
                h, y = res.get(period, "hybrid"), res.get(period, "symbolic")
            except KeyError:
                continue
            line = f"{period:<12}{h['nse']:>12.3f}{y['nse']:>14.3f}{h['kge']:>12.3f}{y['kge']:>14.3f}"
            if recal:
                try:
                    z = res.get(period, "recalibrated")
                    line += f"{z['nse']:>18.3f}{z['kge']:>18.3f}"
                except KeyError:
                    pass
            print(line)
    elif res is not None and res.error:
        print(f"re-simulation failed: {res.error}")
    if verdict:
        print("")
        print(verdict)
    print(f"\nreport: {out_dir / 'report.md'} ({time.perf_counter() - t_all:.0f} s)")
    return 0


def _nse_gap(report, period: str):
    """Hybrid NSE minus symbolic NSE of the re-simulation on ``period`` (None if not available)."""
    import math

    res = report.resimulation
    if res is None or res.error or not res.metrics:
        return None if res is None or not res.error else math.inf
    try:
        gap = res.get(period, "hybrid")["nse"] - res.get(period, "symbolic")["nse"]
    except KeyError:
        return None
    return gap if math.isfinite(gap) else math.inf


def _inspect_verdict(report, masks) -> str:
    """One paragraph: is the symbolic model within :data:`INSPECT_NSE_TOLERANCE` NSE of the hybrid?"""
    import math

    res = report.resimulation
    period = "test" if "test" in masks else (list(masks)[-1] if masks else "all")
    if res is None:
        return ""
    if res.error:
        return f"The symbolic model could not be re-simulated ({res.error}), so it cannot replace the hybrid."
    try:
        h, y = res.get(period, "hybrid")["nse"], res.get(period, "symbolic")["nse"]
    except KeyError:
        return ""
    if not (math.isfinite(h) and math.isfinite(y)):
        return f"No finite NSE on the {period} period (hybrid {h}, symbolic {y})."
    diff = h - y
    tol = INSPECT_NSE_TOLERANCE
    recal = ""
    try:
        z = res.get(period, "recalibrated")["nse"]
        recal = (f" With its constants recalibrated through the ODE on the training period the symbolic "
                 f"model reaches NSE {z:.3f} on the {period} period (difference {h - z:+.3f}, "
                 f"{'within' if h - z <= tol else 'not within'} {tol}).")
    except KeyError:
        pass
    if diff <= tol:
        return (f"On the {period} period the symbolic model reaches NSE {y:.3f} against the hybrid's {h:.3f} "
                f"(difference {diff:+.3f}): within {tol} NSE, so the chosen expressions reproduce the networks' "
                f"effect on discharge." + recal)
    worst = min(report.fluxes.values(), key=lambda fi: fi.chosen.r2)
    unused = []
    for fi in report.fluxes.values():
        used = set(fi.chosen.inputs)
        drop = [k for k in fi.samples.bounds() if k not in used]
        if drop:
            unused.append(f"`{fi.flux}` ignores the network input(s) {', '.join(drop)}")
    why = (f" The expressions are fitted to the network outputs pointwise; the least faithful is `{worst.flux}` "
           f"(R2 {worst.chosen.r2:.4f}, RMSE {worst.chosen.rmse:.3g} {worst.samples.output_units}), and a "
           f"systematic flux error accumulates through the stores over the years of re-simulation.")
    if unused:
        why += " " + "; ".join(unused) + ": the part of the network's response that depends on them is lost."
    return (f"On the {period} period the symbolic model reaches NSE {y:.3f} against the hybrid's {h:.3f} "
            f"(difference {diff:+.3f}): NOT within {tol} NSE, so the networks cannot be replaced by these "
            f"expressions without loss.{why} Remedies: a candidate with more terms from the tables above, or "
            f"`--recalibrate` (refits the constants through the ODE on the training period)." + recal)


_COMMANDS = {
    "train": _cmd_train,
    "resume": _cmd_resume,
    "evaluate": _cmd_evaluate,
    "simulate": _cmd_simulate,
    "inspect": _cmd_inspect,
}


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    from .data import DataError
    from .forcing import ForcingError
    from .model import ModelError
    from .runs import RunInterrupted
    from .solve import SolverError

    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # --help, --version or a usage error (argparse printed it)
        return int(e.code) if isinstance(e.code, int) else 2
    quiet = getattr(args, "quiet", False)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    expected = (ValueError, DataError, ForcingError, ModelError, SolverError, FileNotFoundError,
                FloatingPointError, PermissionError, IsADirectoryError, NotADirectoryError)
    import torch

    threads = torch.get_num_threads()
    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        return _COMMANDS[args.command](args, log)
    except RunInterrupted as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except expected as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # python -m adjointhydro.cli
    sys.exit(main())
