"""Mixed-modal decoding: text token by token, images by diffusion over a cached prefix.

LM mode samples the next token (greedy, temperature, top-k, top-p) until BOI, EOS or a length
limit. On BOI (sampled, or forced for text-to-image) the row enters diffusion mode: n patches of
pure noise are appended and denoised over the sampler's steps; each step runs only those n patches
against the cached prefix and overwrites the image in place, so the model attends to the current
noisy image and the clean prefix, never to earlier noisy versions. The clean image (t = 0) is then
run once more and its keys/values committed to the cache, EOI follows, and LM mode resumes. Any
number of images can appear in one output (PAPER.md, Decoding).

``Decoder.generate`` runs a batch of prompts to the end on a decoding engine (``transfusion.decoding``):
the key/value cache (``decoding.cache``), the model's cached calls (``decoding.steps``, with the
static steps CUDA graphs replay, ``decoding.graphs``), each row's state and the three modes
(``decoding.modes``) and the tick that advances every row (``decoding.engine``). Every prompt is a row
with its own length, mode and random generator, so a row's output does not depend on what else is in
the batch. Classifier-free guidance adds one unconditional twin per diffusing row to the same batch;
every twin reads one shared cached prefix, BOS BOI: the conditioning dropped, as training drops it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from transfusion.config import DiffusionConfig
from transfusion.decoding.cache import KVCache
from transfusion.decoding.engine import Engine
from transfusion.decoding.modes import GenerationConfig, Row, Segment, sample_token
from transfusion.decoding.steps import CachedSteps
from transfusion.diffusion import default_sampler, make_schedule, sampler_for
from transfusion.lora import lora_layers
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, images_as_tokens, sample_length

__all__ = [
    "Decoder",
    "GenerationConfig",
    "KVCache",
    "Row",
    "Segment",
    "caption",
    "sample_token",
    "text_to_image",
]


class Decoder:
    """A model, its tokenizer and diffusion settings; ``generate`` continues prompts."""

    def __init__(
        self,
        model: Transfusion,
        tokenizer: object,
        diffusion: DiffusionConfig | None = None,
        static: bool | None = None,
        graphs: bool | None = None,
    ):
        """``static``: text and denoising steps with static shapes (``decoding.graphs``); ``graphs``:
        captured in CUDA graphs and replayed. Both default to on for a model on CUDA, where decoding is
        bound by kernel launches, and off on the CPU, where reading only the filled part of the cache
        is faster (the static steps run there too when asked, eagerly: the tests compare them)."""
        self.model, self.tok = model.eval(), tokenizer
        self.dcfg = diffusion or DiffusionConfig()
        self.sp = Specials.of(tokenizer)
        self.schedule = make_schedule(self.dcfg)
        self.device = next(model.parameters()).device
        cfg = model.cfg
        self.n = cfg.patches_per_image
        self.latent_shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        self.discrete, self.code_offset = cfg.discrete, cfg.vocab_size
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs
        if lora_layers(model):  # rows pick adapters per call: the row groups would be baked into a graph
            self.graphs = False
        self.static = cuda if static is None else (static or self.graphs)
        # the model's cached calls; with static steps they keep their caches (and the graphs captured
        # over them) between calls, so a later call of the same batch shape replays instead of capturing
        self.steps = CachedSteps(model, self.sp, self.static, self.graphs)

    def settings(self, gen: GenerationConfig | None = None) -> GenerationConfig:
        """``gen`` with sampler, steps and cfg_scale filled in from the diffusion config where None."""
        gen, d = gen or GenerationConfig(), self.dcfg
        if gen.guidance_max_t is not None and gen.guidance_max_t >= d.num_train_timesteps:
            raise ValueError(
                f"guidance_max_t {gen.guidance_max_t} is past the model's last timestep ({d.num_train_timesteps - 1})"
            )
        return dataclasses.replace(
            gen,
            sampler=gen.sampler or default_sampler(d),
            steps=gen.steps or d.sample_steps,
            cfg_scale=d.cfg_scale if gen.cfg_scale is None else gen.cfg_scale,
            guidance_max_t=d.guidance_max_t if gen.guidance_max_t == -1 else gen.guidance_max_t,
        )

    def engine(self, rows: int, capacity: int, progress: Callable[[int], None] | None = None) -> Engine:
        """A decoding engine of ``rows`` cache rows of ``capacity`` positions on this decoder's model."""
        return Engine(self.model, self.tok, self.steps, rows, capacity, progress)

    def row(
        self,
        prompt: list[Segment],
        gen: GenerationConfig,
        seed: int,
        force_image: bool = False,
        events: Callable[[str, dict[str, Any]], None] | None = None,
        preview_every: int = 0,
        name: str = "prompt",
        adapter: str | None = None,
    ) -> Row:
        """A request for an engine: ``prompt`` continued with the settings ``gen`` (filled in by
        ``settings``) and a generator seeded by ``seed``; its events go to ``events``; ``adapter`` the
        LoRA adapter it decodes with (None: the base weights)."""
        sample = self.prompt_sample(prompt, force_image)
        limit = self.model.cfg.max_seq_len
        length = sample_length(sample, self.n)
        if length + force_image * (self.n + 1) > limit:
            extra = f" and {self.n + 1} for its image" if force_image else ""
            raise ValueError(
                f"{name} needs {length} positions{extra}, but the model's context is {limit}; shorten it"
            )
        sampler = sampler_for(self.dcfg, self.schedule, gen.sampler, gen.steps) if not self.discrete else None
        generator = torch.Generator().manual_seed(int(seed))
        return Row(sample, gen, sampler, generator, force_image, events, preview_every, adapter)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[Segment]],
        gen: GenerationConfig | None = None,
        seeds: list[int] | None = None,
        force_image: list[bool] | None = None,
        progress: Callable[[int], None] | None = None,
        adapters: list[str | None] | None = None,
    ) -> list[list[Segment]]:
        """Continue every prompt; returns each row's output segments (text, and image latents on the CPU).

        ``seeds`` gives each row its own generator (default 0, 1, ...); ``force_image`` overrides
        ``gen.force_image`` per row, so one batch can mix captioning and text-to-image rows;
        ``progress(k)`` is called after each denoising tick with the k rows it advanced; ``adapters``
        names each row's LoRA adapter (None: the base weights; the model must hold them unmerged)."""
        gen = self.settings(gen)
        B = len(prompts)
        force = [gen.force_image] * B if force_image is None else [bool(f) for f in force_image]
        seeds = list(range(B)) if seeds is None else list(seeds)
        if len(seeds) != B or len(force) != B:
            raise ValueError(f"give one seed and one force_image flag per prompt ({B} prompts)")
        if B == 0:
            return []
        names = [None] * B if adapters is None else list(adapters)
        if len(names) != B:
            raise ValueError(f"give one adapter (or None) per prompt ({B} prompts)")
        rows = [
            self.row(p, gen, s, f, name=f"prompt {i}", adapter=a)
            for i, (p, f, s, a) in enumerate(zip(prompts, force, seeds, names))
        ]
        # every row fits: its prompt, its text (the last token is never fed) and its images
        images = max(gen.max_images, int(any(force)))
        longest = max(sample_length(row.sample, self.n) for row in rows)
        capacity = min(self.model.cfg.max_seq_len, longest + gen.max_new_tokens + images * (self.n + 2))
        engine = self.engine(B, capacity, progress)
        for row in rows:
            engine.add(row)
        while not all(row.done for row in rows):
            engine.tick()
        return [row.out for row in rows]

    def prompt_sample(self, prompt: list[Segment], force_image: bool) -> Sample:
        """A prompt (text and image latents, in order) as a sample: BOS, its segments, and BOI when the
        output must start with an image; discrete images as their codes."""
        segs: list[Text | Image] = []
        for seg in prompt:
            if isinstance(seg, str):
                segs.append(Text(self.tok.encode(seg)))
            elif isinstance(seg, Tensor):
                if tuple(seg.shape) != self.latent_shape:
                    raise ValueError(
                        f"prompt image latent has shape {tuple(seg.shape)}, the model expects {self.latent_shape}"
                    )
                segs.append(Image(seg.detach().float().cpu(), t=0))  # a clean image, as written after EOI
            else:
                raise TypeError(f"prompt segments are str or latent tensors, got {type(seg).__name__}")
        if force_image:
            segs.append(Text([self.sp.boi]))
        sample = Sample(segs, bos=True, eos=False)
        return images_as_tokens(sample, self.sp, self.code_offset) if self.discrete else sample


# --- conveniences -------------------------------------------------------------------------------
def text_to_image(
    decoder: Decoder,
    captions: list[str],
    gen: GenerationConfig | None = None,
    seeds: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Tensor]:
    """One latent (C, H, W) per caption: BOI forced after it, the row ends with the image."""
    gen = dataclasses.replace(gen or GenerationConfig(), force_image=True, stop_after_image=True)
    outs = decoder.generate([[c] for c in captions], gen, seeds, progress=progress)
    return [out[0] for out in outs]


def caption(
    decoder: Decoder,
    latents: list[Tensor],
    gen: GenerationConfig | None = None,
    seeds: list[int] | None = None,
) -> list[str]:
    """A caption per image latent: image-first prompts, text until EOS (greedy by default, no images)."""
    gen = dataclasses.replace(gen or GenerationConfig(temperature=0.0), force_image=False, max_images=0)
    outs = decoder.generate([[z] for z in latents], gen, seeds)
    return ["".join(s for s in out if isinstance(s, str)).strip() for out in outs]
