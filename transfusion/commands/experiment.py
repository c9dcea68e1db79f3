"""`transfusion experiment NAME`: reproduce one of the paper's findings in miniature.

Each experiment trains its arms (one knob changed, the same data stream and seeds) at several
training-FLOP budgets and seeds, evaluates every point the same way, and writes results.json, plots,
experiment.html and a verdict per finding (reproduced, not reproduced, or inconclusive at this
budget). The budget (``--minutes``) is shared out and the plan is shown before any point trains;
``--resume`` continues a stopped experiment without training finished points again (and, with
``--budgets`` or ``--seeds``, adds points). ``--dataset fashion_mnist`` runs the same arms on real
garment images, read by a judge trained on them; every diffusion arm also reports the held-out
denoising loss by band of t and patch position.

``edit`` is of another kind: it fine-tunes a trained model (the demo's, or ``--from CKPT``) on
shape-scene edits, full fine-tuning against LoRA ranks 4 and 32 at equal steps, and judges the edits
(``transfusion.experiments.edit``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transfusion.commands.options import new_out_dir, note, out_dir
from transfusion.config import Config
from transfusion.errors import UserError
from transfusion.experiments import EXPERIMENTS, Settings, run_experiment
from transfusion.experiments.definitions import DATASETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    lines = [f"  {name:<13} {e.title} ({e.minutes:g} min)" for name, e in EXPERIMENTS.items()]
    lines.append(
        f"  {'edit':<13} fine-tuning on image edits: full vs LoRA rank 4 and 32 (section 4.4; about 90 min)"
    )
    p.epilog = "experiments:\n" + "\n".join(lines)
    p.add_argument(
        "name", choices=sorted([*EXPERIMENTS, "edit"]), metavar="NAME", help="which experiment (listed below)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="total budget, shared assets and evaluation included (default: the experiment's, 30-45)",
    )
    p.add_argument("--dataset", choices=DATASETS, default="shapes",
                   help="what the arms train and are judged on: shapes (the built-in scenes; GenEval-style composition, FD in "
                        "a scene classifier's features) or fashion_mnist (Debian's real garment images; the judge's class "
                        "accuracy, FD in its features against the 10,000 real test images). Not for edit")  # fmt: skip
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per point (default 2). With --resume, --seeds and --budgets add points to the plan "
                        "(sized with its FLOP unit; the points already run stay)")  # fmt: skip
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="training budgets as multiples of the FLOP unit (default: the experiment's, e.g. 1 2 4)")  # fmt: skip
    p.add_argument("--prompts-per-kind", type=int, default=None,
                   help="held-out prompts per GenEval kind (default 10), or per class on fashion_mnist (default 30)")  # fmt: skip
    p.add_argument(
        "--captions", type=int, default=50, help="held-out images to caption per point (default 50)"
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help="denoising steps when evaluating (default 250; edit: 100)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="change every arm's configuration, e.g. --set model.dim=64 (repeatable)")  # fmt: skip
    p.add_argument(
        "--out", default=None, help="experiment directory (default runs/experiment-NAME-<date>-<time>)"
    )
    p.add_argument("--resume", action="store_true", help="continue the experiment in --out where it stopped")
    edit = p.add_argument_group("edit")
    edit.add_argument("--from", dest="base", default=None,
                      help="edit: the model to fine-tune (default runs/demo/model, the newest demo's)")  # fmt: skip
    edit.add_argument("--examples", type=int, nargs="+", default=[8000, 1000],
                      help="edit: training edits per run (default 8000 1000)")  # fmt: skip
    edit.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                      help="edit: full, lora4, lora32 (the default three), lora32-replay (half the items the base's own scenes)")  # fmt: skip
    edit.add_argument("--steps", type=int, default=900, help="edit: optimizer steps per run (default 900)")
    edit.add_argument(
        "--edits-per-kind", type=int, default=20, help="edit: held-out edits per kind (default 20)"
    )


def run(args: argparse.Namespace) -> int:
    if args.name == "edit":
        if args.dataset != "shapes":
            raise UserError(
                "experiment edit fine-tunes on shape-scene edits; --dataset is for the other experiments"
            )
        return run_edit(args)
    exp = EXPERIMENTS[args.name]
    minutes = args.minutes if args.minutes is not None else exp.minutes
    seeds_given, args.seeds = args.seeds is not None, args.seeds or 2
    if args.prompts_per_kind is None:
        args.prompts_per_kind = 30 if args.dataset == "fashion_mnist" else 10
    if minutes <= 0 or args.seeds < 1 or args.prompts_per_kind < 1 or args.captions < 1:
        raise UserError("--minutes, --seeds, --prompts-per-kind and --captions must be positive")
    Config().override(args.set)  # a wrong key or type is a one-line error before any work
    if args.resume:
        if not args.out or not Path(args.out).is_dir():
            raise UserError("--resume needs --out naming the directory of the experiment to continue")
        out = out_dir(args.out)
    else:
        out = new_out_dir(args.out or time.strftime(f"runs/experiment-{args.name}-%Y%m%d-%H%M%S"))
    budgets = list(args.budgets or exp.budgets)
    if any(b <= 0 for b in budgets):
        raise UserError("--budgets must be positive multiples")
    settings = Settings(minutes, args.seeds, budgets, args.prompts_per_kind, args.captions, args.set,
                        args.sample_steps, args.dataset)  # fmt: skip
    extend = args.resume and (args.budgets is not None or seeds_given)
    results = run_experiment(exp, out, settings, resume=args.resume, extend=extend)
    for v in results["verdicts"]:
        print(v["text"])
    for line in results.get("guidance", []):
        print(line)
    note(f"wrote {out / 'results.json'} and {out / 'experiment.html'}")
    return 0


def run_edit(args: argparse.Namespace) -> int:
    from transfusion.experiments.edit import (
        ARMS,
        DEFAULT_ARMS,
        EditSettings,
        resolve_base,
        run_edit_experiment,
    )

    arms = args.arms or list(DEFAULT_ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms {unknown[0]!r}: choose from {', '.join(ARMS)}")
    if args.steps < 1 or args.seeds < 1 or args.edits_per_kind < 2 or any(n < 1 for n in args.examples):
        raise UserError("--steps, --seeds and --examples must be positive, --edits-per-kind at least 2")
    Config().override(args.set)
    base = resolve_base(args.base)
    if args.resume:
        if not args.out or not Path(args.out).is_dir():
            raise UserError("--resume needs --out naming the directory of the experiment to continue")
        out = out_dir(args.out)
    else:
        out = new_out_dir(args.out or time.strftime("runs/experiment-edit-%Y%m%d-%H%M%S"))
    settings = EditSettings(str(base), list(args.examples), arms, args.seeds, args.steps, args.edits_per_kind,
                            args.sample_steps or 100, args.captions, list(args.set))  # fmt: skip
    summary = run_edit_experiment(out, settings, resume=args.resume)
    for t in summary["targets"]:
        print(f"{'met' if t['met'] else 'NOT met'}: {t['target']}: {t['worst']:.3f} ({t['goal']})")
    note(f"wrote {out / 'results.json'} and {out / 'edit.html'}")
    return 0
