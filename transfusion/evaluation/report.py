"""``report.html``: one self-contained page (inline CSS, SVG curves, base64 PNGs, no scripts) that shows
what a run learned, failures first: the headline scores per kind with the share of blank images,
failed generations beside successful ones for every kind, loss curves, every generated image with
its prompt, captions next to the truth, the metrics, the configuration and the time spent."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from transfusion.data.shapes import KINDS

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.cell { width: 120px; font-size: 12px; }
.cell img { width: 112px; height: 112px; image-rendering: pixelated; border: 3px solid #ccc; }
.ok img { border-color: #2a2; } .bad img { border-color: #c33; } td.ok { color: #1a7f1a; } td.bad { color: #c33; }
.muted { color: #777; font-size: 13px; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
.curves { display: flex; gap: 20px; flex-wrap: wrap; }
.side { display: flex; gap: 40px; flex-wrap: wrap; }
"""


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi]: 1, 2, 5 x powers of ten, or every digit when that gives
    fewer than three."""
    out: list[float] = []
    for digits in ((1, 2, 5), tuple(range(1, 10))):
        out = [d * 10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
               for d in digits if lo <= d * 10.0**k <= hi]  # fmt: skip
        if len(out) >= 3:
            break
    return out or [lo, hi]


def loss_svg(
    series: list[tuple[str, str, list[tuple[float, float, float, float]]]],
    title: str,
    ylabel: str,
    xlabel: str = "training step",
    width: int = 470,
    height: int = 300,
) -> str:
    """Loss curves as inline SVG on log-log axes (a loss falls by orders of magnitude early and by
    percents late: on linear axes everything after the first steps is a flat line), with ticks and
    labelled axes; each series is (name, colour, [(x, median, lo, hi)]) and its run-to-run range (lo-hi)
    is shaded behind the median."""
    pts = [p for _, _, s in series for p in s if p[0] > 0 and min(p[1:]) > 0]
    if not pts:
        return f"<p class='muted'>{html.escape(title)}: no data</p>"
    left, right, top, bottom = 56, 14, 26, 44
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[2] for p in pts), max(p[3] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 * 10), (y1 if y1 > y0 else y0 * 1.1)
    lx0, lx1, ly0, ly1 = map(math.log10, (x0, x1, y0, y1))

    def sx(x: float) -> float:
        return left + (math.log10(x) - lx0) / (lx1 - lx0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (math.log10(y) - ly0) / (ly1 - ly0) * (height - top - bottom)

    parts = [f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>']  # fmt: skip
    for t in log_ticks(x0, x1):
        parts.append(f'<line x1="{sx(t):.1f}" y1="{height - bottom}" x2="{sx(t):.1f}" y2="{height - bottom + 4}" stroke="#999"/>'
                     f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" font-size="10" text-anchor="middle">{t:g}</text>')  # fmt: skip
    for t in log_ticks(y0, y1):
        parts.append(f'<line x1="{left - 4}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 3:.1f}" font-size="10" text-anchor="end">{t:g}</text>')  # fmt: skip
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle" font-size="11">'
                 f"{html.escape(xlabel)} (log scale)</text>"
                 f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle" '
                 f'font-size="11">{html.escape(ylabel)} (log scale)</text>')  # fmt: skip
    for k, (name, color, s) in enumerate(series):
        s = [p for p in s if p[0] > 0 and min(p[1:]) > 0]
        if not s:
            continue
        if any(lo != hi for _, _, lo, hi in s):
            band = [f"{sx(x):.1f},{sy(hi):.1f}" for x, _, _, hi in s] + [
                f"{sx(x):.1f},{sy(lo):.1f}" for x, _, lo, _ in reversed(s)
            ]
            parts.append(
                f'<polygon points="{" ".join(band)}" fill="{color}" fill-opacity="0.18" stroke="none"/>'
            )
        line = " ".join(
            f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(m):.1f}" for i, (x, m, _, _) in enumerate(s)
        )
        parts.append(f'<path d="{line}" fill="none" stroke="{color}" stroke-width="1.8"/>'
                     f'<text x="{width - right}" y="{top + 12 + 13 * k}" font-size="11" text-anchor="end" fill="{color}">'
                     f"{html.escape(name)}</text>")  # fmt: skip
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img">{"".join(parts)}</svg>'


LOSS_UNITS = {"text": "cross-entropy, nats per text token", "image": "diffusion MSE per latent value"}


def run_curves(log: list[dict]) -> str:
    """A run's loss curves (training and validation, text and image) as two log-log panels."""
    panels = []
    for kind, (train_color, val_color) in (
        ("text", ("#1f77b4", "#2ca02c")),
        ("image", ("#d62728", "#9467bd")),
    ):
        series = []
        for name, key, color in (
            ("training", f"{kind}_loss", train_color),
            ("validation", f"val_{kind}_loss", val_color),
        ):
            pts = [(r["step"], r[key], r[key], r[key]) for r in log if key in r]
            if pts:
                series.append((name, color, pts))
        panels.append(loss_svg(series, f"{kind} loss", LOSS_UNITS[kind]))
    return "".join(panels)


