"""``report.html``: one self-contained page (inline CSS, SVG curves, base64 PNGs, no scripts) that shows
what a run learned, failures first: the headline scores per kind with the share of blank images,
failed generations beside successful ones for every kind, loss curves, every generated image with
its prompt, captions next to the truth, the metrics, the configuration and the time spent."""

from __future__ import annotations

import base64
import html
import io
import json
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


def svg_curve(
    points: list[tuple[float, float]], title: str, color: str, width: int = 480, height: int = 220
) -> str:
    """A line chart of (step, value) points with labelled axes, as inline SVG."""
    if not points:
        return f"<p class='muted'>{html.escape(title)}: no data</p>"
    pad = 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad + (y - y0) / (y1 - y0) * -(height - 2 * pad)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))
    return f"""<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img">
<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>
<text x="{pad}" y="{height - pad + 16}" font-size="11">{x0:g}</text>
<text x="{width - pad}" y="{height - pad + 16}" font-size="11" text-anchor="end">step {x1:g}</text>
<text x="{pad - 4}" y="{sy(y1) + 4:.1f}" font-size="11" text-anchor="end">{y1:.3g}</text>
<text x="{pad - 4}" y="{sy(y0) + 4:.1f}" font-size="11" text-anchor="end">{y0:.3g}</text>
<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>
</svg>"""


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
    text = [(r["step"], r["text_loss"]) for r in log if "text_loss" in r]
    image = [(r["step"], r["image_loss"]) for r in log if "image_loss" in r]
    val_text = [(r["step"], r["val_text_loss"]) for r in log if "val_text_loss" in r]
    val_image = [(r["step"], r["val_image_loss"]) for r in log if "val_image_loss" in r]
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
<div class="curves">{svg_curve(text, "text loss (train)", "#1f77b4")}{svg_curve(image, "image loss (train)", "#d62728")}
{svg_curve(val_text, "text loss (validation)", "#2ca02c") if val_text else ""}
{svg_curve(val_image, "image loss (validation)", "#9467bd") if val_image else ""}</div>
<h2>Images generated for held-out prompts</h2>{_cells(generated)}
<h2>Captions of held-out images</h2>
<table><tr><th>image</th><th>model's caption</th><th>truth</th><th></th></tr>{captions}</table>
<h2>Time spent</h2><table>{times}</table>
<h2>Configuration</h2><pre>{html.escape(config)}</pre>
</body></html>
"""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path
