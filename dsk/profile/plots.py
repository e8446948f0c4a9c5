"""PNG plots of a ``dsk profile`` report: expert load per layer, time by component, the executed pipeline schedule.

matplotlib is the optional extra ``dsk[profile]``, imported inside each function, so importing this module (and
``dsk profile`` without the extra) costs nothing; without it each function raises an ``ImportError`` that says how
to install it, which the command turns into a notice. The figures are ``matplotlib.figure.Figure`` objects drawn on
the Agg canvas directly, never through ``pyplot``: no global figure registry to leak into, no GUI backend chosen,
nothing to close. Sizes grow with the rows drawn; 120 dpi.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ExpertLoadRatios", "component_times", "expert_load_heatmap", "expert_load_ratios", "pipeline_timeline"]

DPI = 120
_INSTALL = "matplotlib is not installed, so no plots: pip install 'dsk[profile]'"
_KIND_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868", "I": "#9e9e9e"}
_KIND_NAMES = {"F": "forward", "B": "backward", "W": "weight grad", "I": "idle"}
_OTHER_COLOURS = ("#c44e52", "#8172b3", "#937860", "#da8bc3", "#ccb974", "#64b5cd")


def _figure(width: float, height: float) -> Any:
    """A Figure on the Agg canvas (constrained layout), or the ImportError that names the extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    del matplotlib  # imported first so that a blocked top-level package fails here, not half-way into a submodule
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    fig.clear()  # drop the artists now rather than whenever the last reference goes
    return path


# -- expert load -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertLoadRatios:
    """Per-layer expert load relative to the layer's mean, as the heatmap draws it.

    Attributes:
        layers: the layer names, in the order given (the heatmap's rows, top to bottom).
        ratios: one row per layer, ``load / mean load`` per expert (1.0 = balanced), padded with NaN to the widest
            layer's expert count; a layer that routed no token is all NaN.
        maxvio: per layer, ``max load / mean load - 1`` (the DeepSeek-V3 report's MaxVio; NaN for an empty layer), of
            the load given: over the steps summed, that is at most the mean of the steps' own MaxVio.
    """

    layers: list[str]
    ratios: list[list[float]]
    maxvio: list[float]


def expert_load_ratios(loads: Mapping[str, Sequence[float]]) -> ExpertLoadRatios:
    """``load / mean`` per expert and MaxVio per layer, from per-expert token counts (or fractions) per layer."""
    if not loads:
        raise ValueError("expert load: no layer to draw")
    width = max(len(v) for v in loads.values())
    ratios, maxvio = [], []
    for name, row in loads.items():
        values = [float(v) for v in row]
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"expert load of {name!r}: want finite counts >= 0, got {list(row)!r}")
        mean = sum(values) / len(values)
        scaled = [v / mean for v in values] if mean > 0 else [math.nan] * len(values)
        ratios.append(scaled + [math.nan] * (width - len(values)))
        maxvio.append(max(scaled) - 1.0 if mean > 0 else math.nan)
    return ExpertLoadRatios(list(loads), ratios, maxvio)


def expert_load_heatmap(loads: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    """Draw a layer x expert heatmap of ``load / mean load`` with each row's MaxVio at the right; returns ``path``.

    Args:
        loads: layer name (``"layers.1"``, ``"mtp.0"``) to that layer's per-expert token counts over the measured
            steps. Layers with fewer experts are padded (drawn grey).
        path: the PNG to write (its folder is created).
        title: the figure's title.
    """
    r = expert_load_ratios(loads)
    fig = _figure(*_heatmap_size(len(r.layers), len(r.ratios[0])))
    _draw_heatmap(fig, r, title)
    return _save(fig, path)


def _heatmap_size(rows: int, experts: int) -> tuple[float, float]:
    return min(4.0 + 0.22 * experts, 14.0), min(2.2 + 0.3 * rows, 30.0)


def _draw_heatmap(fig: Any, r: ExpertLoadRatios, title: str) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    data = np.ma.masked_invalid(np.asarray(r.ratios, dtype=float))
    top = float(data.max()) if data.count() else 2.0
    cmap = colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")  # padding, or a layer that routed nothing
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(top, 1.0 + 1e-6, 2.0))
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    n_rows, n_experts = data.shape
    ax.set_yticks(range(n_rows), r.layers, fontsize=9 if n_rows <= 24 else 7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(n_experts, 16), integer=True))
    ax.set_xlim(-0.5, n_experts - 0.5)
    ax.set_xlabel("expert")
    ax.set_title(title)
    # MaxVio at the right of each row, as a second y axis so that the layout leaves room for it
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(n_rows), ["-" if math.isnan(v) else f"{v:.3f}" for v in r.maxvio])
    right.tick_params(labelsize=9 if n_rows <= 24 else 7, length=0)
    right.set_ylabel("MaxVio of this load\n(max / mean - 1)", fontsize=9)
    fig.colorbar(im, ax=ax, pad=0.02, fraction=0.05).set_label("load / mean load\n(1.0 = balanced)", fontsize=9)


