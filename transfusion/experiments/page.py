"""An experiment's results: results.json (every point, means and spreads over seeds, verdicts), plots
(PNG with matplotlib, the optional 'plots' extra; inline SVG without it) and a self-contained
experiment.html.

A verdict compares two arms on one metric at every budget: the paper's direction *holds* at a budget
when the better arm's range over seeds lies entirely on the right side of the other's, is *reversed*
when it lies entirely on the wrong side, and is *unresolved* when the ranges overlap. The finding is
**reproduced** when it holds at the largest budget and is reversed at none, **not reproduced** when it
is reversed at the largest budget, **inconclusive at this budget** otherwise, and **not measured**
when no budget has the metric for both arms.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from transfusion.evaluation.report import CSS
from transfusion.experiments.definitions import Experiment, Finding, metric_on
from transfusion.io import atomic_write_text

LOWER_IS_BETTER = ("fd_", "bits_per_byte", "perplexity", "blank_rate", "seconds")


def lower_is_better(metric: str) -> bool:
    return any(k in metric for k in LOWER_IS_BETTER)


def load_points(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "points").glob("*/point.json"))]


def spread(values: list[float]) -> dict[str, float]:
    """Mean, median, min and max over seeds."""
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "n": len(values)}  # fmt: skip


def summarise(exp: Experiment, pts: list[dict[str, Any]]) -> dict[str, Any]:
    """{arm: {budget: {"flops": spread, metric: spread, "by_cfg": {scale: {metric: spread}}}}}."""
    out: dict[str, Any] = {}
    for arm in exp.arms:
        for budget in sorted({p["budget"] for p in pts if p["arm"] == arm.name}):
            mine = [p for p in pts if p["arm"] == arm.name and p["budget"] == budget]
            cell: dict[str, Any] = {"flops": spread([p["flops"] for p in mine])}
            for m in {k for p in mine for k, v in p["metrics"].items() if isinstance(v, (int, float))}:
                vals = [p["metrics"][m] for p in mine if isinstance(p["metrics"].get(m), (int, float))]
                if vals and all(math.isfinite(v) for v in vals):
                    cell[m] = spread(vals)
            scales = {s for p in mine for s in p["metrics"].get("by_cfg", {})}
            cell["by_cfg"] = {
                s: {m: spread([p["metrics"]["by_cfg"][s][m] for p in mine]) for m in exp.metrics
                    if all(m in p["metrics"]["by_cfg"].get(s, {}) for p in mine)}
                for s in sorted(scales, key=float)
            }  # fmt: skip
            out.setdefault(arm.name, {})[f"{budget:g}"] = cell
    return out


def judge(f: Finding, summary: dict[str, Any]) -> dict[str, Any]:
    """The verdict of one finding, with the numbers behind it (module docstring)."""
    budgets = sorted(set(summary.get(f.better, {})) & set(summary.get(f.worse, {})), key=float)
    states = []
    for b in budgets:
        good, bad = summary[f.better][b].get(f.metric), summary[f.worse][b].get(f.metric)
        if good is None or bad is None:
            continue
        if f.higher_is_better:
            holds, reverse = good["min"] > bad["max"], good["max"] < bad["min"]
        else:
            holds, reverse = good["max"] < bad["min"], good["min"] > bad["max"]
        state = "holds" if holds else "reversed" if reverse else "unresolved"
        states.append({"budget": b, "state": state, "better": good, "worse": bad})
    if not states:
        verdict = "not measured"  # no budget where both arms report the metric
    elif states[-1]["state"] == "holds" and all(s["state"] != "reversed" for s in states):
        verdict = "reproduced"
    elif states[-1]["state"] == "reversed":
        verdict = "not reproduced"
    else:
        verdict = "inconclusive at this budget"
    return {"finding": f.__dict__, "verdict": verdict, "budgets": states}


def human(x: float) -> str:
    """A number for people: 1,690 not 1.69e+03; 12.3; 0.563; 0.0123."""
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return "0" if a == 0 else f"{x:.3g}"


def spread_text(s: dict[str, float]) -> str:
    """'mean [min-max]' over seeds."""
    return f"{human(s['mean'])} [{human(s['min'])}-{human(s['max'])}]"


def verdict_text(exp: Experiment, j: dict[str, Any]) -> str:
    f = j["finding"]
    arms = {a.name: a.title() for a in exp.arms}
    parts = [
        f"{arms[f['better']]} {spread_text(s['better'])} against {arms[f['worse']]} {spread_text(s['worse'])} "
        f"at budget x{s['budget']} ({s['state']})"
        for s in j["budgets"]
    ]  # fmt: skip
    direction = "higher" if f["higher_is_better"] else "lower"
    return (f"{f['metric']} ({direction} is better): {j['verdict']}. " + "; ".join(parts) +
            f". Paper: {f['paper']}.")  # fmt: skip


def parity_ratio(
    summary: dict[str, Any], metric: str, ours: str = "transfusion", theirs: str = "chameleon"
) -> dict:
    """The paper's Figure 8: at each of our budgets, the FLOPs the other model needs to reach our
    score (log-linear interpolation between its budgets' means), as our FLOPs over theirs; a bound
    when it never reaches the score within its budgets."""
    sign = -1 if lower_is_better(metric) else 1
    curve = sorted(
        (c["flops"]["mean"], c[metric]["mean"]) for c in summary.get(theirs, {}).values() if metric in c
    )
    out = {}
    for b, cell in summary.get(ours, {}).items():
        if metric not in cell or len(curve) < 2:
            continue
        target, flops = cell[metric]["mean"], cell["flops"]["mean"]
        need = None
        for (f0, v0), (f1, v1) in zip(curve, curve[1:]):
            if sign * (v0 - target) <= 0 <= sign * (v1 - target) and v0 != v1:
                w = (target - v0) / (v1 - v0)
                need = math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0)))
                break
        if need is None and sign * (curve[0][1] - target) >= 0:
            out[b] = {"ratio_at_least": flops / curve[0][0], "note": "reached already at the smallest budget"}
        elif need is None:
            out[b] = {"ratio_at_most": flops / curve[-1][0], "note": "not reached within the budgets run"}
        else:
            out[b] = {"ratio": flops / need, "flops_needed": need}
    return out


SWEPT = ("geneval_overall", "fd_project_classifier", "geneval_blank_rate")
"""What the guidance sweep reports the best weight of (on Fashion-MNIST: their ``FASHION_METRICS``)."""


def guidance_text(summary: dict[str, Any], dataset: str = "shapes") -> list[str]:
    """What the guidance sweep shows: the best weight per metric and budget, with the numbers."""
    swept = [metric_on(dataset, m) for m in SWEPT]
    lines = []
    for arm, budgets in summary.items():
        for b, cell in budgets.items():
            by = cell.get("by_cfg", {})
            for m in swept:
                vals = {s: v[m]["mean"] for s, v in by.items() if m in v}
                if not vals:
                    continue
                best = (min if lower_is_better(m) else max)(vals, key=vals.get)
                row = ", ".join(f"{s}: {v:.3g}" for s, v in vals.items())
                lines.append(f"{arm}, budget x{b}: {m} by guidance weight {row}; best at {best}.")
    return lines


# --- plots ------------------------------------------------------------------------------------------------
def series(
    exp: Experiment, summary: dict[str, Any], metric: str
) -> list[tuple[str, list[tuple[float, float, float, float]]]]:
    """Per arm: (training FLOPs, mean, min, max) of ``metric`` at each budget; for a guidance sweep,
    per budget: (weight, mean, min, max)."""
    out = []
    if len(exp.cfg_scales) > 1:
        for arm in exp.arms:
            for b, cell in summary.get(arm.name, {}).items():
                pts = [(float(s), v[metric]["mean"], v[metric]["min"], v[metric]["max"])
                       for s, v in cell["by_cfg"].items() if metric in v]  # fmt: skip
                out.append((f"{arm.title()}, budget x{b}", pts))
        return out
    for arm in exp.arms:
        pts = [(c["flops"]["mean"], c[metric]["mean"], c[metric]["min"], c[metric]["max"])
               for c in summary.get(arm.name, {}).values() if metric in c]  # fmt: skip
        out.append((arm.title(), sorted(pts)))
    return out


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def plot_png(title: str, xlabel: str, data: list, log_x: bool) -> bytes | None:
    """The plot as PNG bytes with matplotlib (the 'plots' extra), or None without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    for (name, pts), color in zip(data, COLORS * 4):
        if not pts:
            continue
        xs, ys, lo, hi = zip(*pts)
        ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]], marker="o",
                    capsize=3, label=name, color=color)  # fmt: skip
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if any(pts for _, pts in data):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_svg(title: str, xlabel: str, data: list, log_x: bool, width: int = 520, height: int = 320) -> str:
    """The same plot as inline SVG (no dependency): mean with min-max bars over seeds."""
    pts = [p for _, s in data for p in s]
    if not pts:
        return f"<p class='muted'>{html.escape(title)}: no data</p>"
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)  # noqa: E731
    x0, x1 = min(fx(p[0]) for p in pts), max(fx(p[0]) for p in pts)
    y0, y1 = min(p[2] for p in pts), max(p[3] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 48
    sx = lambda x: pad + (fx(x) - x0) / (x1 - x0) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)  # noqa: E731
    xlabel_at = lambda v: human(10**v if log_x else v)  # noqa: E731  the axis ends, in data units
    body = []
    for k, ((name, s), color) in enumerate(zip(data, COLORS * 4)):
        if not s:
            continue
        path = " ".join(
            ("M" if i == 0 else "L") + f"{sx(x):.1f},{sy(m):.1f}" for i, (x, m, _, _) in enumerate(s)
        )
        body.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        for x, m, lo, hi in s:
            body.append(f'<line x1="{sx(x):.1f}" y1="{sy(lo):.1f}" x2="{sx(x):.1f}" y2="{sy(hi):.1f}" stroke="{color}"/>'
                        f'<circle cx="{sx(x):.1f}" cy="{sy(m):.1f}" r="3" fill="{color}"/>')  # fmt: skip
        body.append(f'<text x="{width - pad}" y="{pad + 14 * k}" font-size="11" text-anchor="end" fill="{color}">'
                    f"{html.escape(name)}</text>")  # fmt: skip
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img">'
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>'
            f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>'
            f'<text x="{pad}" y="{height - pad + 14}" font-size="11" text-anchor="middle">{xlabel_at(x0)}</text>'
            f'<text x="{width - pad}" y="{height - pad + 14}" font-size="11" text-anchor="middle">{xlabel_at(x1)}</text>'
            f'<text x="{pad - 4}" y="{sy(y1) + 4:.1f}" font-size="11" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{pad - 4}" y="{sy(y0) + 4:.1f}" font-size="11" text-anchor="end">{y0:.3g}</text>'
            + "".join(body) + "</svg>")  # fmt: skip


