"""The run report's four plots, drawn with matplotlib from metrics.jsonl rows: accuracy against
time and against bytes sent, ε against time, and session outcomes per peer.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the report is built on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from sim.metrics import MetricsRow, last_row_per_peer, peer_sort_key
from sim.report_summary import baseline_label
from sim.scenario import Scenario

PLOT_FILES = {
    "accuracy_time": "accuracy_vs_time.png",
    "accuracy_bytes": "accuracy_vs_bytes.png",
    "epsilon_time": "epsilon_vs_time.png",
    "sessions": "session_outcomes.png",
}
# Per-peer lines are drawn faintly; the mean across peers is the line a reader should follow.
_PEER_LINE = {"linewidth": 0.9, "alpha": 0.45}
_MEAN_COLOR = "#111111"
_BASELINE_STYLES = {
    "centralized": {"color": "#2a7f3f", "linestyle": "--"},
    "standalone": {"color": "#b5541c", "linestyle": ":"},
    "centralized_dp": {"color": "#6a3d9a", "linestyle": "--"},
    "standalone_dp": {"color": "#b5541c", "linestyle": "-."},
}
_MAX_LEGEND_PEERS = 10


# -- series helpers --------------------------------------------------------------------------------


def _series(
    rows: Sequence[MetricsRow], x: str, y: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per peer: (x values, y values) sorted by time, only rows where y is measured."""
    by_peer: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        value = getattr(row, y)
        if value is None:
            continue
        by_peer.setdefault(row.peer, []).append((row.t, float(getattr(row, x)), float(value)))
    out = {}
    for peer in sorted(by_peer, key=peer_sort_key):
        points = sorted(by_peer[peer])
        out[peer] = (np.array([p[1] for p in points]), np.array([p[2] for p in points]))
    return out


def mean_curve(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]], points: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over peers of each peer's last known value (step function) on a shared x grid.

    A peer counts from its first measurement on, so late joiners do not drag the mean to zero.
    """
    if not series:
        return np.empty(0), np.empty(0)
    lo = min(float(xs[0]) for xs, _ in series.values())
    hi = max(float(xs[-1]) for xs, _ in series.values())
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([lo])
    stacked = np.full((len(series), grid.size), np.nan)
    for i, (xs, ys) in enumerate(series.values()):
        position = np.searchsorted(xs, grid, side="right") - 1
        valid = position >= 0
        stacked[i, valid] = ys[position[valid]]
    counts = np.sum(~np.isnan(stacked), axis=0)
    sums = np.nansum(stacked, axis=0)
    mean = np.divide(sums, counts, out=np.full(grid.size, np.nan), where=counts > 0)
    return grid, mean


# -- plots -----------------------------------------------------------------------------------------


def _new_figure() -> tuple[Figure, Any]:
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=110)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")


def _baseline_lines(ax: Any, baselines: Mapping[str, Mapping[str, Any]]) -> None:
    for name, result in baselines.items():
        accuracy = result.get("accuracy")
        if not isinstance(accuracy, int | float):
            continue
        style = _BASELINE_STYLES.get(name, {"color": "#555555", "linestyle": "-."})
        label = f"{baseline_label(name, result)}, test set ({accuracy:.1%})"
        ax.axhline(accuracy, linewidth=1.4, label=label, **style)


def _peer_lines(ax: Any, series: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    label_peers = len(series) <= _MAX_LEGEND_PEERS
    for i, (peer, (xs, ys)) in enumerate(series.items()):
        ax.plot(
            xs,
            ys,
            drawstyle="steps-post",
            color=plt.get_cmap("tab10")(i % 10),
            label=peer if label_peers else ("peers" if i == 0 else None),
            **_PEER_LINE,
        )


def _plot_metric(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    hline: tuple[float, str] | None = None,
    percent: bool = False,
) -> Figure:
    fig, ax = _new_figure()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if not series:
        _no_data(ax, "no measurements in metrics.jsonl")
    else:
        _peer_lines(ax, series)
        grid, mean = mean_curve(series)
        ax.plot(grid, mean, color=_MEAN_COLOR, linewidth=2.4, label="mean over peers")
    if baselines:
        _baseline_lines(ax, baselines)
    if hline is not None:
        ax.axhline(hline[0], color="#c0392b", linestyle="--", linewidth=1.4, label=hline[1])
    if percent:
        ax.set_ylim(0, 1.02)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", ncol=2 if len(series) > 5 else 1)
    fig.tight_layout()
    return fig


def _plot_sessions(rows: Sequence[MetricsRow]) -> Figure:
    finals = last_row_per_peer(list(rows))
    fig, ax = _new_figure()
    ax.set_title("Aggregation sessions and invitations per peer")
    ax.set_ylabel("sessions / invitations")
    if not finals:
        _no_data(ax, "no peers in metrics.jsonl")
    else:
        peers = list(finals)
        x = np.arange(len(peers))
        done = [finals[p].sessions_done for p in peers]
        aborted = [finals[p].sessions_aborted for p in peers]
        not_formed = [finals[p].sessions_not_formed for p in peers]
        ax.bar(x, done, color="#2a7f3f", label="sessions completed")
        ax.bar(x, aborted, bottom=done, color="#c0392b", label="sessions aborted")
        # Not a session at all: drawn apart (pale, hatched) so it never reads as an abort.
        ax.bar(x, not_formed, bottom=np.add(done, aborted), color="#d9d9d9", hatch="//",
               edgecolor="#7f7f7f", label="invitations not formed")
        rotate = len(peers) > 8
        ax.set_xticks(x, peers, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                      fontsize=8)
        # Headroom above the tallest bar so the legend never covers one.
        tallest = max(d + a + n for d, a, n in zip(done, aborted, not_formed, strict=True))
        ax.set_ylim(0, max(1, tallest) * 1.25)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


def build_plots(
    rows: Sequence[MetricsRow],
    baselines: Mapping[str, Mapping[str, Any]],
    scenario: Scenario,
) -> dict[str, Figure]:
    """The report's four figures, keyed like PLOT_FILES."""
    accuracy_by_time = _series(rows, "t", "accuracy")
    accuracy_by_bytes = {
        peer: (xs / 1e6, ys) for peer, (xs, ys) in _series(rows, "bytes_sent", "accuracy").items()
    }
    epsilon_by_time = _series(rows, "t", "epsilon")
    target = (
        (scenario.target_epsilon, f"target ε = {scenario.target_epsilon:g}")
        if scenario.dp and scenario.target_epsilon is not None
        else None
    )
    return {
        "accuracy_time": _plot_metric(
            accuracy_by_time,
            title="Accuracy on each peer's hold-out over time",
            xlabel="time since start (s)",
            ylabel="accuracy",
            baselines=baselines,
            percent=True,
        ),
        "accuracy_bytes": _plot_metric(
            accuracy_by_bytes,
            title="Accuracy against bytes each peer sent",
            xlabel="bytes sent by the peer (MB)",
            ylabel="accuracy",
            baselines=baselines,
            percent=True,
        ),
        "epsilon_time": _plot_metric(
            epsilon_by_time,
            title="Privacy budget spent (ε) over time" if scenario.dp else "DP is off in this run",
            xlabel="time since start (s)",
            ylabel="ε spent",
            hline=target,
        ),
        "sessions": _plot_sessions(rows),
    }


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
