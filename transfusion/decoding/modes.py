"""Per-row decoding state and the three modes a row can be in, each a piece of its own.

A ``Row`` is one request: its prompt, settings, random generator, outputs, and where it is. Every tick
of the engine (``decoding.engine``) advances every row one step in its mode, all rows of a mode as
one batch:

- ``TextMode`` (LM mode): sample the next token (greedy, temperature, top-k, top-p); BOI sampled (or
  forced, for text-to-image) switches the row to its image mode; EOS or a limit ends it.
- ``DiffusionMode``: n patches of pure noise denoised one sampler step per tick against the cached
  prefix, overwriting the image in place (nothing is committed while it is noisy); guided rows add
  their unconditional twin (prefix BOS BOI, shared by all twins) to the same batch. The clean image
  (t = 0) is then run once more and committed, EOI follows, and the row is back in text mode.
- ``CodeMode`` (discrete images, the Chameleon-style baseline): the image's codes sampled one per
  tick, guided by a twin row that holds BOS BOI and the codes so far.

Settings are per row, so rows with different samplers, step counts and guidance share a batch; a
row's output does not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from transfusion.diffusion import Sampler, guidance_scale, guided
from transfusion.sequence import Sample, Specials, Text

Segment = str | Tensor
"""A prompt or output segment: text, or an image as a latent (C, H, W) scaled for diffusion
(``vae.to_diffusion(vae.encode(pixels))``; ``vae.decode(vae.from_diffusion(z))`` gives pixels)."""


@dataclass
class GenerationConfig:
    """How to sample. None for sampler/steps/cfg_scale means the checkpoint's ``DiffusionConfig``."""

    max_new_tokens: int = 64
    """Limit on generated text tokens per row (BOI, EOI and image patches do not count)."""
    temperature: float = 1.0
    """Softmax temperature of text sampling; 0 means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability; 1 keeps all."""
    image_temperature: float = 1.0
    """Softmax temperature of image codes (models with discrete images); 0 means greedy."""
    max_images: int = 4
    """Images per row at most; once reached, BOI cannot be sampled."""
    force_image: bool = False
    """Append BOI to every prompt: the output starts with an image (text-to-image)."""
    stop_after_image: bool = False
    """End a row when its first image is finished (no EOI, no text after it)."""
    sampler: str | None = None
    """'ddpm' (ancestral), 'ddim' or 'flow' (Euler); None: DiffusionConfig.sampler ('flow' for flow models)."""
    steps: int | None = None
    """Denoising steps; None: DiffusionConfig.sample_steps (250 of the 1000 trained, PAPER.md)."""
    cfg_scale: float | None = None
    """Classifier-free guidance weight; 1 runs no unconditional branch; None: DiffusionConfig.cfg_scale (3)."""
    guidance_max_t: int | None = -1
    """Guide only at timesteps t <= this (None: every step); -1: DiffusionConfig.guidance_max_t."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {self.max_images}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if self.guidance_max_t is not None and self.guidance_max_t < -1:
            raise ValueError(
                f"guidance_max_t must be a timestep >= 0 (None: every step; -1: the checkpoint's), got {self.guidance_max_t}"
            )


def sample_token(logits: Tensor, gen: GenerationConfig, generator: torch.Generator) -> int:
    """One token from (V,) logits: greedy at temperature 0, else top-k / top-p filtered sampling."""
    if gen.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / gen.temperature
    if gen.top_k:
        kth = torch.topk(logits, min(gen.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= gen.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Row:
    """One request's decoding state. In diffusion mode ``image`` holds the current x_t."""

    sample: Sample
    """The prompt (BOI appended when the output must start with an image)."""
    gen: GenerationConfig
    """Its settings, with sampler, steps and guidance filled in (``Decoder.settings``)."""
    sampler: Sampler | None
    generator: torch.Generator
    force_image: bool = False
    events: Callable[[str, dict[str, Any]], None] | None = None
    """Called on the engine's thread: ('start', {'slot'}) when it joins, ('text', {'text': this
    segment so far}), ('step', {'step': i, 'steps': T, 'preview': x0 estimate or None}),
    ('image', {'latent': ...}), ('done', {'out': ...})."""
    preview_every: int = 0
    """Denoising steps between previews of the clean image (0: none)."""
    adapter: str | None = None
    """The LoRA adapter this row decodes with (``lora.rows_using``); None: the base weights."""
    slot: int = -1
    """Its row of the engine's caches, while it decodes."""
    out: list[Segment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # text tokens since the last image
    n_text: int = 0
    n_images: int = 0
    logits: Tensor | None = None  # (V,) next-token logits, in LM mode
    image: Tensor | None = None  # (C, H, W) the noisy image, in diffusion mode
    step: int = 0  # index into sampler.timesteps
    codes: list[int] | None = None  # the image's codes so far, in code mode (discrete images)
    twin_logits: Tensor | None = None  # (V,) the unconditional twin's next-code logits, in code mode
    done: bool = False
    cancelled: bool = False

    @property
    def drawing(self) -> bool:
        """In diffusion mode or code mode: an image is under way."""
        return self.image is not None or self.codes is not None

    @property
    def guided(self) -> bool:
        return self.gen.cfg_scale != 1.0

    def emit(self, kind: str, **payload: Any) -> None:
        if self.events is not None:
            self.events(kind, payload)


class Driver(Protocol):
    """What a mode reads and calls of whatever drives it (``decoding.engine.Engine``): the modes know
    this much of their driver and nothing more."""

    tok: Any
    """The tokenizer (text of the rows' tokens)."""
    sp: Specials
    n: int
    """Patches (or codes) per image."""
    latent_shape: tuple[int, int, int]
    code_offset: int
    """Id of image code 0 (discrete images)."""
    banned: Tensor
    """Ids never sampled as text."""
    cache: Any
    """The rows' KV cache (``decoding.cache.KVCache``)."""
    steps: Any
    """The model's cached calls (``decoding.steps.CachedSteps``)."""
    progress: Callable[[int], None] | None
    image_mode: Any
    """The mode that draws images (diffusion or codes), which text mode hands a row to at BOI."""

    def end(self, row: Row) -> None: ...

    def flush_text(self, row: Row) -> None: ...

    def unconditional(self, adapter: str | None = None) -> Any: ...

    def adapters(self, names: list[str | None]) -> Any:
        """A context in which batch row i of the model's calls uses adapter ``names[i]``."""
        ...

    def twin_cache(self) -> Any: ...


class TextMode:
    """LM mode: every row samples a token; those that go on feed it through the model together."""

    def tick(self, e: Driver, rows: list[Row]) -> None:
        feed: list[tuple[Row, int]] = []
        # every row's logits reach the host in one copy (the tick's one wait), not one row at a time
        host = torch.stack([row.logits for row in rows]).float().cpu() if rows else None
        for j, row in enumerate(rows):
            room = e.cache.capacity - int(e.cache.lens[row.slot])  # positions left in this row
            if room == 0 or row.n_text >= row.gen.max_new_tokens:
                e.end(row)
                continue
            logits = host[j]
            logits[e.banned] = float("-inf")
            if row.n_images >= row.gen.max_images or room < e.n + 2:  # BOI needs BOI + n patches + EOI
                logits[e.sp.boi] = float("-inf")
            token = sample_token(logits, row.gen, row.generator)
            if token == e.sp.eos:
                e.end(row)
                continue
            if token != e.sp.boi:
                row.tokens.append(token)
                row.n_text += 1
                row.emit("text", text=e.tok.decode(row.tokens))
                if row.n_text >= row.gen.max_new_tokens or room == 1:  # the last token needs no forward
                    e.end(row)
                    continue
            feed.append((row, token))
        if not feed:
            return
        with e.adapters([r.adapter for r, _ in feed]):
            logits = e.steps.text(e.cache, torch.tensor([r.slot for r, _ in feed]), [t for _, t in feed])
        for j, (row, token) in enumerate(feed):
            row.logits = logits[j]
            if token == e.sp.boi:
                e.flush_text(row)
                e.image_mode.start(e, row)


class DiffusionMode:
    """The denoising loop, one step per tick for every row in diffusion mode, as one batch."""

    def start(self, e: Driver, row: Row) -> None:
        """Pure noise x_T from the row's own generator (the same noise on any device)."""
        row.image = torch.randn(e.latent_shape, generator=row.generator).to(e.steps.device)
        row.step, row.logits = 0, None

    def tick(self, e: Driver, rows: list[Row]) -> None:
        """Each row runs its n patches at its own timestep against its cached prefix; rows guided at
        this timestep (``diffusion.guidance_scale``) add their unconditional twin (prefix BOS BOI) to
        the same batch. The step's result overwrites the row's image."""
        if not rows:
            return
        if len({row.adapter for row in rows}) > 1 and any(row.guided for row in rows):
            # the guidance twins of one batch share one unconditional prefix, which depends on the
            # adapter: rows of each adapter step as their own batch
            for name in dict.fromkeys(row.adapter for row in rows):
                self.tick(e, [row for row in rows if row.adapter == name])
            return
        x = torch.stack([row.image for row in rows])  # (R, C, H, W)
        t = torch.tensor([row.sampler.timesteps[row.step] for row in rows])  # (R,)
        scales = [
            guidance_scale(row.gen.cfg_scale, tt, row.gen.guidance_max_t) for row, tt in zip(rows, t.tolist())
        ]
        twins = [j for j, s in enumerate(scales) if s != 1.0]
        uncond = e.unconditional(rows[0].adapter) if twins else None
        with e.adapters([r.adapter for r in rows] + [rows[j].adapter for j in twins]):
            pred = e.steps.image_guided(e.cache, uncond, torch.tensor([r.slot for r in rows]), x, t, twins)
        for k, j in enumerate(twins):  # (R + len(twins), C, H, W): conditional predictions first
            pred[j] = guided(pred[j], pred[len(rows) + k], scales[j])
        for j, row in enumerate(rows):
            i = row.step
            if row.preview_every and i % row.preview_every == 0:
                preview = row.sampler.x0(pred[j : j + 1], i, row.image[None])[0]
                row.emit("step", step=i, steps=len(row.sampler), preview=preview)
            else:
                row.emit("step", step=i, steps=len(row.sampler), preview=None)
            row.image = row.sampler.step(pred[j : j + 1], i, row.image[None], row.generator)[0]
            row.step += 1
        if e.progress is not None:
            e.progress(len(rows))
        finished = [row for row in rows if row.step == len(row.sampler)]
        if finished:
            self.finish(e, finished)

    def finish(self, e: Driver, rows: list[Row]) -> None:
        """Each clean image joins its row's output. Rows that go on write it into the cache at t = 0,
        then EOI, and are back in LM mode."""
        go_on = []
        for row in rows:
            row.out.append(row.image.cpu())
            row.n_images += 1
            row.emit("image", latent=row.out[-1])
            if row.gen.stop_after_image:
                row.image, row.done = None, True
            else:
                go_on.append(row)
        if not go_on:
            return
        idx = torch.tensor([row.slot for row in go_on])
        clean = torch.stack([row.image for row in go_on])  # (R, C, H, W)
        with e.adapters([r.adapter for r in go_on]):
            e.steps.image(e.cache, idx, clean, torch.zeros(len(go_on), dtype=torch.long), commit=True)
            logits = e.steps.text(e.cache, idx, [e.sp.eoi] * len(go_on))  # (R, V)
        for j, row in enumerate(go_on):
            row.image, row.logits = None, logits[j]


class CodeMode:
    """Discrete images: the codes sampled one per tick (guided: the conditional and unconditional
    logits combined, ``diffusion.guided``); a row with all n codes has its image, the code grid
    (1, h, w), then EOI and LM mode (or the row ends, with ``stop_after_image``)."""

    def start(self, e: Driver, row: Row) -> None:
        """The row's logits after BOI give the first code; a guided row's twin starts from BOS BOI,
        the conditioning dropped as training drops it."""
        row.codes = []
        if row.guided:
            twins = e.twin_cache()
            twins.lens[row.slot] = 0
            prompt = [Sample([Text([e.sp.boi])], eos=False)]
            with e.adapters([row.adapter]):
                row.twin_logits = e.steps.prefill(twins, torch.tensor([row.slot]), prompt)[0]

    def tick(self, e: Driver, rows: list[Row]) -> None:
        if not rows:
            return
        lo = e.code_offset
        guided_rows = [row for row in rows if row.twin_logits is not None]
        # the rows' code logits (and the twins') reach the host in one copy, not one row at a time
        host = torch.stack([row.logits[lo:] for row in rows] + [row.twin_logits[lo:] for row in guided_rows])
        host = host.float().cpu()
        twin_of = {id(row): len(rows) + k for k, row in enumerate(guided_rows)}
        for j, row in enumerate(rows):
            logits = host[j]
            if row.twin_logits is not None:
                logits = guided(logits, host[twin_of[id(row)]], row.gen.cfg_scale)
            image_gen = dataclasses.replace(
                row.gen, temperature=row.gen.image_temperature, top_k=0, top_p=1.0
            )
            row.codes.append(sample_token(logits, image_gen, row.generator))
        done = [row for row in rows if len(row.codes) == e.n]
        for row in done:
            row.out.append(torch.tensor(row.codes, dtype=torch.float32).view(e.latent_shape))
            row.n_images += 1
            row.emit("image", latent=row.out[-1])
            if row.gen.stop_after_image:
                row.done, row.codes, row.twin_logits = True, None, None
        feed = [row for row in rows if not row.done]
        if feed:
            with e.adapters([r.adapter for r in feed]):
                logits = e.steps.text(
                    e.cache, torch.tensor([r.slot for r in feed]), [lo + r.codes[-1] for r in feed]
                )
            going = [r for r in feed if len(r.codes) < e.n and r.twin_logits is not None]
            if going:
                with e.adapters([r.adapter for r in going]):
                    twin = e.steps.text(
                        e.twin_cache(),
                        torch.tensor([r.slot for r in going]),
                        [lo + r.codes[-1] for r in going],
                    )
                for k, row in enumerate(going):
                    row.twin_logits = twin[k]
            for j, row in enumerate(feed):
                row.logits = logits[j]
        ended = [row for row in done if not row.done]
        if ended:  # the image is in the cache: EOI, and back to text
            with e.adapters([r.adapter for r in ended]):
                logits = e.steps.text(e.cache, torch.tensor([r.slot for r in ended]), [e.sp.eoi] * len(ended))
            for j, row in enumerate(ended):
                row.codes, row.twin_logits, row.logits = None, None, logits[j]
        if e.progress is not None:
            e.progress(len(rows))
