"""The Memory Statistics page's miss curve chart: the predicted miss rate of
every pool size 1..8, from the latest window of manager.curves.

The pool's size now is marked, minMiss and maxMiss are dashed lines as on
the miss rate chart (manager.charts), and a caption says which window the
curve comes from. Drawn by manager.chartsvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC

from manager.chartsvg import PERCENT, Chart, Marks, MissThresholds, percent, render
from manager.curves import CurveWindow
from manager.settings import policy_label

CURVE_TITLE = "Predicted miss rate by pool size (%)"
CURVE_X_TITLE = "Nodes in the pool"
NO_PREDICTION = "No prediction yet"
_CURVE = replace(PERCENT, title=CURVE_TITLE, thresholds=True)


def render_curve(
    window: CurveWindow,
    sizes: Sequence[int],
    current_size: int,
    *,
    thresholds: MissThresholds | None = None,
) -> Chart:
    """The miss curve: ``window``'s predicted miss rate (%) for each pool size of ``sizes``.

    The point of ``current_size`` is drawn apart and a vertical line marks
    it; ``thresholds`` are dashed lines as on the miss rate chart. Without a
    sampled lookup in the window there is no point at all ("No prediction
    yet", the caption says why): a prediction from no sample would be made up.
    """
    labels = [str(size) for size in sizes]
    predicted = window.predicted_miss if window.sampled_lookups else [None] * len(sizes)
    values = [percent(ratio) for ratio in predicted]
    current_label = str(current_size) if current_size in sizes else None
    current = None
    if current_label is not None:
        index = labels.index(current_label)
        position = 0.5 if len(labels) == 1 else index / (len(labels) - 1)
        current = (position, f"The pool has {_nodes(current_size)} now")

    def title(label: str, value: str) -> str:
        now = " (the pool's size now)" if label == current_label else ""
        return f"{_nodes(int(label))}{now}: {value}"

    marks = Marks(
        point_title=title,
        thresholds=[] if thresholds is None else thresholds.marks(),
        current=current,
        current_label=current_label,
    )
    svg = render(
        _CURVE, labels, labels, values, marks, x_title=CURVE_X_TITLE, no_data_text=NO_PREDICTION
    )
    return Chart(CURVE_TITLE, svg, caption=curve_caption(window))


def curve_caption(window: CurveWindow) -> str:
    """Which window the curve comes from: complete or not, when it began (UTC)
    and how long it lasted, its sampled lookups and the pool simulated."""
    pool = f"{window.capacity_mb:g} MB per node, {policy_label(window.policy)}"
    began = f"{window.started.astimezone(UTC):%H:%M:%S} UTC"
    if window.complete:
        which = f"the last complete window (from {began}, {window.seconds:.0f} s)"
    else:
        which = f"the current window, still partial (from {began}, {window.seconds:.0f} s so far)"
    if not window.sampled_lookups:
        return f"{NO_PREDICTION}: no lookup was sampled in {which}; {pool}."
    return (
        f"Predicted from {which}: {window.sampled_lookups:,} sampled of "
        f"{window.lookups:,} lookups; {pool}."
    )


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"
