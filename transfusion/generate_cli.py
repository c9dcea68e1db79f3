"""Generate text, images or both from a prompt with a trained checkpoint.

Writes every image as a PNG (decoded through the checkpoint's VAE), plus ``output.json`` and
``output.md`` with the interleaved output. Example::

    transfusion generate --checkpoint runs/demo/model --prompt "a red circle" --num-images 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from transfusion.generate import Decoder, GenerationConfig


def load_for_inference(checkpoint: str, device: str = "cpu"):
    """(model, config, tokenizer, vae or None) from a checkpoint or run directory."""
    from transfusion.checkpoint import load_model
    from transfusion.vae import load_vae

    loaded = load_model(checkpoint, device)
    vae = None
    if loaded.meta.get("vae"):
        vae_dir = (loaded.path / loaded.meta["vae"]).resolve()
        if vae_dir.is_dir():
            vae = load_vae(vae_dir, device)
    return loaded, vae


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint directory, or a run directory (its latest)"
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's, 250)")
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim", "flow"],
        default=None,
        help="default: ddpm (flow for flow models)",
    )
    p.add_argument(
        "--cfg", type=float, default=None, help="classifier-free guidance weight (default 3; 1 = off)"
    )
    p.add_argument("--temperature", type=float, default=None, help="text sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="text tokens to generate at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the first output; output i uses seed + i")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")


def generation_config(args: argparse.Namespace, config, **kw) -> GenerationConfig:
    d = config.diffusion
    sampler = args.sampler or ("flow" if d.objective == "flow" else d.sampler)
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        sampler=sampler,
        steps=args.steps or d.sample_steps,
        cfg_scale=d.cfg_scale if args.cfg is None else args.cfg,
        **kw,
    )


def pick_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_generation_options(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--num-images", type=int, default=1, help="outputs to generate (one row each)")
    p.add_argument(
        "--text",
        action="store_true",
        help="continue the prompt as text (images only if the model emits BOI); default: text-to-image",
    )
    p.add_argument("--max-images", type=int, default=1, help="images per output at most")
    p.add_argument("--out", default="generated", help="output directory (default ./generated)")


def run(args: argparse.Namespace) -> int:
    from transfusion.vae import tensor_to_pil

    if args.num_images < 1:
        raise ValueError("--num-images must be >= 1")
    device = pick_device(args.device)
    loaded, vae = load_for_inference(args.checkpoint, device)
    gen = generation_config(
        args,
        loaded.config,
        max_images=args.max_images,
        force_image=not args.text,
        stop_after_image=not args.text,
    )
    decoder = Decoder(loaded.model, loaded.tokenizer, loaded.config.diffusion)
    n = args.num_images
    outputs = decoder.generate([[args.prompt]] * n, gen, seeds=[args.seed + i for i in range(n)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record, md = [], [f"# {args.prompt}\n"]
    for i, segments in enumerate(outputs):
        row = []
        md.append(f"\n## output {i}\n")
        for j, seg in enumerate(segments):
            if isinstance(seg, str):
                row.append({"text": seg})
                md.append(seg + "\n")
                continue
            if vae is not None:
                with torch.no_grad():
                    image = tensor_to_pil(vae.decode(vae.from_diffusion(seg[None].to(device))).cpu())[0]
                name = f"output{i}_image{j}.png"
                image.save(out / name)
            else:
                from safetensors.torch import save_file

                name = f"output{i}_image{j}.safetensors"
                save_file({"latent": seg.contiguous()}, out / name)
            row.append({"image": name})
            md.append(f"![output {i} image {j}]({name})\n")
        record.append(row)
    (out / "output.json").write_text(json.dumps({"prompt": args.prompt, "outputs": record}, indent=2))
    (out / "output.md").write_text("".join(md))
    note = "" if vae is not None else " (no VAE in the checkpoint: images saved as latents)"
    print(f"wrote {n} output(s) to {out}{note}")
    return 0
