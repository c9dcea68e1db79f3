"""The library's face: a trained model, its tokenizer and its VAE behind one object, PIL images in
and out. ::

    from transfusion import Pipeline

    pipe = Pipeline.from_pretrained("runs/demo/model")
    images = pipe.text_to_image("a red circle above a blue square", n=4, seed=0)
    print(pipe.caption(images[0]))

``from_pretrained`` reads a run directory, a checkpoint (written by one process or sharded) or a model
directory written by ``save_pretrained`` / ``transfusion export``. The command line (``generate``,
``caption``, ``eval``, ``serve``) and the evaluators go through this object, so each default (the
sampler and guidance a checkpoint was trained for, the reading-order wording of relations, the image
size a model reads) lives here once. Below the PIL methods, ``run`` takes prompts of text and latents
and returns outputs of text and latents, for callers that keep images as latents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage

from transfusion.checkpoint import load_for_inference, vae_directory
from transfusion.config import Config
from transfusion.errors import UserError
from transfusion.generate import Decoder, GenerationConfig, Segment

ImageInput = PILImage.Image | str | Path | torch.Tensor
"""An image given to the pipeline: a PIL image, the path of an image file, or a latent (C, H, W)
already scaled for diffusion (as ``encode`` returns it)."""

RELATION_WORDINGS = ("auto", "as-written", "reading-order")
EDIT_GUIDANCE = 1.0
"""Classifier-free guidance weight of an edit by default: none (see ``Pipeline.edit``)."""


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available, else the CPU; a CUDA device asked for where there is none is an
    error that says what to do. fp32 matmuls on CUDA may use TF32 (``distributed.use_tf32``)."""
    from transfusion.distributed import use_tf32

    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name}: this machine has no CUDA device; use cpu (or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"device {name!r}: use cpu, cuda, cuda:N or auto")
    if name.startswith("cuda"):
        use_tf32()
    return torch.device(name)


