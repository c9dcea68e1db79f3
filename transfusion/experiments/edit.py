"""`transfusion experiment edit`: the paper's section 4.4 in miniature. A trained model (the demo's, or
``--from CKPT``) is fine-tuned on N shape-scene edits (``data/edits.py``: input image, instruction,
output image) in each arm (full fine-tuning, LoRA of rank 4 and 32) at equal steps, seeds apart, and
every run is judged on the same held-out edits:

- per kind: **edit** (the detector reads the output and the named object changed as instructed),
  **kept** (every object the instruction did not name is still there, same shape, colour and place)
  and **exact** (the whole scene is the instructed one), on held-out scenes, half of them in
  combinations training never held;
- two baselines on the same inputs: the input returned unchanged (kept 1, edit 0) and the base model
  drawing a caption of the target scene (text to image);
- what each arm costs: trained parameters, adapter size beside the checkpoint's, peak memory (the
  training process's maximum resident set) and seconds per step;
- what it forgets: text bits per byte on held-out captions and caption accuracy, beside the base's.

Each run trains in its own process (``transfusion train``), so its peak memory is its own. Results go
to ``results.json`` and ``edit.html`` (a table, and before / instruction / after grids); ``--resume``
skips runs already trained and judged.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transfusion.errors import UserError
from transfusion.recipe import note

ARMS: dict[str, dict[str, Any]] = {
    "full": {"lora_rank": 0, "lr": 1e-3},
    "lora4": {"lora_rank": 4, "lr": 3e-3},
    "lora32": {"lora_rank": 32, "lr": 3e-3},
    "lora32-replay": {"lora_rank": 32, "lr": 3e-3, "scene_share": 0.5},
}
"""The arms and their learning rates (LoRA's adapters take a larger step than whole weights). The
``-replay`` arm draws half its items from the base's own captioned scenes (``data.scene_share``), with
the base's caption settings: not run by default."""
DEFAULT_ARMS = ("full", "lora4", "lora32")
REPLAYED = ("caption_first_prob", "cond_dropout", "canonical_relations", "pairs_in_reading_order",
            "descriptive_captions", "position_share", "describe_in_reading_order", "max_objects")  # fmt: skip
"""The base's data settings a replaying arm takes, so the scenes it replays are worded as the base read them."""
TARGETS = {
    "edit": {"recolour": 0.8, "remove": 0.8, "add": 0.6, "move": 0.6, "swap": 0.6},
    "kept": 0.9,
    "lora32_gap": 0.05,
    "lora_params_share": 0.05,
    "adapter_size_share": 0.05,
    "bpb_change": 0.01,
}
"""The issue's targets, met when the worst seed meets them."""


BPB_MEASURE = "the base's held-out captions, each before its image"


@dataclass
class EditSettings:
    base: str
    examples: list[int] = field(default_factory=lambda: [8000, 1000])
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: int = 2
    steps: int = 900
    per_kind: int = 10
    sample_steps: int = 100
    captions: int = 50
    extra: list[str] = field(default_factory=list)


def resolve_base(path: str | None) -> Path:
    """``--from`` or the newest demo's model (``runs/demo``)."""
    base = Path(path) if path else Path("runs/demo/model")
    if not base.exists():
        raise UserError(
            f"{base} does not exist: train the demo first (transfusion demo), or give --from CKPT "
            "(a run, a checkpoint or a model directory)"
        )
    return base.resolve()


def run_name(arm: str, examples: int, seed: int) -> str:
    return f"{arm}-n{examples}-s{seed}"


def train_arm(out: Path, s: EditSettings, arm: str, examples: int, seed: int) -> dict[str, Any]:
    """One fine-tuning run in its own process; its wall time and peak resident memory."""
    spec = ARMS[arm]
    cmd = [sys.executable, "-m", "transfusion", "train", "--out", str(out), "--init-checkpoint", s.base,
           "--data", "shape-edits", "--steps", str(s.steps), "--no-progress",
           "--set", f"data.length={examples}", "--set", f"data.seed={seed}", "--set", f"train.seed={seed}",
           "--set", f"train.lr={spec['lr']}", "--set", f"train.min_lr={spec['lr'] / 10}",
           "--set", f"train.warmup_steps={max(1, s.steps // 10)}", "--set", "train.eval_every=0",
           "--set", f"train.ckpt_every={s.steps}", "--set", "train.ema_decay=0", "--set", "train.keep_last=1",
           "--set", "train.batch_size=16", "--set", "train.seq_len=128"]  # fmt: skip
    if spec["lora_rank"]:
        cmd += ["--lora-rank", str(spec["lora_rank"])]
    if spec.get("scene_share"):
        from transfusion.training.setup import checkpoint_config

        data = checkpoint_config(s.base)[0].data
        cmd += ["--set", f"data.scene_share={spec['scene_share']}"]
        cmd += [x for k in REPLAYED for x in ("--set", f"data.{k}={json.dumps(getattr(data, k))}")]
    cmd += [x for kv in s.extra for x in ("--set", kv)]
    started = time.time()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory (ru_maxrss, KB on Linux)
        except BaseException:  # interrupted: the run must not go on writing into a directory left behind
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(
            f"fine-tuning {out.name} failed (exit {proc.returncode}):\n{log.read_text()[-2000:]}"
        )
    seconds = time.time() - started
    peak = usage.ru_maxrss / 1024
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = statistics.median(1 / x["tokens_per_s"] * 16 * 128 for x in lines if x["tokens_per_s"] > 0)
    return {"train_seconds": seconds, "seconds_per_step": per_step, "peak_rss_mb": peak,
            "final_image_loss": lines[-1]["image_loss"], "final_text_loss": lines[-1]["text_loss"]}  # fmt: skip


def _die_with_parent() -> None:
    """In the training child, before it starts: Linux sends it SIGTERM (a checkpoint, then exit) if the
    experiment's process dies first, so no orphan goes on training into the experiment's directory."""
    import ctypes
    import signal
    import sys as _sys

    if _sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def judge_images(items: list, images: list) -> list[dict]:
    """Each held-out edit's image (an output, the input itself, a baseline's) read and judged against it."""
    from transfusion.data.edits import judge_edit
    from transfusion.evaluation.scenes import detect_scene

    return [{"kind": r.meta["kind"], "held_out": r.meta["held_out"], "text": r.text, "image": im,
             **judge_edit(detect_scene(im), r.meta)} for r, im in zip(items, images)]  # fmt: skip


def judge_outputs(pipe: Any, items: list, seed: int, steps: int, adapter: str | None = None) -> list[dict]:
    """Every held-out edit drawn (edit i seeded ``seed + i``) and judged."""
    images = pipe.edit([r.image for r in items], [r.text for r in items], steps=steps, seed=seed, progress=False,
                       adapter=adapter)  # fmt: skip
    return judge_images(items, images)


def per_kind(rows: list[dict]) -> dict[str, dict[str, float]]:
    from transfusion.data.edits import EDIT_KINDS

    out = {}
    for kind in (*EDIT_KINDS, "all"):
        mine = [r for r in rows if kind == "all" or r["kind"] == kind]
        out[kind] = {m: sum(r[m] for r in mine) / len(mine) for m in ("edit", "kept", "exact")}
        held = [r for r in mine if r["held_out"]]
        out[kind]["edit_held_out"] = sum(r["edit"] for r in held) / len(held) if held else None
    return out


def held_out_captions(base_pipe: Any, n: int = 400) -> list[str]:
    """Held-out captions of the data the base was trained on (its own 'val' split: the wording it knows)."""
    from transfusion.data.sources import iterate, make_source

    data = base_pipe.config.data
    if data.source == "latents" or data.source == "shape-edits":
        from transfusion.config import DataConfig

        data = DataConfig()
    texts = []
    for record in iterate(make_source(data, "val")):
        if record is not None and record.text:
            texts.append(record.text)
        if len(texts) == n:
            break
    return texts


def forgetting(pipe: Any, texts: list[str], image_size: int, captions: int) -> dict[str, float]:
    """Text bits per byte on held-out captions of the base's data (each as the caption of a caption-first
    pair, as the base read them in training), and caption accuracy on held-out scenes."""
    from transfusion.evaluation.shapes import captioning
    from transfusion.evaluation.text import text_scores

    bpb = text_scores(pipe.model, pipe.tokenizer, texts, before_image=True)["text_bits_per_byte"]
    caps, _ = captioning(pipe.decoder, pipe.vae, captions, image_size, seed=99)
    return {"text_bits_per_byte": bpb, "caption_accuracy": caps["caption_accuracy"]}


def costs(run: Path, arm: str, base_pipe: Any) -> dict[str, Any]:
    """Trained parameters (and their share), the adapter's size beside the checkpoint's weights."""
    from transfusion import lora

    total = sum(p.numel() for p in base_pipe.model.parameters())
    weights = base_pipe.model.state_dict()
    checkpoint_bytes = sum(v.numel() * v.element_size() for v in weights.values())
    if not ARMS[arm]["lora_rank"]:
        return {"trained_params": total, "trained_share": 1.0, "file_bytes": checkpoint_bytes,
                "file_share": 1.0, "checkpoint_bytes": checkpoint_bytes}  # fmt: skip
    config, tensors = lora.read_adapter(run / "adapter")
    trained = sum(v.numel() for v in tensors.values())
    size = (run / "adapter" / lora.WEIGHTS_FILE).stat().st_size
    return {"trained_params": trained, "trained_share": trained / total, "file_bytes": size,
            "file_share": size / checkpoint_bytes, "checkpoint_bytes": checkpoint_bytes}  # fmt: skip


def run_edit_experiment(out: Path, s: EditSettings, resume: bool = False) -> dict[str, Any]:
    """Every run (N x seed x arm) trained, judged and recorded, then the summary and the page."""
    import torch

    with torch.no_grad():  # only evaluation runs in this process (training runs in its children)
        return _run_edit_experiment(out, s, resume)


def _run_edit_experiment(out: Path, s: EditSettings, resume: bool) -> dict[str, Any]:

    from transfusion.data.edits import edit_eval_items, target_caption
    from transfusion.pipeline import Pipeline

    out.mkdir(parents=True, exist_ok=True)
    base_pipe = Pipeline.from_pretrained(s.base, "cpu")
    size = base_pipe.image_size
    items = edit_eval_items(s.per_kind, image_size=size)
    texts = held_out_captions(base_pipe)
    if resume and (out / "settings.json").is_file():  # runs done with other settings would not compare
        before = json.loads((out / "settings.json").read_text())
        fixed = ("base", "steps", "per_kind", "sample_steps", "captions", "extra")
        changed = [k for k in fixed if before.get(k) != asdict(s)[k]]
        if changed:
            raise UserError(
                f"--resume: {out} ran with {changed[0]}={before[changed[0]]!r}, not {asdict(s)[changed[0]]!r}"
            )
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=2))
    results_file = out / "runs.json"
    done: dict[str, Any] = json.loads(results_file.read_text()) if resume and results_file.is_file() else {}
    if "base" not in done:
        note("[base] baselines and the base model's text and captions")
        unchanged = judge_images(items, [r.image for r in items])
        drawn = base_pipe.text_to_image(
            [target_caption(r.meta) for r in items], steps=s.sample_steps, progress=False
        )
        t2i = judge_images(items, drawn)
        before = judge_outputs(base_pipe, items, 0, s.sample_steps)
        done["base"] = {"unchanged": per_kind(unchanged), "text_to_image": per_kind(t2i), "base_edit": per_kind(before),
                        **forgetting(base_pipe, texts, size, s.captions)}  # fmt: skip
        save_grid(out / "grid-text_to_image.png", items, drawn)
        results_file.write_text(json.dumps(done, indent=2))
    for examples in s.examples:  # every arm of a seed before the next seed: a stopped run has whole seeds
        for seed in range(s.seeds):
            for arm in s.arms:
                name = run_name(arm, examples, seed)
                if name in done:
                    continue
                run = out / "runs" / name
                if run.exists():
                    import shutil

                    shutil.rmtree(run)  # a run stopped half-way starts again
                note(f"[{name}] fine-tuning {s.steps} steps on {examples} edits")
                facts = train_arm(run, s, arm, examples, seed)
                pipe = Pipeline.from_pretrained(run, "cpu")
                rows = judge_outputs(pipe, items, 0, s.sample_steps)
                done[name] = {"arm": arm, "examples": examples, "seed": seed, **facts, **costs(run, arm, base_pipe),
                              "kinds": per_kind(rows), **forgetting(pipe, texts, size, s.captions),
                              "bpb_measure": BPB_MEASURE}  # fmt: skip
                if seed == 0:
                    save_grid(out / f"grid-{arm}-n{examples}.png", items, [r["image"] for r in rows])
                results_file.write_text(json.dumps(done, indent=2))
                k = done[name]["kinds"]["all"]
                note(f"[{name}] edit {k['edit']:.2f} kept {k['kept']:.2f} exact {k['exact']:.2f} "
                     f"bpb {done[name]['text_bits_per_byte']:.3f} ({facts['train_seconds']:.0f} s)")  # fmt: skip
    for name, run in done.items():  # measured before this version of the text measure: again
        if run.get("bpb_measure") != BPB_MEASURE:
            pipe = base_pipe if name == "base" else Pipeline.from_pretrained(out / "runs" / name, "cpu")
            run.update(forgetting(pipe, texts, size, s.captions), bpb_measure=BPB_MEASURE)
            results_file.write_text(json.dumps(done, indent=2))
    summary = summarise(done, s)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    write_page(out, summary, s)
    return summary


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(done: dict[str, Any], s: EditSettings) -> dict[str, Any]:
    """Median and range over seeds of every number, per arm and N; the targets, judged on the worst seed."""
    from transfusion.data.edits import EDIT_KINDS

    table: dict[str, Any] = {}
    ran = [r for name, r in done.items() if name != "base"]  # every run done so far, whatever this call asked
    for examples in sorted({r["examples"] for r in ran}, reverse=True):
        for arm in [a for a in ARMS if any(r["arm"] == a for r in ran)]:
            runs = [r for r in ran if r["arm"] == arm and r["examples"] == examples]
            if not runs:
                continue
            row: dict[str, Any] = {}
            for kind in (*EDIT_KINDS, "all"):
                for m in ("edit", "kept", "exact", "edit_held_out"):
                    vals = [r["kinds"][kind][m] for r in runs if r["kinds"][kind][m] is not None]
                    if vals:
                        row[f"{kind}.{m}"] = spread(vals)
            for m in ("text_bits_per_byte", "caption_accuracy", "seconds_per_step", "peak_rss_mb", "train_seconds",
                      "trained_params", "trained_share", "file_bytes", "file_share"):  # fmt: skip
                vals = [r[m] for r in runs if r.get(m) is not None]
                if vals:
                    row[m] = spread(vals)
            table[f"{arm}-n{examples}"] = row
    base = done.get("base", {})
    return {"settings": asdict(s), "arms": table, "base": base, "targets": targets(table, base, s)}