# --- the page -----------------------------------------------------------------------------------------------
def write_results(exp: Experiment, out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """results.json, plots/*.png (with matplotlib) and experiment.html from the finished points."""
    pts = load_points(out)
    summary = summarise(exp, pts)
    judged = [judge(f, summary) for f in exp.findings]
    results: dict[str, Any] = {
        "experiment": exp.name, "title": exp.title, "plan": plan, "points": pts, "summary": summary,
        "verdicts": [{**j, "text": verdict_text(exp, j)} for j in judged],
    }  # fmt: skip
    if exp.name == "vs-chameleon":
        parity = [metric_on(exp.dataset, m) for m in ("fd_project_classifier", "geneval_overall")]
        results["parity_flop_ratio"] = {m: parity_ratio(summary, m) for m in parity}
    profiles = denoising_profiles(exp, pts)
    if profiles:
        results["denoising"] = profiles
    if len(exp.cfg_scales) > 1:
        results["guidance"] = guidance_text(summary, exp.dataset)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "experiment.html", page(exp, out, results))
    return results


def denoising_profiles(exp: Experiment, pts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per diffusion arm at its largest budget: the loss by timestep band and by patch position,
    each as mean, min and max over seeds ({arm: {"budget", "t", "by_t", "by_patch"}})."""
    out: dict[str, Any] = {}
    for arm in exp.arms:
        mine = [p for p in pts if p["arm"] == arm.name and "loss_by_t" in p["metrics"]]
        if not mine:
            continue
        top = max(p["budget"] for p in mine)

        at_top = [p["metrics"] for p in mine if p["budget"] == top]
        out[arm.name] = {"budget": top, "t": at_top[0]["loss_t_mids"], "by_t": _per_index(at_top, "loss_by_t"),
                         "by_patch": _per_index(at_top, "loss_by_patch")}  # fmt: skip
    return out


def _per_index(metrics: list[dict[str, Any]], key: str) -> list[dict[str, float]]:
    """Spread over seeds of each entry of a list-valued metric."""
    return [spread(list(vals)) for vals in zip(*(m[key] for m in metrics))]


def denoising_section(exp: Experiment, out: Path, profiles: dict[str, Any]) -> str:
    """Two plots: the held-out denoising loss by timestep band, and by patch position in raster order
    (as a share of the image, so that patch sizes compare)."""
    titles = {a.name: a.title() for a in exp.arms}
    by_t = [(titles[a], [(t, s["mean"], s["min"], s["max"]) for t, s in zip(p["t"], p["by_t"])])
            for a, p in profiles.items()]  # fmt: skip
    by_patch = [(titles[a], [((i + 0.5) / len(p["by_patch"]), s["mean"], s["min"], s["max"])
                             for i, s in enumerate(p["by_patch"])]) for a, p in profiles.items()]  # fmt: skip
    budget = ", ".join(f"{titles[a]} x{p['budget']:g}" for a, p in profiles.items())
    return (
        "<h2>Denoising loss on held-out images</h2><p class='muted'>The training loss (mean squared error "
        "of the predicted noise) on held-out caption-then-image pairs, at the middle of each tenth of t "
        f"with the same noise in every band; largest budget ({html.escape(budget)}); mean over seeds, "
        "bars from the lowest to the highest. By patch: raster order, as a share of the image (the first "
        "patches see nothing of their own image under causal attention).</p><div class='curves'>"
        + _plot(out, "loss_by_t", "denoising loss by timestep", "timestep t", by_t, False)
        + _plot(out, "loss_by_patch", "denoising loss by patch position", "patch position (share of the image, raster order)", by_patch, False)
        + "</div>"
    )  # fmt: skip


def _figure(exp: Experiment, out: Path, summary: dict[str, Any], metric: str) -> str:
    sweep = len(exp.cfg_scales) > 1
    xlabel, log_x = ("guidance weight", False) if sweep else ("training FLOPs", True)
    return _plot(out, metric, metric, xlabel, series(exp, summary, metric), log_x)


def _plot(out: Path, name: str, title: str, xlabel: str, data: list, log_x: bool) -> str:
    """A plot for the page: PNG (also written to plots/NAME.png) with matplotlib, inline SVG without."""
    png = plot_png(title, xlabel, data, log_x)
    if png is None:
        return plot_svg(title, xlabel, data, log_x)
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / f"{name}.png").write_bytes(png)
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' alt='{html.escape(title)}'>"


def verdict_table(exp: Experiment, results: dict[str, Any]) -> str:
    """One row per finding: what is claimed, the paper's number, ours at each budget, the verdict."""
    if not results["verdicts"]:
        return "<p>This experiment reports numbers; it makes no claim to test.</p>"
    arms = {a.name: a.title() for a in exp.arms}
    budgets = sorted({s["budget"] for v in results["verdicts"] for s in v["budgets"]}, key=float)
    head = ("<tr><th>finding</th><th>paper</th>" + "".join(f"<th>ours at x{b}</th>" for b in budgets)
            + "<th>verdict</th></tr>")  # fmt: skip
    rows = []
    for v in results["verdicts"]:
        f = v["finding"]
        at = {s["budget"]: s for s in v["budgets"]}
        cells = "".join(
            f"<td style='white-space:nowrap'>{spread_text(at[b]['better'])}<br>vs {spread_text(at[b]['worse'])}<br>"
            f"<span class='muted'>{at[b]['state']}</span></td>"
            if b in at else "<td></td>"
            for b in budgets
        )  # fmt: skip
        claim = (f"{html.escape(arms[f['better']])} {'above' if f['higher_is_better'] else 'below'} "
                 f"{html.escape(arms[f['worse']])} on <b>{html.escape(f['metric'])}</b>")  # fmt: skip
        css = {"reproduced": "ok", "not reproduced": "bad"}.get(v["verdict"], "muted")
        rows.append(f"<tr><td>{claim}</td><td>{html.escape(f['paper'])}</td>{cells}"
                    f"<td class='{css}'><b>{html.escape(v['verdict'])}</b></td></tr>")  # fmt: skip
    return f"<table>{head}{''.join(rows)}</table>"


def parity_section(out: Path, summary: dict[str, Any], parity: dict[str, Any]) -> str:
    """Figure 8 of the paper as a table and a plot: at each of Transfusion's budgets, the FLOPs the
    Chameleon-style model needs to match it, and their ratio."""
    parts = ["<h2>Parity FLOP ratio (paper Figure 8)</h2><p class='muted'>Transfusion's training FLOPs "
             "over the FLOPs the Chameleon-style model needs for the same score (log-linear between its "
             "budgets); below 1, Transfusion gets there with less.</p>"]  # fmt: skip
    for metric, by_budget in parity.items():
        rows, pts = [], []
        for b, r in sorted(by_budget.items(), key=lambda kv: float(kv[0])):
            ours = summary.get("transfusion", {}).get(b, {}).get("flops", {}).get("mean", float("nan"))
            if "ratio" in r:
                need, ratio = human(r["flops_needed"] / 1e12), human(r["ratio"])
                pts.append((ours, r["ratio"], r["ratio"], r["ratio"]))
            elif "ratio_at_most" in r:
                need, ratio = "more than its largest budget", f"at most {human(r['ratio_at_most'])}"
            else:
                need, ratio = "less than its smallest budget", f"at least {human(r['ratio_at_least'])}"
            rows.append(f"<tr><td>x{b}</td><td>{human(ours / 1e12)}</td><td>{need}</td><td>{ratio}</td></tr>")
        head = "<tr><th>budget</th><th>Transfusion TFLOP</th><th>Chameleon-style TFLOP needed</th><th>ratio</th></tr>"
        parts.append(f"<h3>{html.escape(metric)}</h3><table>{head}{''.join(rows)}</table>")
        if pts:
            data = [("FLOP ratio", sorted(pts))]
            title = f"parity FLOP ratio, {metric}"
            parts.append(_plot(out, f"parity_{metric}", title, "Transfusion training FLOPs", data, True))
    return "".join(parts)


def plan_html(plan: dict[str, Any]) -> str:
    """The plan as a table: every point's steps, FLOPs and estimated minutes."""
    head = "<tr><th>point</th><th>steps</th><th>TFLOP</th><th>train (min)</th><th>eval (min)</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(r['id'])}</td><td>{r['steps']:,}</td><td>{human(r['gflop'] / 1e3)}</td>"
        f"<td>{human(r['train_seconds_est'] / 60)}</td><td>{human(r['eval_seconds_est'] / 60)}</td></tr>"
        for r in plan["points"]
    )
    speeds = "; ".join(
        f"{html.escape(k)} {human(v['gflops'])} GFLOP/s" for k, v in plan.get("speeds", {}).items()
    )
    return (f"<table>{head}{rows}</table><p class='muted'>shared assets {human(plan['shared_seconds'] / 60)} min; "
            f"measured training speed: {speeds}</p>")  # fmt: skip


