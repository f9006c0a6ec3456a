"""The run report's HTML page: the verdict, headline cards, scenario, the table against the
baselines, the plots (inlined as base64 PNG) and dropped messages, all HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any

from sim.report_plots import PLOT_FILES
from sim.report_summary import (
    RunSummary,
    audit_figures,
    baseline_rows,
    format_bytes,
    format_percent,
)
from sim.scenario import Scenario
from sim.scenario_io import scenario_summary


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
    audit: Mapping[str, Any] | None = None,
    *,
    title: str = "Murmur simulation report",
) -> str:
    """The report page; images are PNG bytes keyed like PLOT_FILES (inlined as base64);
    ``audit`` (sim.audit_card) adds the privacy audit's card and section."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(scenario.dataset)} · {scenario.peers} peers · '
        f"seed {scenario.seed}</p>",
        f'<p class="verdict">{esc(_verdict(summary, baselines, scenario))}</p>',
        *_cards(scenario, summary),
        *_scenario_table(scenario),
        *_baseline_table(summary, baselines),
        *(_audit_section(audit) if audit is not None else []),
        '<h2>Plots</h2><div class="plots">',
        *_plot_figures(images),
        "</div><h2>Dropped messages</h2>",
        *_drops_table(summary),
        *_events_section(summary),
    ]
    if summary.skipped_lines:
        out.append(f"<p>Note: {summary.skipped_lines} malformed line(s) in metrics.jsonl were "
                   "skipped.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _cards(scenario: Scenario, summary: RunSummary) -> list[str]:
    """The headline numbers, one card each."""
    esc = html.escape
    cards = [
        (format_percent(summary.mean_accuracy), f"mean accuracy ({summary.accuracy_source})"),
        (f"{summary.sessions_done}", "sessions completed"),
        (f"{summary.sessions_aborted}", "sessions aborted"),
        (f"{summary.sessions_not_formed}", "invitations not formed"),
        ("off" if not scenario.dp else
         ("–" if summary.max_epsilon is None else f"{summary.max_epsilon:.2f}"), "max ε spent"),
        (format_bytes(summary.mean_bytes_sent), "sent per peer (mean)"),
        (f"{summary.duration_s:.0f} s", "run time"),
    ]
    if summary.max_peak_rss_mb is not None:
        cards.append((f"{summary.max_peak_rss_mb:.0f} MiB", "peak memory (largest process)"))
    return [
        '<div class="cards">',
        *(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for v, k in cards),
        "</div>",
    ]


def _scenario_table(scenario: Scenario) -> list[str]:
    esc = html.escape
    return [
        "<h2>Scenario</h2><table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in scenario_summary(scenario)),
        "</table>",
    ]


def _baseline_table(
    summary: RunSummary, baselines: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    esc = html.escape
    return [
        "<h2>Against the baselines</h2>",
        "<table><tr><th>Method</th><th>Mean accuracy</th><th>Min</th><th>Max</th>"
        "<th>Notes</th></tr>",
        *(
            "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
            for row in baseline_rows(summary, baselines)
        ),
        "</table>",
        *_baseline_note(baselines),
    ]


def _plot_figures(images: Mapping[str, bytes]) -> list[str]:
    """The plots present in ``images``, in PLOT_FILES order, inlined as base64 PNG."""
    esc = html.escape
    out: list[str] = []
    for key, filename in PLOT_FILES.items():
        if key not in images:
            continue
        encoded = base64.b64encode(images[key]).decode("ascii")
        out.append(
            f'<figure><img alt="{esc(filename)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(_CAPTIONS[key])} (also saved as {esc(filename)})</figcaption>"
            "</figure>"
        )
    return out


def _drops_table(summary: RunSummary) -> list[str]:
    """Dropped messages by reason, or a line saying there were none."""
    if not summary.drops:
        return ["<p>No peer dropped a message.</p>"]
    esc = html.escape
    return [
        "<p>Messages peers refused (bad input is dropped and counted, never "
        "processed):</p><table><tr><th>Reason</th><th>Count</th></tr>",
        *(f"<tr><td>{esc(r)}</td><td>{c}</td></tr>" for r, c in summary.drops.items()),
        "</table>",
    ]


def _events_section(summary: RunSummary) -> list[str]:
    if not summary.events:
        return []
    esc = html.escape
    return [
        "<h2>Events recorded</h2><table><tr><th>Event</th><th>Rows</th></tr>",
        *(f"<tr><td>{esc(e)}</td><td>{c}</td></tr>" for e, c in summary.events.items()),
        "</table>",
    ]


def _audit_section(audit: Mapping[str, Any]) -> list[str]:
    """The privacy audit: its figures as cards, the method, and what they mean."""
    esc = html.escape
    out = ['<h2 id="audit">Privacy audit</h2>']
    if not audit.get("error"):
        out += ['<div class="cards">',
                *(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                  for v, k in audit_figures(audit)),
                "</div>"]
    out.append(f"<p>Method: {esc(str(audit.get('method')))}; {esc(str(audit.get('noise')))} "
               f"noise, m = {esc(str(audit.get('m')))} canaries, confidence "
               f"{esc(str(audit.get('confidence')))}, δ = {esc(str(audit.get('delta')))}.</p>")
    out.append(f"<p>{esc(str(audit.get('meaning')))}</p>")
    return out
