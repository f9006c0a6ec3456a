"""The run report: run_dir/report.html with PNG plots, built from metrics.jsonl.

The HTML is self-contained (plots inlined as base64 PNG; the same PNGs are also written next
to it for reuse in slides or docs). It states the scenario, the headline numbers, four plots
(accuracy against time and against bytes sent, ε against time, session outcomes per peer), a
table against the centralized and standalone baselines (without DP, and with DP at the same ε
when the run used DP), and dropped messages by reason.

The report reads only counters and scores from metrics.jsonl; it never sees model data. Every
string from the run (peer ids, drop reasons, scenario values) is HTML-escaped. The broker
password is redacted by `scenario_summary`.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the report is built on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from peer.files import atomic_write_bytes
from sim.metrics import (
    MetricsRow,
    last_row_per_peer,
    peer_sort_key,
    read_metrics_file,
    row_event,
)
from sim.scenario import Scenario, scenario_summary

REPORT_FILE = "report.html"
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


@dataclass(frozen=True)
class RunSummary:
    """Headline numbers of a run, from each peer's last metrics row.

    sessions_aborted counts sessions that failed after their group was fixed;
    sessions_not_formed counts invitations that never became a session (nobody accepted in
    time, all declined, yielded). Both are summed over peers, so one failed session counts once
    per member that saw it. `events` counts rows by event, naming the two apart likewise.
    """

    peers: int
    duration_s: float
    mean_accuracy: float | None
    min_accuracy: float | None
    max_accuracy: float | None
    accuracy_source: str  # "test set" or "local hold-out"
    sessions_done: int
    sessions_aborted: int
    max_epsilon: float | None
    mean_bytes_sent: float
    drops: dict[str, int]
    events: dict[str, int]
    skipped_lines: int = 0
    sessions_not_formed: int = 0


def _final_accuracy(row: MetricsRow) -> tuple[float | None, str]:
    test = row.extra.get("test_accuracy") if row.extra else None
    if isinstance(test, int | float) and not isinstance(test, bool) and 0 <= test <= 1:
        return float(test), "test set"
    return row.accuracy, "local hold-out"


def _last_accuracy_per_peer(rows: Sequence[MetricsRow]) -> dict[str, tuple[float, str]]:
    """Each peer's most recent accuracy (a final row may carry none, e.g. a churn 'leave')."""
    found: dict[str, tuple[float, str]] = {}
    for row in sorted(rows, key=lambda r: r.t):
        value, source = _final_accuracy(row)
        if value is not None:
            found[row.peer] = (value, source)
    return found


def summarize(rows: Sequence[MetricsRow], skipped_lines: int = 0) -> RunSummary:
    """Aggregate the final state of every peer (sessions summed, ε max, accuracy mean)."""
    finals = last_row_per_peer(list(rows))
    accuracies = _last_accuracy_per_peer(rows)
    values = [v for v, _ in accuracies.values()]
    sources = {s for _, s in accuracies.values()}
    drops: dict[str, int] = {}
    for row in finals.values():
        for reason, count in row.drops.items():
            drops[reason] = drops.get(reason, 0) + count
    epsilons = [r.epsilon for r in finals.values() if r.epsilon is not None]
    return RunSummary(
        peers=len(finals),
        duration_s=max((r.t for r in rows), default=0.0),
        mean_accuracy=float(np.mean(values)) if values else None,
        min_accuracy=min(values) if values else None,
        max_accuracy=max(values) if values else None,
        accuracy_source="test set" if sources == {"test set"} else "local hold-out",
        sessions_done=sum(r.sessions_done for r in finals.values()),
        sessions_aborted=sum(r.sessions_aborted for r in finals.values()),
        sessions_not_formed=sum(r.sessions_not_formed for r in finals.values()),
        max_epsilon=max(epsilons) if epsilons else None,
        mean_bytes_sent=float(np.mean([r.bytes_sent for r in finals.values()])) if finals else 0.0,
        drops=dict(sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))),
        events=dict(Counter(row_event(row.event, row.extra) for row in rows).most_common()),
        skipped_lines=skipped_lines,
    )


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
        label = f"{_baseline_label(name, result)}, test set ({accuracy:.1%})"
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


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    # Reports and plots are for sharing: world-readable, written like every other file.
    atomic_write_bytes(path, data, mode=0o644)


# -- HTML ------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _baseline_label(name: str, result: Mapping[str, Any]) -> str:
    """A baseline's display label ("each peer alone, DP eps=3"); its key if it has none."""
    label = result.get("label")
    return label if isinstance(label, str) and label else name


def _ordered(baselines: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """Known baselines first, the no-DP one before its DP twin; any others after, as given."""
    known = ("centralized", "centralized_dp", "standalone", "standalone_dp")
    first = [(k, baselines[k]) for k in known if k in baselines]
    return first + [(k, v) for k, v in baselines.items() if k not in known]


def _baseline_rows(
    summary: RunSummary, baselines: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, str, str, str]]:
    rows = [(
        "Murmur (this run)",
        _pct(summary.mean_accuracy),
        _pct(summary.min_accuracy),
        _pct(summary.max_accuracy),
        f"mean over {summary.peers} peers, {summary.accuracy_source}",
    )]
    for name, result in _ordered(baselines):
        accuracy = result.get("accuracy")
        description = str(result.get("description", ""))
        rows.append((
            _baseline_label(name, result),
            _pct(accuracy if isinstance(accuracy, int | float) else None),
            _pct(result.get("accuracy_min")),
            _pct(result.get("accuracy_max")),
            f"{description} [result.json: {name}]" if description else f"[result.json: {name}]",
        ))
    return rows