def read_metrics_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cells(items: list[tuple[Image.Image, str, bool | None]]) -> str:
    out = []
    for image, label, ok in items:
        cls = "cell" + ("" if ok is None else " ok" if ok else " bad")
        out.append(
            f"<div class='{cls}'><img src='{png_data_uri(image)}' alt=''><br>{html.escape(label)}</div>"
        )
    return "<div class='grid'>" + "".join(out) + "</div>"


EXTRA = ("geneval_well_formed", "geneval_position_objects", "geneval_position_axis", "geneval_position_order",
         "geneval_position_as_written", "geneval_position_order_as_written", "geneval_overall_as_written",
         "caption_accuracy", "caption_accuracy_strict", "caption_relation_order", "caption_cider_d",
         "vae_psnr_val")  # fmt: skip
"""Scores shown under the per-kind table (those a run has)."""


def headline(metrics: dict[str, Any]) -> str:
    """Per-kind scores (composition, or Fashion-MNIST classes) and blank images, as a small table."""
    kinds = [k for k in (*KINDS, "overall") if f"geneval_{k}" in metrics]
    if not kinds:
        keys = [k for k in ("fashion_generation_accuracy", "fashion_classifier_test_accuracy",
                            "fashion_caption_accuracy") if k in metrics]  # fmt: skip
        return (
            "<table>" + "".join(f"<tr><td>{k}</td><td>{metrics[k]:.2f}</td></tr>" for k in keys) + "</table>"
        )
    head = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in kinds)
    score = "".join(f"<td>{metrics['geneval_' + k]:.2f}</td>" for k in kinds)
    blank = "".join(
        f"<td>{metrics.get(f'geneval_blank_rate_{k}', metrics['geneval_blank_rate'] if k == 'overall' else 0):.0%}</td>"
        for k in kinds
    )
    extra = "".join(f"<tr><td>{k.removeprefix('geneval_').replace('_', ' ')}</td>"
                    f"<td colspan='{len(kinds)}'>{metrics[k]:.3g}</td></tr>"
                    for k in EXTRA if isinstance(metrics.get(k), (int, float)))  # fmt: skip
    return (f"<table><tr><th></th>{head}</tr><tr><td>correct</td>{score}</tr>"
            f"<tr><td>blank images</td>{blank}</tr>{extra}</table>")  # fmt: skip


def _label(prompt: str, row: dict[str, Any]) -> str:
    """The prompt, and the text the model was given where that differs (relations in reading order)."""
    asked = row.get("asked", prompt)
    return prompt if asked == prompt else f"{prompt} (given as: {asked})"


