"""Figure registry: experiments register functions that draw one figure from the results table.

    # exp_tor/figures.py
    from common.plotting import register_figure

    @register_figure("tor_vs_interval", experiment="exp_tor", sources=("tor_vs_interval",),
                     title="TOR vs checkpoint interval")
    def tor_vs_interval(df):            # df = the experiment's latest rows of results.csv (params expanded)
        fig, ax = plt.subplots()
        ...
        return fig                      # or None when the rows it needs are absent

``results/make_figures.py`` imports every ``exp_*/figures.py``, calls each registered function with the
experiment's rows, saves ``results/figures/<experiment>/<name>.png`` and links it from
``results/REPORT.md`` (``common.report``). ``sources`` names the results tables the figure is drawn from
(the report cites their runs, commits and devices); ``deck`` names the slide-deck item(s) it reproduces
(keys of ``common.report.DECK``). Tables for the report are registered the same way with
``common.report.register_table``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display

FIGURES: dict[str, FigureSpec] = {}


def as_tuple(x: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``None`` -> (), ``"a"`` -> ("a",), a sequence -> tuple (registries accept either spelling)."""
    if x is None:
        return ()
    return (x,) if isinstance(x, str) else tuple(x)


@dataclass(frozen=True)
class FigureSpec:
    name: str
    experiment: str
    func: Callable
    sources: tuple[str, ...] = ()   # results tables it reads; () = every table of the experiment
    deck: tuple[str, ...] = ()      # slide-deck items it reproduces (common.report.DECK keys)
    title: str = ""

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.name}"


def register_figure(name: str, experiment: str, sources: str | tuple[str, ...] | None = None,
                    deck: str | tuple[str, ...] | None = None, title: str | None = None
                    ) -> Callable[[Callable], Callable]:
    def deco(func: Callable) -> Callable:
        key = f"{experiment}/{name}"
        if key in FIGURES and FIGURES[key].func.__qualname__ != func.__qualname__:
            raise ValueError(f"figure {key} registered twice ({FIGURES[key].func.__qualname__}, "
                             f"{func.__qualname__})")
        doc = (func.__doc__ or "").strip().splitlines()
        FIGURES[key] = FigureSpec(name, experiment, func, as_tuple(sources), as_tuple(deck),
                                  title or (doc[0] if doc else name.replace("_", " ")))
        return func
    return deco


def style() -> None:
    """One house style for every figure."""
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "axes.grid": True, "grid.alpha": 0.3,
                         "font.size": 9, "legend.fontsize": 8, "figure.autolayout": True})