def targets(table: dict[str, Any], base: dict[str, Any], s: EditSettings) -> list[dict[str, Any]]:
    """The issue's targets on the largest N, each met when the worst seed meets it."""
    n = max(int(name.rsplit("-n", 1)[1]) for name in table) if table else max(s.examples)
    out = []

    def add(what: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": what, "worst": value, "goal": goal, "met": met})

    for arm in ARMS:
        row = table.get(f"{arm}-n{n}")
        if not row:
            continue
        for kind, goal in TARGETS["edit"].items():
            worst = row[f"{kind}.edit"]["min"]
            add(f"{arm} n={n}: edit accuracy, {kind}", worst, f">= {goal}", worst >= goal)
            worst_kept = row[f"{kind}.kept"]["min"]
            add(
                f"{arm} n={n}: kept, {kind}",
                worst_kept,
                f">= {TARGETS['kept']}",
                worst_kept >= TARGETS["kept"],
            )
    full, l32 = table.get(f"full-n{n}"), table.get(f"lora32-n{n}")
    if full and l32:
        gap = full["all.edit"]["min"] - l32["all.edit"]["min"]
        add(
            f"lora32 within 0.05 of full on edit accuracy (n={n}, worst seeds)",
            gap,
            "<= 0.05",
            gap <= TARGETS["lora32_gap"],
        )
        share = l32["trained_share"]["max"]
        add("lora32 trained parameters / all", share, "<= 0.05", share <= TARGETS["lora_params_share"])
        fshare = l32["file_share"]["max"]
        add(
            "lora32 adapter file / checkpoint weights",
            fshare,
            "<= 0.05",
            fshare <= TARGETS["adapter_size_share"],
        )
    for arm in ("lora4", "lora32"):
        row = table.get(f"{arm}-n{n}")
        if row and base.get("text_bits_per_byte"):
            change = row["text_bits_per_byte"]["max"] / base["text_bits_per_byte"] - 1
            add(f"{arm} text bits per byte vs the base's", change, "<= +1%", change <= TARGETS["bpb_change"])
    return out


def save_grid(path: Path, items: list, outputs: list, cell: int = 64) -> None:
    """Before / after pairs, the instruction under each: the first two edits of every kind."""
    from PIL import Image, ImageDraw

    chosen = []
    for kind in dict.fromkeys(r.meta["kind"] for r in items):
        chosen += [i for i, r in enumerate(items) if r.meta["kind"] == kind][:2]
    cols = 5
    rows = -(-len(chosen) // cols)
    grid = Image.new("RGB", (cols * (2 * cell + 8), rows * (cell + 30)), "white")
    draw = ImageDraw.Draw(grid)
    for k, i in enumerate(chosen):
        x, y = (k % cols) * (2 * cell + 8), (k // cols) * (cell + 30)
        grid.paste(items[i].image.resize((cell, cell), Image.NEAREST), (x, y))
        grid.paste(outputs[i].resize((cell, cell), Image.NEAREST), (x + cell, y))
        text = items[i].text
        draw.text((x + 2, y + cell + 2), text[:26], fill="black")
        draw.text((x + 2, y + cell + 14), text[26:52], fill="black")
    grid.save(path)


def write_page(out: Path, summary: dict[str, Any], s: EditSettings) -> None:
    """edit.html: the table (median, range over seeds) per kind and arm, the targets, the grids."""
    import html

    from transfusion.data.edits import EDIT_KINDS

    def cell(row: dict[str, Any], key: str, pct: bool = False) -> str:
        v = row.get(key)
        if not v:
            return "–"
        f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.2f}")
        return f"{f(v['median'])} <small>({f(v['min'])}–{f(v['max'])})</small>"

    head = "".join(f"<th>{k} edit / kept</th>" for k in (*EDIT_KINDS, "all"))
    lines = [f"<tr><th>arm</th>{head}<th>exact</th><th>bpb</th><th>caption acc.</th><th>trained</th><th>file</th>"
             "<th>s/step</th><th>peak MB</th></tr>"]  # fmt: skip
    for name, row in summary["arms"].items():
        kinds = "".join(
            f"<td>{cell(row, f'{k}.edit')}<br>{cell(row, f'{k}.kept')}</td>" for k in (*EDIT_KINDS, "all")
        )
        lines.append(f"<tr><td>{name}</td>{kinds}<td>{cell(row, 'all.exact')}</td><td>{cell(row, 'text_bits_per_byte')}</td>"
                     f"<td>{cell(row, 'caption_accuracy')}</td><td>{cell(row, 'trained_share', True)}</td>"
                     f"<td>{cell(row, 'file_share', True)}</td><td>{cell(row, 'seconds_per_step')}</td>"
                     f"<td>{cell(row, 'peak_rss_mb')}</td></tr>")  # fmt: skip
    base = summary["base"]
    for label in ("unchanged", "text_to_image", "base_edit"):
        if label in base:
            kinds = "".join(
                f"<td>{base[label][k]['edit']:.2f}<br>{base[label][k]['kept']:.2f}</td>"
                for k in (*EDIT_KINDS, "all")
            )
            lines.append(f"<tr><td><i>{label.replace('_', ' ')}</i></td>{kinds}<td>{base[label]['all']['exact']:.2f}</td>"
                         + (f"<td>{base['text_bits_per_byte']:.3f}</td><td>{base['caption_accuracy']:.2f}</td>" if label == "base_edit" else "<td></td><td></td>")
                         + "<td></td><td></td><td></td><td></td></tr>")  # fmt: skip
    goals = "".join(
        f"<li>{'met' if t['met'] else 'NOT met'}: {html.escape(t['target'])}: {t['worst']:.3f} ({t['goal']})</li>"
        for t in summary["targets"]
    )
    grids = "".join(
        f'<figure><img src="{p.name}"><figcaption>{p.stem}</figcaption></figure>'
        for p in sorted(out.glob("grid-*.png"))
    )
    page = f"""<!doctype html><meta charset="utf-8"><title>Editing: fine-tuning on shape-scene edits</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;font-size:13px}}
img{{image-rendering:pixelated;max-width:100%}}</style>
<h1>Editing (the paper's section 4.4, in miniature)</h1>
<p>Base: {html.escape(s.base)}; {s.steps} steps per run, {s.seeds} seeds, {s.per_kind} held-out edits per kind
({s.sample_steps} denoising steps). Cells: median (range over seeds).</p>
<table>{"".join(lines)}</table><h2>Targets (worst seed)</h2><ul>{goals}</ul><h2>Before / after (seed 0)</h2>{grids}"""
    (out / "edit.html").write_text(page)
