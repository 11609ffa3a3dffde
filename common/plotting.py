"""Figure registry: experiments register functions that draw one figure from the results table.

    # exp_tor/figures.py
    from common.plotting import register_figure

    @register_figure("tor_vs_interval", experiment="exp_tor")
    def tor_vs_interval(df):            # df = rows of results.csv for this experiment (params expanded)
        fig, ax = plt.subplots()
        ...
        return fig                      # or None when the rows it needs are absent

``results/make_figures.py`` imports every ``exp_*/figures.py``, calls each registered function with the
experiment's rows and saves ``results/figures/<experiment>/<name>.png``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display

FIGURES: dict[str, FigureSpec] = {}


@dataclass(frozen=True)
class FigureSpec:
    name: str
    experiment: str
    func: Callable


def register_figure(name: str, experiment: str) -> Callable[[Callable], Callable]:
    def deco(func: Callable) -> Callable:
        key = f"{experiment}/{name}"
        if key in FIGURES and FIGURES[key].func.__qualname__ != func.__qualname__:
            raise ValueError(f"figure {key} registered twice ({FIGURES[key].func.__qualname__}, "
                             f"{func.__qualname__})")
        FIGURES[key] = FigureSpec(name, experiment, func)
        return func
    return deco


def style() -> None:
    """One house style for every figure."""
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "axes.grid": True, "grid.alpha": 0.3,
                         "font.size": 9, "legend.fontsize": 8, "figure.autolayout": True})