def _table(exp: Experiment, summary: dict[str, Any], metric: str) -> str:
    rows = []
    for arm in exp.arms:
        for b, cell in summary.get(arm.name, {}).items():
            if metric not in cell:
                continue
            s = cell[metric]
            rows.append(f"<tr><td>{html.escape(arm.title())}</td><td>x{b}</td><td>{cell['flops']['mean'] / 1e12:.1f}</td>"
                        f"<td>{human(s['mean'])}</td><td>{human(s['min'])} - {human(s['max'])}</td><td>{s['n']}</td></tr>")  # fmt: skip
    head = "<tr><th>arm</th><th>budget</th><th>TFLOP</th><th>mean</th><th>range</th><th>seeds</th></tr>"
    return f"<h3>{html.escape(metric)}</h3><table>{head}{''.join(rows)}</table>"


def _grids(exp: Experiment, out: Path, pts: list[dict[str, Any]]) -> str:
    if not pts:
        return ""
    top = max(p["budget"] for p in pts)
    cells = []
    for arm in exp.arms:
        mine = [p for p in pts if p["arm"] == arm.name and p["budget"] == top]
        if not mine:
            continue
        d = out / "points" / min(mine, key=lambda p: p["seed"])["id"]
        if (d / "samples.png").is_file():
            cells.append(f"<h3>{html.escape(arm.title())}</h3>" + sample_figures(d))
    return (f"<h2>Samples at the largest budget (x{top:g}, first seed)</h2><p class='muted'>Each image "
            "enlarged 4x without smoothing, under its prompt.</p>" + "".join(cells))  # fmt: skip


