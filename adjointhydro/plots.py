"""Figures of a run (matplotlib, Agg backend: no display needed).

* :func:`hydrograph` -- observed discharge against one or more simulations over a period.
* :func:`training_curves` -- calibration loss, pretraining loss and hybrid train/validation loss.
* :func:`flux_comparison` -- each network flux against the physics flux it replaced,
  both evaluated at the states the hybrid visits, plotted over a store.

Every function writes one PNG and returns its path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["hydrograph", "training_curves", "flux_comparison", "flux_rates_at_states"]

_COLOURS = {"observed": "black", "M0": "tab:blue", "hybrid": "tab:red"}


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def hydrograph(
    path: str | os.PathLike,
    dates: np.ndarray,
    observed: np.ndarray,
    simulated: Mapping[str, np.ndarray],
    *,
    title: str = "",
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    units: str = "mm/day",
) -> Path:
    """Observed against simulated discharge ``[time]``; ``metrics`` label -> {nse, kge} go in the legend."""
    dates = np.asarray(dates).astype("datetime64[D]")
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.plot(dates, observed, color="black", lw=1.0, label="observed")
    for i, (label, sim) in enumerate(simulated.items()):
        text = label
        if metrics and label in metrics:
            m = metrics[label]
            parts = [f"{k.upper()} {m[k]:.3f}" for k in ("nse", "kge") if m.get(k) is not None and np.isfinite(m[k])]
            if parts:
                text = f"{label} ({', '.join(parts)})"
        ax.plot(dates, sim, lw=1.0, color=_COLOURS.get(label, f"C{i + 1}"), alpha=0.85, label=text)
    ax.set_ylabel(f"discharge ({units})")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _save(fig, path)


def training_curves(
    path: str | os.PathLike,
    *,
    calibration: Sequence[Mapping] | None = None,
    pretraining: Mapping[str, Sequence[float]] | None = None,
    training: Sequence[Mapping] | None = None,
    best_epoch: int | None = None,
    loss: str = "loss",
) -> Path:
    """Loss curves of the stages of a run (each optional)."""
    panels = [p for p in (("calibration (M0)", calibration), ("pretraining", pretraining),
                          ("hybrid training", training)) if p[1]]
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no training history", ha="center", va="center")
    for ax, (title, data) in zip(axes[0], panels):
        if title.startswith("calibration"):
            x = [h.get("iteration", i) for i, h in enumerate(data)]
            for key in ("loss", "best_loss", "mean_loss"):
                ys = [h.get(key) for h in data]
                if any(y is not None for y in ys):
                    ax.plot(x, [np.nan if y is None else y for y in ys], label=key)
            ax.set_xlabel("iteration")
        elif title == "pretraining":
            for name, ys in data.items():
                ax.plot(np.arange(1, len(ys) + 1), ys, label=name)
            ax.set_xlabel("epoch")
            ax.set_yscale("log")
        else:
            x = [h.get("epoch", i + 1) for i, h in enumerate(data)]
            for key in ("train_loss", "val_loss"):
                ys = [h.get(key) for h in data]
                if any(y is not None for y in ys):
                    ax.plot(x, [np.nan if y is None else y for y in ys], marker=".", label=key)
            if best_epoch is not None:
                ax.axvline(best_epoch, color="grey", ls="--", lw=0.8, label=f"best epoch {best_epoch}")
            ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_ylabel(loss)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def flux_rates_at_states(model, stores: torch.Tensor, forcing: torch.Tensor, forcing_names: Sequence[str],
                         parameters: torch.Tensor) -> np.ndarray:
    """Rates of every flux of ``model`` ``[rows, m]`` at stores ``[rows, n]``, forcing ``[rows, V]``.

    ``forcing_names`` name the columns of ``forcing``; ``parameters`` ``[rows or 1, P]``.
    """
    from .fluxes import Vars

    dtype = stores.dtype
    with torch.no_grad():
        idx = [list(forcing_names).index(n) for n in model.forcing_names]
        fv = Vars(zip(model.forcing_names, forcing[:, idx].to(dtype).unbind(-1)))
        p = parameters.to(dtype).expand(stores.shape[0], -1)
        pv = Vars(zip(model.parameter_names, p.unbind(-1)))
        return model.fluxes(stores, fv, pv).cpu().numpy()


def flux_comparison(
    path: str | os.PathLike,
    hybrid,
    physics,
    stores: torch.Tensor,
    forcing: torch.Tensor,
    forcing_names: Sequence[str],
    hybrid_parameters: torch.Tensor,
    physics_parameters: torch.Tensor,
    flux_names: Sequence[str],
    *,
    title: str = "",
    max_points: int = 4000,
    seed: int = 0,
) -> Path:
    """Network fluxes of ``hybrid`` against ``physics``'s fluxes of the same name, over a store.

    Both are evaluated at the same visited states: ``stores`` ``[rows, n]`` (the hybrid's
    stores at the start of each day) with that day's ``forcing`` ``[rows, V]``. Each
    panel is a scatter of the rate (y) against the store the flux leaves (or enters).
    """
    rows = stores.shape[0]
    if rows > max_points:
        pick = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
        stores, forcing = stores[pick], forcing[pick]
        if hybrid_parameters.shape[0] == rows:
            hybrid_parameters = hybrid_parameters[pick]
        if physics_parameters.shape[0] == rows:
            physics_parameters = physics_parameters[pick]
    rate_h = flux_rates_at_states(hybrid, stores, forcing, forcing_names, hybrid_parameters)
    rate_p = flux_rates_at_states(physics, stores.to(torch.float64), forcing, forcing_names, physics_parameters)
    wiring = {n: (s, t) for n, s, t in hybrid.wiring}
    n = len(flux_names)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5 * max(n, 1), 4), squeeze=False)
    units = dict(zip(hybrid.flux_names, hybrid.flux_units()))
    for ax, name in zip(axes[0], flux_names):
        src, tgt = wiring[name]
        store = src or tgt
        x = stores[:, hybrid.store_names.index(store)].numpy()
        ax.scatter(x, rate_p[:, physics.flux_names.index(name)], s=4, alpha=0.4, color="tab:blue",
                   label=f"physics (M0) {name}", rasterized=True)
        ax.scatter(x, rate_h[:, hybrid.flux_names.index(name)], s=4, alpha=0.4, color="tab:red",
                   label=f"network {name}", rasterized=True)
        ax.set_xlabel(f"{store} ({hybrid.stores[hybrid.store_names.index(store)].units})")
        ax.set_ylabel(f"{name} ({units.get(name, '')})")
        ax.set_title(f"{name}: {src or 'outside'} -> {tgt or 'outside'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, markerscale=3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
