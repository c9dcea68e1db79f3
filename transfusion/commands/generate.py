"""`transfusion generate`: images, text or both from a prompt, with a trained checkpoint.

Writes every image as a PNG decoded through the checkpoint's VAE (or, for a checkpoint without one,
its latent as a ``.safetensors`` file), plus ``output.json`` and ``output.md`` with the interleaved
output. By default BOI is forced after the prompt (text-to-image); ``--text`` lets the model decide
when to draw. Example::

    transfusion generate --checkpoint runs/demo/model --prompt "a red circle" --num-images 4

An image before the prompt and a forced BOI after it is an edit (the paper's section 4.4 sequence: image,
instruction, image), decoded the same way; guidance is then off unless ``--cfg`` says otherwise
(``pipeline.EDIT_GUIDANCE``)::

    transfusion generate --checkpoint runs/edit --image in.png --prompt "make the circle blue"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from transfusion.commands.options import (
    add_adapter_option,
    add_checkpoint_option,
    add_device_option,
    note,
    out_dir,
    pick_device,
)
from transfusion.errors import UserError
from transfusion.generate import GenerationConfig


def add_generation_options(p: argparse.ArgumentParser, images: bool = True) -> None:
    """Options shared by ``generate`` and ``caption`` (which draws no images: no diffusion options)."""
    add_checkpoint_option(p)
    add_adapter_option(p)
    if images:
        p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's, 250)")
        p.add_argument(
            "--sampler",
            choices=["ddpm", "ddim", "flow"],
            default=None,
            help="ddpm (ancestral, the default), ddim (deterministic) or flow (for flow-matching models)",
        )
        p.add_argument(
            "--cfg",
            type=float,
            default=None,
            help="classifier-free guidance weight (default: the config's, 3; 1 = off; off for an edit: "
            "--image before the prompt, BOI forced)",
        )
        add_guidance_interval_option(p)
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="text sampling temperature, 0 = greedy (default: 1 for generate, 0 for caption)",
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="text tokens to generate at most, per output"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first output; output i uses seed + i")
    add_device_option(p)


def add_guidance_interval_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guidance-max-t", default=None, metavar="T|all",
        help="guide only at timesteps t <= T (the conditional prediction alone above); 'all' guides every "
        "step, as the paper (default: the checkpoint's diffusion.guidance_max_t)",
    )  # fmt: skip


def add_relation_wording_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--relation-wording", choices=["auto", "as-written", "reading-order"], default="auto",
        help="shape-scene prompts that state a relation: 'reading-order' gives the model \"X below Y\" as "
        "\"Y above X\" (and \"to the right of\" as \"to the left of\"), the same scene; 'auto' does so for "
        "a checkpoint trained on relations stated only that way (data.canonical_relations 1)",
    )  # fmt: skip


def guidance_max_t(args: argparse.Namespace) -> int | None:
    """The option as ``GenerationConfig.guidance_max_t``: -1 (the checkpoint's), None ('all') or T."""
    value = getattr(args, "guidance_max_t", None)
    if value is None:
        return -1
    if value == "all":
        return None
    try:
        t = int(value)
    except ValueError:
        t = -1
    if t < 0:
        raise UserError(f"--guidance-max-t {value!r}: give a timestep (0-999) or 'all'")
    return t


def generation_config(
    args: argparse.Namespace, pipe: Any, temperature: float = 1.0, **kw: Any
) -> GenerationConfig:
    """The sampling settings the options ask for (``Pipeline.settings``: sampler/steps/cfg left None
    are the checkpoint's)."""
    return pipe.settings(
        max_new_tokens=args.max_new_tokens,
        temperature=temperature if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        sampler=getattr(args, "sampler", None),
        steps=getattr(args, "steps", None),
        guidance=getattr(args, "cfg", None),
        guidance_max_t=guidance_max_t(args),
        **kw,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_generation_options(p)
    p.add_argument("--prompt", required=True, help="the text to continue (may be empty after --image)")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image placed before the prompt text (repeatable, in order): image-first prompts such as "
        "'--image cat.png --prompt \"what colour is it?\" --text'",
    )
    p.add_argument(
        "--resize", action="store_true", help="resize and centre-crop --image files of another size"
    )
    p.add_argument(
        "--num-images", type=int, default=1, help="outputs to generate, one batch row each (default 1)"
    )
    p.add_argument(
        "--text",
        action="store_true",
        help="continue the prompt as text, drawing images only when the model emits BOI "
        "(default: text-to-image, BOI forced after the prompt)",
    )
    p.add_argument("--max-images", type=int, default=1, help="images per output at most (default 1)")
    add_relation_wording_option(p)
    p.add_argument("--out", default="generated", help="output directory (default ./generated)")


def run(args: argparse.Namespace) -> int:
    from transfusion.pipeline import Pipeline, progress_bar

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    out = out_dir(args.out)
    if not args.prompt and not args.image:
        raise ValueError("give a --prompt, an --image, or both")
    pipe = Pipeline.from_pretrained(args.checkpoint, pick_device(args.device), adapters=args.adapter)
    editing = bool(args.image) and not args.text and args.cfg is None
    if editing:
        from transfusion.pipeline import EDIT_GUIDANCE

        args.cfg = EDIT_GUIDANCE  # the twin (BOS BOI) does not hold the input image: guiding would leave it
        note(
            f"note: an edit (image, then text, then an image): guidance {EDIT_GUIDANCE} unless --cfg says otherwise"
        )
    gen = generation_config(args, pipe, max_images=args.max_images, force_image=not args.text,
                            stop_after_image=not args.text)  # fmt: skip
    notes: list[str] = []
    images = [Path(f) for f in args.image]  # in a prompt a str is text: files go in as paths
    prompt = pipe.prompt(
        [*images, *([args.prompt] if args.prompt else [])], args.relation_wording, args.resize, notes
    )
    for line in notes:
        note(f"note: {line}")
    given = prompt[-1] if args.prompt else ""
    if given != args.prompt:
        note(f"note: the model reads relations in reading order; prompted with {given!r}")
    n = args.num_images
    seeds = [args.seed + i for i in range(n)]
    total = None if args.text else n * gen.steps  # rows x steps when every output is one forced image
    with progress_bar(True, total, "denoising") as progress:
        outputs = pipe.run([prompt] * n, gen, seeds, progress)
    out.mkdir(parents=True, exist_ok=True)
    title = " ".join(
        [f"[image: {Path(f).name}]" for f in args.image] + ([args.prompt] if args.prompt else [])
    )
    record, md = [], [f"# {title}\n"]
    for i, segments in enumerate(outputs):
        row: list[dict[str, str]] = []
        md.append(f"\n## output {i} (seed {seeds[i]})\n\n")
        for j, seg in enumerate(segments):
            if isinstance(seg, str):
                row.append({"text": seg})
                md.append(seg + "\n\n")
                continue
            name = save_image(seg, out / f"output{i}_image{j}", pipe)
            row.append({"image": name})
            md.append(f"![output {i}, image {j}]({name})\n\n")
        record.append(row)
    settings = {
        k: getattr(gen, k)
        for k in ("sampler", "steps", "cfg_scale", "guidance_max_t", "temperature", "top_k", "top_p")
    }
    meta = {"prompt": args.prompt, "prompt_given": given, "prompt_images": args.image, "checkpoint": str(pipe.path), "seeds": seeds,
            "settings": settings}  # fmt: skip
    (out / "output.json").write_text(json.dumps({**meta, "outputs": record}, indent=2, ensure_ascii=False))
    (out / "output.md").write_text("".join(md))
    why = f" ({pipe.missing_vae()}: images saved as latents, .safetensors)" if pipe.vae is None else ""
    print(f"wrote {n} output(s) to {out}{why}")
    return 0


def save_image(latent: torch.Tensor, stem: Path, pipe: Any) -> str:
    """A PNG decoded through the pipeline's VAE, or without one the latent as safetensors; returns the
    file name."""
    if pipe.vae is None:
        from safetensors.torch import save_file

        save_file({"latent": latent.contiguous().cpu()}, stem.with_suffix(".safetensors"))
        return stem.name + ".safetensors"
    pipe.to_pil([latent])[0].save(stem.with_suffix(".png"))
    return stem.name + ".png"