def failures_beside_successes(details: dict[str, Any], per_kind: int = 4) -> str:
    """For every kind: up to ``per_kind`` failed generations (red) beside successful ones (green)."""
    rows = list(zip(details.get("pairs", []), details.get("composition", [])))
    kinds = list(dict.fromkeys(r["kind"] for _, r in rows))
    out = []
    for kind in kinds:
        mine = [(p, im, r) for (p, im), r in rows if r["kind"] == kind]
        bad = [(im, _label(p.text, r), False) for p, im, r in mine if not r["correct"]][:per_kind]
        good = [(im, _label(p.text, r), True) for p, im, r in mine if r["correct"]][:per_kind]
        right = sum(bool(r["correct"]) for *_, r in mine)
        out.append(f"<h3>{html.escape(kind.replace('_', ' '))}: {right} of {len(mine)} right</h3><div class='side'>"
                   f"<div><p class='muted'>failed</p>{_cells(bad)}</div><div><p class='muted'>right</p>{_cells(good)}"
                   "</div></div>")  # fmt: skip
    return "".join(out)


def write_report(
    out_path: str | Path,
    run_dir: str | Path,
    metrics: dict[str, Any],
    details: dict[str, Any],
    title: str = "Transfusion run",
    timings: dict[str, float] | None = None,
    notes: list[str] | None = None,
) -> Path:
    run_dir, out_path = Path(run_dir), Path(out_path)
    log = read_metrics_log(run_dir / "metrics.jsonl")
    config = (run_dir / "config.json").read_text() if (run_dir / "config.json").is_file() else "{}"
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float) else
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
    )  # fmt: skip
    generated = [
        (im, f"{p.text} {'✓' if row['correct'] else '✗'}", row["correct"])
        for (p, im), row in zip(details.get("pairs", []), details.get("composition", []))
    ]
    captions = "".join(
        f"<tr><td><img src='{png_data_uri(r['image'])}' width='64' height='64' style='image-rendering:pixelated'></td>"
        f"<td>{html.escape(r['caption'])}</td><td class='muted'>{html.escape(r['truth'])}</td>"
        f"<td>{'✓' if r['correct'] else '✗'}</td></tr>"
        for r in details.get("captions", [])[:24]
    )
    times = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>" for k, v in (timings or {}).items()
    )
    edits = edit_section(details)
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes or [])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">A Transfusion model trained from nothing: one transformer, next-token loss on text and diffusion
loss on VAE latents. Green borders: the detector judged the image right for its prompt; red: wrong.</p>
<ul>{note_html}</ul>
<h2>Headline</h2>{headline(metrics)}
<h2>Where it fails, and where it succeeds</h2>{failures_beside_successes(details)}
<h2>Metrics</h2><table>{rows}</table>
<h2>Loss curves</h2>
<div class="curves">{run_curves(log)}</div>
<h2>Images generated for held-out prompts</h2>{_cells(generated)}
<h2>Captions of held-out images</h2>
<table><tr><th>image</th><th>model's caption</th><th>truth</th><th></th></tr>{captions}</table>
{edits}
<h2>Time spent</h2><table>{times}</table>
<h2>Configuration</h2><pre>{html.escape(config)}</pre>
</body></html>
"""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def edit_section(details: dict[str, Any]) -> str:
    """The editing stage (``demo --edit``): scores per kind beside the baselines, then every held-out
    edit as input, instruction, output and the judge's reading."""
    if not details.get("edits"):
        return ""
    scores = details["edit_scores"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in scores["model"])
    body = "".join(
        f"<tr><td>{html.escape(who)}</td>"
        + "".join(f"<td>{v['edit']:.2f} / {v['kept']:.2f}</td>" for v in per.values())
        + "</tr>"
        for who, per in scores.items()
    )
    pic = "<img src='{}' width='64' height='64' style='image-rendering:pixelated'>"
    rows = "".join(
        f"<tr><td>{pic.format(png_data_uri(r['input']))}</td><td>{html.escape(r['text'])}</td>"
        f"<td>{pic.format(png_data_uri(r['output']))}</td><td>edit {'✓' if r['edit'] else '✗'}, "
        f"kept {'✓' if r['kept'] else '✗'}{' (held-out combination)' if r['held_out'] else ''}</td></tr>"
        for r in details["edits"][:40]
    )
    return (f"<h2>Editing</h2><p class='muted'>{html.escape(details.get('edit_note', ''))}</p>"
            f"<table><tr><th>edit / kept</th>{head}</tr>{body}</table>"
            f"<table><tr><th>input</th><th>instruction</th><th>output</th><th>judged</th></tr>{rows}</table>")  # fmt: skip