class Pipeline:
    """A Transfusion model ready to generate: ``text_to_image``, ``caption``, ``generate`` (interleaved),
    ``save_pretrained``; ``run`` and ``settings`` underneath."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: Config,
        vae: Any = None,
        *,
        path: Path | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer, self.config, self.vae = model.eval(), tokenizer, config, vae
        self.path, self.meta = path, meta or {}
        self.decoder = Decoder(self.model, tokenizer, config.diffusion)
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        adapters: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
        use_ema: bool = True,
        merge_adapters: bool | None = None,
    ) -> Pipeline:
        """Load a run directory (its latest checkpoint), a checkpoint, or an exported model directory,
        with the VAE it names (a LoRA run's checkpoint: its base with the adapter). ``dtype`` ('bf16',
        'fp32' or a torch dtype) casts the weights (bf16 pays on a GPU; on a CPU it is far slower than
        fp32). ``adapters``: LoRA adapter directories, each checked against the base it was trained on. A
        list is merged into the weights (decoding as fast as without them); a mapping {name: directory}
        keeps them apart, for requests that pick one by name (``run(..., adapters=[name, None, ...])``)."""
        named = isinstance(adapters, Mapping)
        merge = not named if merge_adapters is None else merge_adapters
        loaded, vae = load_for_inference(path, resolve_device(device), use_ema=use_ema,
                                         adapters=None if named else list(adapters or []), merge=merge)  # fmt: skip
        if named:
            from transfusion import lora

            lora.merge(loaded.model)  # a LoRA run's own adapter into its base; the named ones stay apart
            for name, directory in adapters.items():
                lora.load_adapter(loaded.model, directory, name=name)
        model = loaded.model
        if dtype is not None:
            dtypes = {
                "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16,
                "fp32": torch.float32,
                "float32": torch.float32,
            }
            model = model.to(dtypes.get(dtype, dtype) if isinstance(dtype, str) else dtype)
        return cls(model, loaded.tokenizer, loaded.config, vae, path=loaded.path, meta=loaded.meta)

    # --- settings: one home for the defaults -----------------------------------------------------------
    def settings(
        self,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_max_t: int | None = -1,
        sampler: str | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        max_images: int = 1,
        force_image: bool = False,
        stop_after_image: bool = False,
    ) -> GenerationConfig:
        """How to sample, with what is left None (steps, guidance, sampler) taken from the checkpoint's
        diffusion settings and ``guidance_max_t=-1`` meaning the checkpoint's interval (None: every
        step)."""
        return self.decoder.settings(
            GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             max_images=max_images, force_image=force_image, stop_after_image=stop_after_image,
                             sampler=sampler, steps=steps, cfg_scale=guidance, guidance_max_t=guidance_max_t)
        )  # fmt: skip

    def reads_in_reading_order(self, relation_wording: str = "auto") -> bool:
        """Whether prompts that state a relation reach the model with it in reading order ("X below Y" as
        "Y above X"): 'auto' does so for a model trained on relations stated only that way."""
        if relation_wording not in RELATION_WORDINGS:
            raise UserError(
                f"relation_wording {relation_wording!r}: use one of {', '.join(RELATION_WORDINGS)}"
            )
        if relation_wording == "auto":
            from transfusion.data.shapes import trained_in_reading_order

            config = self.config
            while not trained_in_reading_order(config.data) and config.train.init_checkpoint:
                from transfusion.training.setup import (
                    checkpoint_config,
                )  # a fine-tuned model: its base's data

                try:
                    config = checkpoint_config(config.train.init_checkpoint)[0]
                except (OSError, ValueError):
                    break
            return trained_in_reading_order(config.data)
        return relation_wording == "reading-order"

    def prompt_text(self, text: str, relation_wording: str = "auto") -> str:
        """The text given to the model for ``text`` (rewritten into reading order when it should be)."""
        if text and self.reads_in_reading_order(relation_wording):
            from transfusion.data.shapes import reading_order

            return reading_order(text)
        return text

    # --- images in and out ----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The side in pixels of the images this model reads and draws."""
        if self.vae is None:
            raise UserError(self._no_vae())
        return self.config.model.latent_size * self.vae.config.downsample

    def missing_vae(self) -> str:
        """Why there is no VAE: its directory is missing, or the checkpoint names none."""
        missing = vae_directory(self) if self.meta.get("vae") and self.path else None
        return f"its VAE directory {missing} is missing" if missing else "the checkpoint has no VAE"

    def _no_vae(self) -> str:
        return f"{self.path or 'this model'} cannot read or draw images: {self.missing_vae()}"

    def encode(
        self, images: Sequence[ImageInput], resize: bool = False, notes: list[str] | None = None
    ) -> list[torch.Tensor]:
        """Images (PIL or files) -> latents (C, H, W) scaled for diffusion, on the model's device. An
        image of another size is an error that says what to do, or with ``resize`` is resized on its
        shorter side and centre-cropped (never upscaled), a line in ``notes`` saying so."""
        from transfusion.data.sources import BadItem, fit_image, read_image
        from transfusion.vae import encode_images

        if all(isinstance(image, torch.Tensor) for image in images):
            return [image.to(self.device) for image in images]
        size, pictures = self.image_size, []
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                raise ValueError("give images or latents, not both in one call")
            name = str(image) if isinstance(image, (str, Path)) else f"image {i}"
            if isinstance(image, (str, Path)) and not Path(image).is_file():
                raise FileNotFoundError(f"no such image file: {image}")
            try:  # readable, and not smaller than the model's size
                picture = (
                    read_image(Path(image), size)
                    if isinstance(image, (str, Path))
                    else fit_image(image, size, name)
                )
            except BadItem as e:
                raise ValueError(str(e)) from None
            if isinstance(image, (str, Path)):
                with PILImage.open(image) as im:
                    w, h = im.size
            else:
                w, h = image.size
            if (w, h) != (size, size) and not resize:
                raise ValueError(f"{name} is {w}x{h}, but this model reads {size}x{size} images; resize it, "
                                 "or pass resize=True (--resize) to resize and centre-crop it")  # fmt: skip
            if (w, h) != (size, size) and notes is not None:
                notes.append(f"{name} is {w}x{h}; resized and centre-cropped to {size}x{size}")
            pictures.append(picture)
        return list(encode_images(self.vae, pictures).to(self.device)) if pictures else []

    def to_pil(self, latents: Sequence[torch.Tensor]) -> list[PILImage.Image]:
        """Latents (C, H, W) -> PIL images through the VAE."""
        from transfusion.vae import decode_latents

        if self.vae is None:
            raise UserError(self._no_vae())
        return decode_latents(self.vae, torch.stack(list(latents))) if latents else []

    # --- generation -----------------------------------------------------------------------------------
    def run(
        self,
        prompts: Sequence[Sequence[Segment]],
        gen: GenerationConfig,
        seeds: Sequence[int],
        progress: Callable[[int], None] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[list[Segment]]:
        """Prompts of text and latents, one output per prompt (prompt i seeded ``seeds[i]``, decoded with
        adapter ``adapters[i]``, None for the base weights): text and latents, in order. The decoding
        every method below goes through."""
        return self.decoder.generate([list(p) for p in prompts], gen, list(seeds), progress=progress,
                                     adapters=None if adapters is None else list(adapters))  # fmt: skip

    def text_to_image(
        self,
        prompt: str | Sequence[str],
        n: int = 1,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_max_t: int | None = -1,
        sampler: str | None = None,
        seed: int = 0,
        relation_wording: str = "auto",
        progress: bool = True,
        output_type: str = "pil",
    ) -> list[Any]:
        """``n`` images for each prompt (prompt-major order; image i seeded ``seed + i``): PIL images, or
        latents with ``output_type='latent'``. ``guidance`` is the classifier-free guidance weight (1:
        none), ``guidance_max_t`` guides only at t <= it (-1: the checkpoint's setting; None: every step)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        given = [self.prompt_text(t, relation_wording) for t in texts for _ in range(n)]
        gen = self.settings(steps=steps, guidance=guidance, guidance_max_t=guidance_max_t, sampler=sampler,
                            force_image=True, stop_after_image=True)  # fmt: skip
        with progress_bar(progress, len(given) * gen.steps, "denoising") as bar:
            outs = self.run([[t] for t in given], gen, [seed + i for i in range(len(given))], bar)
        latents = [out[0] for out in outs]
        return latents if output_type == "latent" else self.to_pil(latents)

    def edit(
        self,
        image: ImageInput | Sequence[ImageInput],
        instruction: str | Sequence[str],
        n: int = 1,
        *,
        steps: int | None = None,
        guidance: float | None = EDIT_GUIDANCE,
        guidance_max_t: int | None = -1,
        sampler: str | None = None,
        seed: int = 0,
        resize: bool = False,
        adapter: str | None = None,
        progress: bool = True,
        output_type: str = "pil",
    ) -> list[Any]:
        """``n`` edits of each image following its instruction (image-major order; edit i seeded ``seed +
        i``): the paper's section 4.4 sequence, the image, the instruction, then an image drawn after a
        forced BOI, by the same interleaved decoding as every other output. One instruction may serve
        every image. ``guidance`` defaults to none (``EDIT_GUIDANCE``): the unconditional twin holds BOS
        BOI, without the input image, so guiding would pull the output away from the input."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        images = image_list(image)
        texts = [instruction] * len(images) if isinstance(instruction, str) else list(instruction)
        if len(texts) != len(images):
            raise ValueError(
                f"give one instruction, or one per image ({len(images)} images, {len(texts)} instructions)"
            )
        if not all(t.strip() for t in texts):
            raise ValueError("an edit needs an instruction (the text saying what to change)")
        latents = self.encode(images, resize)
        prompts = [[z, t] for z, t in zip(latents, texts) for _ in range(n)]
        gen = self.settings(steps=steps, guidance=guidance, guidance_max_t=guidance_max_t, sampler=sampler,
                            force_image=True, stop_after_image=True)  # fmt: skip
        with progress_bar(progress, len(prompts) * gen.steps, "editing") as bar:
            outs = self.run(
                prompts, gen, [seed + i for i in range(len(prompts))], bar, [adapter] * len(prompts)
            )
        out = [o[-1] for o in outs]
        return out if output_type == "latent" else self.to_pil(out)

    def caption(
        self,
        image: ImageInput | Sequence[ImageInput],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        resize: bool = False,
    ) -> list[str]:
        """One caption per image (greedy by default; image i seeded ``seed + i``)."""
        from transfusion.generate import caption

        images = image_list(image)
        gen = self.settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        return caption(
            self.decoder, self.encode(images, resize), gen, seeds=[seed + i for i in range(len(images))]
        )

    def generate(
        self,
        segments: Sequence[str | ImageInput],
        *,
        n: int | None = None,
        max_new_tokens: int = 64,
        max_images: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_max_t: int | None = -1,
        sampler: str | None = None,
        seed: int = 0,
        force_image: bool = False,
        relation_wording: str = "auto",
        resize: bool = False,
        progress: bool = False,
    ) -> list[Any]:
        """Interleaved in and out: a prompt of text (str) and images (PIL, latents, or image files as
        ``pathlib.Path``: in a prompt a str is always text) in order, continued
        as text that may draw images (at most ``max_images``; ``force_image`` starts with one). Returns
        the output's segments, text and PIL images in order; with ``n``, a list of ``n`` outputs
        (output i seeded ``seed + i``)."""
        prompt = self.prompt(segments, relation_wording, resize)
        gen = self.settings(max_new_tokens=max_new_tokens, max_images=max_images, temperature=temperature,
                            top_k=top_k, top_p=top_p, steps=steps, guidance=guidance, guidance_max_t=guidance_max_t,
                            sampler=sampler, force_image=force_image, stop_after_image=False)  # fmt: skip
        count = 1 if n is None else n
        with progress_bar(progress, None, "decoding") as bar:
            outs = [
                self.as_pil(out)
                for out in self.run([prompt] * count, gen, [seed + i for i in range(count)], bar)
            ]
        return outs[0] if n is None else outs

    def prompt(
        self,
        segments: Sequence[str | ImageInput],
        relation_wording: str = "auto",
        resize: bool = False,
        notes: list[str] | None = None,
    ) -> list[Segment]:
        """A prompt of text and images as the decoder takes it: images encoded, text worded for the model."""
        if not segments:
            raise ValueError("the prompt is empty: give text, images or both")
        if isinstance(segments, str):
            segments = [segments]
        images = [s for s in segments if not isinstance(s, str)]
        latents = iter(self.encode(images, resize, notes))
        return [
            self.prompt_text(s, relation_wording) if isinstance(s, str) else next(latents) for s in segments
        ]

    def as_pil(self, output: Sequence[Segment]) -> list[Any]:
        """An output's segments with each latent decoded to a PIL image (kept as a latent without a VAE)."""
        if self.vae is None:
            return list(output)
        pictures = iter(self.to_pil([s for s in output if not isinstance(s, str)]))
        return [s if isinstance(s, str) else next(pictures) for s in output]

    # --- saving ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, max_shard_bytes: int | None = None) -> Path:
        """A self-describing model directory (``transfusion.model_directory``): config.json, the weights,
        the tokenizer, the VAE in vae/, and a model card; ``from_pretrained`` reads it back."""
        from transfusion.model_directory import DEFAULT_MAX_SHARD_BYTES, write_model_directory

        facts = {k: self.meta[k] for k in ("step", "tokens_seen", "flops_seen") if k in self.meta}
        vae_dir = (
            Path(self.vae.config.path)
            if self.vae is not None and getattr(self.vae.config, "path", None)
            else None
        )
        if vae_dir is None and self.path is not None and self.meta.get("vae"):
            vae_dir = vae_directory(self)
        metrics = self.meta.get("metrics") or find_metrics(self.path)
        return write_model_directory(directory, self.model.state_dict(), self.config, self.tokenizer, vae_dir,
                                     facts, metrics, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)  # fmt: skip


def image_list(image: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image (PIL, a file, a (C, H, W) latent) as a list of one; a sequence of them as a list."""
    single = isinstance(image, (PILImage.Image, str, Path)) or (
        isinstance(image, torch.Tensor) and image.dim() == 3
    )
    return [image] if single else list(image)


def find_metrics(path: Path | None) -> dict[str, Any] | None:
    """The evaluation of the run a checkpoint belongs to: metrics.json in the checkpoint's directory or
    in its run directory (``eval`` writes it beside the checkpoint; the demo beside the model)."""
    import json

    if path is None:
        return None
    for d in (path, path.parent, path.parent.parent):
        if (d / "metrics.json").is_file():
            try:
                return json.loads((d / "metrics.json").read_text())
            except json.JSONDecodeError:
                return None
    return None


class progress_bar:
    """A tqdm progress bar opened at the first update (an early error prints alone), or nothing."""

    def __init__(self, on: bool, total: int | None, desc: str):
        self.on, self.total, self.desc, self.tqdm = on, total, desc, None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.on:
            return None

        def update(k: int) -> None:
            if self.tqdm is None:
                from tqdm import tqdm

                self.tqdm = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True)
            self.tqdm.update(k)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