# -- time by component -----------------------------------------------------------------------------------------------
def component_times(rows: Mapping[str, Mapping[str, float]], path: Path, title: str) -> Path:
    """Draw horizontal bars of the seconds per step of each component; returns ``path``.

    Args:
        rows: recipe label to ``{component: seconds per step}``. With several recipes the bars are grouped by
            component, one colour per recipe, so the recipes compare side by side; a component a recipe lacks has
            no bar there. Components are sorted by their largest time, the largest on top.
        path: the PNG to write (its folder is created).
        title: the figure's title.
    """
    if not rows or not any(rows.values()):
        raise ValueError("component times: nothing to draw")
    names: dict[str, float] = {}
    for comps in rows.values():
        for name, s in comps.items():
            names[name] = max(names.get(name, -math.inf), float(s))
    order = sorted(names, key=lambda k: -names[k])
    biggest = max(abs(v) for comps in rows.values() for v in comps.values()) or 1.0
    scale, unit = (1e3, "ms") if biggest < 1.0 else (1.0, "s")
    labels = list(rows)
    k = len(labels)
    fig = _figure(8.0, min(1.2 + len(order) * (0.2 + 0.2 * k), 30.0))
    ax = fig.add_subplot()
    height = 0.8 / k
    colours = _cycle()
    for j, label in enumerate(labels):
        comps = rows[label]
        ys = [i - 0.4 + height * (j + 0.5) for i, name in enumerate(order) if name in comps]
        xs = [float(comps[name]) * scale for name in order if name in comps]
        bars = ax.barh(ys, xs, height=height * 0.92, color=colours[j % len(colours)], label=label)
        ax.bar_label(bars, [_fmt(x) for x in xs], padding=2, fontsize=8 if k == 1 else 7)
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(len(order) - 0.5, -0.5)  # the first (largest) component on top
    ax.set_xlabel(f"{unit} per step")
    ax.margins(x=0.12)  # room for the value labels
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title)
    if k > 1:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _cycle() -> list[str]:
    from matplotlib import rcParams

    return [c["color"] for c in rcParams["axes.prop_cycle"]]


def _tint(colour: str) -> tuple[float, ...]:
    """``colour`` mixed halfway with white."""
    from matplotlib.colors import to_rgb

    return tuple(0.5 + 0.5 * c for c in to_rgb(colour))


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


# -- pipeline timeline -----------------------------------------------------------------------------------------------
def pipeline_timeline(
    timeline: Sequence[Mapping[str, Any]], path: Path, title: str, bubble: Sequence[float] | None = None
) -> Path:
    """Draw a Gantt chart of an executed pipeline schedule, one row per rank; returns ``path``.

    Args:
        timeline: one item per executed action: ``{"rank", "kind", "stage", "chunk", "start", "end"}``, times in
            seconds. A box per action, coloured by kind (F forward, B backward, W weight gradients, I idle, others
            in further colours), with the chunk number written in it where it fits; on a rank that holds several
            stages (DualPipe's two), the actions of its later stages are drawn in a lighter tint.
        path: the PNG to write (its folder is created).
        title: the figure's title.
        bubble: the idle fraction of each rank (indexed by rank), written under the rank's label.
    """
    if not timeline:
        raise ValueError("pipeline timeline: no action to draw")
    items = []
    for i, it in enumerate(timeline):
        try:
            items.append((int(it["rank"]), str(it["kind"]), int(it["stage"]), it["chunk"], float(it["start"]),
                          float(it["end"])))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"pipeline timeline item {i}: want rank, kind, stage, chunk, start, end; got {it!r}"
            ) from exc
    ranks = sorted({it[0] for it in items})
    row = {rank: i for i, rank in enumerate(ranks)}
    t0 = min(it[4] for it in items)
    span = max(it[5] for it in items) - t0 or 1.0
    scale, unit = (1e3, "ms") if span < 1.0 else (1.0, "s")
    stages = {rank: sorted({it[2] for it in items if it[0] == rank}) for rank in ranks}
    kinds = list(dict.fromkeys(it[1] for it in items))
    colour = dict(_KIND_COLOURS)
    for i, kind in enumerate(k for k in kinds if k not in colour):
        colour[kind] = _OTHER_COLOURS[i % len(_OTHER_COLOURS)]

    width = 12.0
    fig = _figure(width, min(1.5 + 0.55 * len(ranks), 30.0))
    ax = fig.add_subplot()
    box_px = (width - 1.8) * DPI / (span * scale)  # pixels per plotted unit, about (the axes' share of the width)
    boxes: dict[tuple[int, str, bool], list[tuple[float, float]]] = {}
    for rank, kind, stage, chunk, start, end in items:
        x, w = (start - t0) * scale, (end - start) * scale
        later = stages[rank].index(stage) > 0
        boxes.setdefault((row[rank], kind, later), []).append((x, w))
        text = str(chunk)
        if w * box_px >= 7 * len(text) + 4:
            ax.text(x + w / 2, row[rank], text, ha="center", va="center", fontsize=7,
                    color="black" if later else "white")  # fmt: skip
    for (y, kind, later), spans in boxes.items():  # one collection per row and colour, not an artist per action
        fill = _tint(colour[kind]) if later else colour[kind]
        ax.broken_barh(spans, (y - 0.36, 0.72), facecolors=fill, edgecolors="white", linewidth=0.5)
    idle = {r: float(b) for r, b in enumerate(bubble or []) if isinstance(b, (int, float)) and math.isfinite(b)}
    labels = [f"rank {r}" + (f"\nidle {idle[r]:.0%}" if r in idle else "") for r in ranks]
    ax.set_yticks(range(len(ranks)), labels, fontsize=9)
    ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlim(0, span * scale * 1.01)
    ax.set_xlabel(f"{unit} from the first action")
    ax.set_title(title)
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[k], label=_KIND_NAMES.get(k, k)) for k in kinds]
    if any(len(s) > 1 for s in stages.values()):
        handles += [
            Patch(color=_tint(colour[k]), label=f"{_KIND_NAMES.get(k, k)}, a rank's later stage") for k in kinds
        ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(kinds), fontsize=8, frameon=False)
    return _save(fig, path)