def sample_figures(d: Path, cell: int = 64, scale: int = 2) -> str:
    """A point's sample grid cut back into its images, each under its prompt (samples.json)."""
    from PIL import Image

    grid = Image.open(d / "samples.png")
    prompts = json.loads((d / "samples.json").read_text()) if (d / "samples.json").is_file() else []
    figures = []
    for i in range(grid.width // cell):
        buf = io.BytesIO()
        grid.crop((i * cell, 0, (i + 1) * cell, cell)).save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        text = html.escape(prompts[i]) if i < len(prompts) else ""
        figures.append(f"<figure style='display:inline-block;width:{cell * scale}px;margin:4px;vertical-align:top'>"
                       f"<img src='{uri}' width='{cell * scale}' height='{cell * scale}' "
                       f"style='image-rendering:pixelated' alt='{text}'><figcaption>{text}</figcaption></figure>")  # fmt: skip
    return "".join(figures)


def page(exp: Experiment, out: Path, results: dict[str, Any]) -> str:
    summary = results["summary"]
    extra = ""
    if "parity_flop_ratio" in results:
        extra += parity_section(out, summary, results["parity_flop_ratio"])
    if "denoising" in results:
        extra += denoising_section(exp, out, results["denoising"])
    if "guidance" in results:
        extra += (
            "<h2>Guidance sweep</h2><ul>"
            + "".join(f"<li>{html.escape(t)}</li>" for t in results["guidance"])
            + "</ul>"
        )
    figures = "".join(_figure(exp, out, summary, m) for m in exp.metrics)
    tables = "".join(_table(exp, summary, m) for m in exp.metrics)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(exp.title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(exp.title)}</h1><p class="muted">{html.escape(exp.about)}</p>
<h2>Verdicts</h2>{verdict_table(exp, results)}
<p class="muted">A finding holds at a budget when the better arm's range over seeds lies wholly on the
right side of the other's; reproduced when it holds at the largest budget and is reversed at none.</p>{extra}
<h2>Plots</h2><p class="muted">Mean over seeds, bars from the lowest to the highest seed.</p><div class="curves">{figures}</div>
<h2>Tables</h2>{tables}
{_grids(exp, out, results["points"])}
<h2>Plan</h2>{plan_html(results["plan"])}
</body></html>
"""