def _baseline_note(baselines: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """How to read the table when it has DP baselines (a paragraph, or nothing)."""
    if not any(key in baselines for key in ("centralized_dp", "standalone_dp")):
        return []
    return ["<p>All baselines use the same split and the peers' training sets. Each "
            "no-DP row against its DP row is what privacy costs; "
            "each peer alone with DP against this run is what gossip buys back at the "
            "same ε. The DP rows use Murmur's own DP-SGD trainer with the peers' recipe "
            "and real (secure) noise, so they vary from run to run.</p>"]


def _verdict(summary: RunSummary, baselines: Mapping[str, Mapping[str, Any]], s: Scenario) -> str:
    """One plain-language paragraph: did the network learn, and how does it compare."""
    if summary.mean_accuracy is None:
        return "No peer reported an accuracy: the run ended before the first evaluation."
    parts = [f"The {summary.peers} peers reached a mean accuracy of "
             f"{summary.mean_accuracy:.1%} ({summary.accuracy_source})"]
    standalone = baselines.get("standalone", {}).get("accuracy")
    centralized = baselines.get("centralized", {}).get("accuracy")
    if isinstance(standalone, int | float):
        delta = summary.mean_accuracy - standalone
        word = "above" if delta >= 0 else "below"
        parts.append(f"{abs(delta) * 100:.1f} points {word} training alone without DP")
    if isinstance(centralized, int | float):
        parts.append(f"against {centralized:.1%} if all data were pooled in one place "
                     "without DP")
    text = ", ".join(parts) + "."
    text += _dp_verdict(summary.mean_accuracy, baselines)
    total = summary.sessions_done + summary.sessions_aborted
    if total:
        text += (f" {summary.sessions_done} of {total} aggregation sessions completed "
                 f"({summary.sessions_done / total:.0%}).")
    if summary.sessions_not_formed:
        text += (f" {summary.sessions_not_formed} invitations never became a session "
                 "(too few peers accepted in time, or all declined; nothing was shared in them).")
    left, joined = summary.events.get("leave", 0), summary.events.get("join", 0)
    if left or joined:
        text += f" Churn: peers left {left} times and rejoined {joined} times."
    if s.dp and summary.max_epsilon is not None:
        text += f" The most any peer spent of its privacy budget was ε = {summary.max_epsilon:.2f}"
        if s.target_epsilon is not None:
            text += f" (target {s.target_epsilon:g})"
        text += "."
    return text


def _dp_verdict(mean_accuracy: float, baselines: Mapping[str, Mapping[str, Any]]) -> str:
    """What privacy costs and what gossip buys back, from the DP baselines (if any)."""
    alone = baselines.get("standalone_dp", {})
    pooled = baselines.get("centralized_dp", {})
    alone_accuracy, pooled_accuracy = alone.get("accuracy"), pooled.get("accuracy")
    sentences = []
    if isinstance(alone_accuracy, int | float):
        delta = mean_accuracy - alone_accuracy
        word = "above" if delta >= 0 else "below"
        sentences.append(f" With the same DP, each peer alone reaches {alone_accuracy:.1%}: "
                         f"gossip puts the network {abs(delta) * 100:.1f} points {word} that.")
    if isinstance(pooled_accuracy, int | float):
        epsilon = pooled.get("target_epsilon")
        at = f" at ε = {epsilon:g}" if isinstance(epsilon, int | float) else ""
        sentences.append(f" Murmur's DP-SGD on all data pooled{at} reaches "
                         f"{pooled_accuracy:.1%}.")
    return "".join(sentences)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1180px;color:#222;line-height:1.45;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1.2rem 0}
.card{border:1px solid #ddd;border-radius:8px;padding:.6rem 1rem;min-width:150px}
.card b{display:block;font-size:1.5rem}
.card span{color:#666;font-size:.85rem}
table{border-collapse:collapse;margin:.6rem 0 1.4rem} td,th{border:1px solid #ddd;
padding:.3rem .7rem;text-align:left} th{background:#f4f4f4}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:1rem}
.plots figure{margin:0} .plots img{width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9rem} .verdict{font-size:1.1rem;background:#f7f9fc;
border-left:4px solid #3b6fb6;padding:.6rem 1rem}
"""

_CAPTIONS = {
    "accuracy_time": "Thin lines: each peer's accuracy on its own hold-out data. Bold: the mean "
    "over peers. Dashed/dotted: baselines trained on the same split (test-set accuracy).",
    "accuracy_bytes": "What the accuracy cost in traffic: each peer's accuracy against the bytes "
    "it had sent (sealed shares, announcements and protocol messages).",
    "epsilon_time": "Differential-privacy budget each peer has spent (ε, at the stated δ). "
    "A peer stops sharing once its budget is spent.",
    "sessions": "Secure-aggregation sessions each peer took part in: completed (its model "
    "merged the group's sum) and aborted after the group was fixed (timeout or dropout; "
    "nothing was revealed). Hatched on top: invitations that never became a session (too few "
    "peers accepted in time, or all declined); no share was sent in them.",
}


def render_html(
    scenario: Scenario,
    summary: RunSummary,
    baselines: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, bytes],
    *,
    title: str = "Murmur simulation report",
) -> str:
    """The report page; images are PNG bytes keyed like PLOT_FILES (inlined as base64)."""
    esc = html.escape
    cards = [
        (_pct(summary.mean_accuracy), f"mean accuracy ({summary.accuracy_source})"),
        (f"{summary.sessions_done}", "sessions completed"),
        (f"{summary.sessions_aborted}", "sessions aborted"),
        (f"{summary.sessions_not_formed}", "invitations not formed"),
        ("off" if not scenario.dp else
         ("–" if summary.max_epsilon is None else f"{summary.max_epsilon:.2f}"), "max ε spent"),
        (_bytes(summary.mean_bytes_sent), "sent per peer (mean)"),
        (f"{summary.duration_s:.0f} s", "run time"),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(scenario.dataset)} · {scenario.peers} peers · '
        f"seed {scenario.seed}</p>",
        f'<p class="verdict">{esc(_verdict(summary, baselines, scenario))}</p>',
        '<div class="cards">',
        *(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for v, k in cards),
        "</div>",
        "<h2>Scenario</h2><table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in scenario_summary(scenario)),
        "</table>",
        "<h2>Against the baselines</h2>",
        "<table><tr><th>Method</th><th>Mean accuracy</th><th>Min</th><th>Max</th>"
        "<th>Notes</th></tr>",
        *(
            "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
            for row in _baseline_rows(summary, baselines)
        ),
        "</table>",
        *_baseline_note(baselines),
        '<h2>Plots</h2><div class="plots">',
    ]
    for key, filename in PLOT_FILES.items():
        if key not in images:
            continue
        encoded = base64.b64encode(images[key]).decode("ascii")
        out.append(
            f'<figure><img alt="{esc(filename)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(_CAPTIONS[key])} (also saved as {esc(filename)})</figcaption>"
            "</figure>"
        )
    out.append("</div><h2>Dropped messages</h2>")
    if summary.drops:
        out.append("<p>Messages peers refused (bad input is dropped and counted, never "
                   "processed):</p><table><tr><th>Reason</th><th>Count</th></tr>")
        out += [f"<tr><td>{esc(r)}</td><td>{c}</td></tr>" for r, c in summary.drops.items()]
        out.append("</table>")
    else:
        out.append("<p>No peer dropped a message.</p>")
    if summary.events:
        out.append("<h2>Events recorded</h2><table><tr><th>Event</th><th>Rows</th></tr>")
        out += [f"<tr><td>{esc(e)}</td><td>{c}</td></tr>" for e, c in summary.events.items()]
        out.append("</table>")
    if summary.skipped_lines:
        out.append(f"<p>Note: {summary.skipped_lines} malformed line(s) in metrics.jsonl were "
                   "skipped.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    run_dir: Path,
    scenario: Scenario,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Read run_dir/metrics.jsonl, write the PNG plots and report.html; return the HTML path."""
    run_dir = Path(run_dir)
    baselines = baselines or {}
    metrics = read_metrics_file(run_dir)
    summary = summarize(metrics.rows, metrics.skipped_lines)
    images = {key: _png_bytes(fig) for key, fig in build_plots(metrics.rows, baselines,
                                                               scenario).items()}
    for key, data in images.items():
        _atomic_write(run_dir / PLOT_FILES[key], data)
    path = run_dir / REPORT_FILE
    _atomic_write(path, render_html(scenario, summary, baselines, images).encode("utf-8"))
    return path


def terminal_summary(
    summary: RunSummary, baselines: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """A short plain-text table for the end of a `murmur-sim` run."""
    rows = _baseline_rows(summary, baselines or {})
    width = max(20, *(len(row[0]) for row in rows))
    lines = [f"{'method':<{width}} {'mean acc':>9} {'min':>7} {'max':>7}"]
    for name, mean, low, high, _note in rows:
        lines.append(f"{name:<{width}} {mean:>9} {low:>7} {high:>7}")
    lines.append(
        f"sessions: {summary.sessions_done} completed, {summary.sessions_aborted} aborted, "
        f"{summary.sessions_not_formed} invitations not formed; "
        f"max ε {'–' if summary.max_epsilon is None else f'{summary.max_epsilon:.2f}'}; "
        f"{_bytes(summary.mean_bytes_sent)} sent per peer; "
        f"drops: {sum(summary.drops.values())}"
    )
    seconds = [v.get("seconds") for v in (baselines or {}).values()]
    if seconds and all(isinstance(t, int | float) for t in seconds):
        lines.append(f"baselines: trained in {sum(seconds):.1f} s (test set)")
    return "\n".join(lines)
