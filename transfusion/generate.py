"""Mixed-modal decoding: text token by token, images by diffusion over a cached prefix.

LM mode samples the next token (greedy, temperature, top-k, top-p) until BOI, EOS or a length
limit. On BOI (sampled, or forced for text-to-image) the row enters diffusion mode: n patches of
pure noise are appended and denoised over the sampler's steps; each step runs only those n patches
against the cached prefix and overwrites the image in place, so the model attends to the current
noisy image and the clean prefix, never to earlier noisy versions. The clean image (t = 0) is then
run once more and its keys/values committed to the cache, EOI follows, and LM mode resumes. Any
number of images can appear in one output (PAPER.md, Decoding).

Cache: one preallocated (rows, Hk, capacity, Dh) key and value tensor per layer. Row r holds its
positions 0 .. lens[r] - 1 in slots 0 .. lens[r] - 1 (right-padded; RoPE position = slot). A step
computes only its q new positions, which attend to the cached slots where they lie (a ``Prefix`` of
views, slots past a row's length masked) and to each other: nothing is concatenated or copied, so
what grows with the prefix is only the attention reading the cached keys/values.

Batching: every prompt is a row with its own length, its own mode and its own random generator (so a
row's output does not depend on what else is in the batch). Each tick advances every row: rows in
LM mode as one batch of single-token queries, rows in diffusion mode as one batch of n-patch
queries (a sub-batch of rows that are not consecutive is gathered from the cache). Classifier-free
guidance adds one unconditional twin per diffusing row to the same batch; every twin reads one
shared cached prefix, BOS BOI: the conditioning dropped, as training drops it (``Sample([Image])``).

Shape legend: R rows in a (sub-)batch, q new query positions (1 for a token, n for an image), S
cached positions, D width, V vocabulary, Hk key/value heads, Dh head width, n patches per image,
C/H/W latent channels/height/width.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from transfusion import decode_graphs
from transfusion.config import DiffusionConfig
from transfusion.diffusion import Sampler, default_sampler, guidance_scale, guided, make_schedule, sampler_for
from transfusion.layers import KV, Prefix
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, images_as_tokens, pack, sample_length

KEPT_CACHES = 4
"""Caches a decoder with static steps keeps between calls (the rows', the guidance twins', and a spare
shape); each holds the CUDA graphs captured over it."""

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


class KVCache:
    """Per-layer keys and values of R rows, (R, Hk, capacity, Dh), preallocated; ``lens`` (R,)."""

    _serials = itertools.count()

    def __init__(
        self, model: Transfusion, rows: int, capacity: int, device: torch.device, dtype: torch.dtype
    ):
        cfg = model.cfg
        shape = (rows, cfg.kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lens = torch.zeros(rows, dtype=torch.long)  # on the CPU: lengths steer Python control flow
        self.capacity = capacity
        self.serial = next(KVCache._serials)  # what captured graphs key on (ids are reused once freed)

    def reset(self) -> None:
        """Empty every row, keeping the tensors (and so the graphs captured over them)."""
        self.lens.zero_()
        for t in (*self.k, *self.v):
            t.zero_()

    def past(self, rows: Tensor) -> list[tuple[int, Tensor, Tensor, Tensor | None]]:
        """Each layer's ``Prefix`` part for ``rows``: the slots up to the longest row, and which of
        them hold positions. Views of the cache when ``rows`` is a run of consecutive rows (always,
        unless some rows are drawing an image while others write text), else copies."""
        lens = self.lens[rows]
        upto = int(lens.max())
        valid = None  # every slot up to the longest row holds a position, unless the rows differ
        if bool((lens != upto).any()):
            valid = (torch.arange(upto)[None, :] < lens[:, None]).to(self.k[0].device)  # (R, upto)
        r0 = int(rows[0])
        if bool((rows == torch.arange(r0, r0 + len(rows))).all()):
            sl = slice(r0, r0 + len(rows))
            return [(len(rows), k[sl, :, :upto], v[sl, :, :upto], valid) for k, v in zip(self.k, self.v)]
        idx = rows.to(self.k[0].device)
        return [(len(rows), k[idx, :, :upto], v[idx, :, :upto], valid) for k, v in zip(self.k, self.v)]

    def prefix(self, rows: Tensor, shared: KVCache | None = None, twins: int | None = None) -> list[Prefix]:
        """Each layer's ``Prefix`` for the model's cached calls: ``rows`` of this cache, then (with
        ``shared``, a one-row cache) ``twins`` more rows (default: one per row) that all read
        ``shared``'s single row."""
        groups = [self.past(rows)]
        if shared is not None:
            n = len(rows) if twins is None else twins
            groups.append(
                [(n, k, v, valid) for _, k, v, valid in shared.past(torch.zeros(1, dtype=torch.long))]
            )
        return [Prefix([group[layer] for group in groups]) for layer in range(len(groups[0]))]

    def starts(self, rows: Tensor, shared: KVCache | None = None, twins: int | None = None) -> Tensor:
        """Cached positions per row (R,), followed by ``shared``'s for each twin row."""
        lens = self.lens[rows]
        n = len(rows) if twins is None else twins
        return lens if shared is None else torch.cat([lens, shared.lens[:1].expand(n)])

    def static_prefix(
        self, r0: int, R: int, start: Tensor, shared: KVCache | None = None, twins: int = 0
    ) -> list[Prefix]:
        """Whole-capacity ``Prefix`` parts of rows r0 .. r0 + R - 1, masked from the device lengths
        ``start`` (static shapes, for CUDA graphs: ``decode_graphs``)."""
        return decode_graphs.static_prefix(self, r0, R, start, shared, twins)

    def write_at(self, r0: int, start: Tensor, kv: list[KV]) -> None:
        """One new position per row of r0 .. at the device positions ``start`` (``decode_graphs``)."""
        decode_graphs.write_at(self, r0, start, kv)

    def commit(self, rows: Tensor, new_kv: list[KV], counts: Tensor) -> None:
        """Append the first ``counts[i]`` of the q new positions of sub-batch row i to cache row rows[i]."""
        q = new_kv[0][0].shape[2]
        start = self.lens[rows]
        if int((start + counts).max()) > self.capacity:
            raise ValueError(f"output exceeds the cache's {self.capacity} positions")
        if bool((counts == q).all()):  # every row appends all q positions: one indexed write per layer
            r = rows.to(self.k[0].device)[:, None]  # (R, 1)
            slots = (start[:, None] + torch.arange(q)[None, :]).to(r.device)  # (R, q)
            for layer, (k, v) in enumerate(new_kv):
                self.k[layer][r, :, slots] = k.transpose(1, 2)  # (R, q, Hk, Dh)
                self.v[layer][r, :, slots] = v.transpose(1, 2)
        else:  # ragged (prefill): row by row
            for i, row in enumerate(rows.tolist()):
                s, c = int(start[i]), int(counts[i])
                for layer, (k, v) in enumerate(new_kv):
                    self.k[layer][row, :, s : s + c] = k[i, :, :c]
                    self.v[layer][row, :, s : s + c] = v[i, :, :c]
        self.lens[rows] += counts


@dataclass
class _Row:
    """One prompt's decoding state. In diffusion mode ``image`` holds the current x_t."""

    generator: torch.Generator
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

    @property
    def drawing(self) -> bool:
        """In diffusion mode or code mode: an image is under way."""
        return self.image is not None or self.codes is not None


@dataclass
class _Batch:
    """One ``generate`` call: its rows, caches and settings."""

    rows: list[_Row]
    cache: KVCache
    uncond: KVCache | None  # one row: BOS BOI, shared by every row's unconditional twin
    twins: KVCache | None  # discrete images: a row per row, BOS BOI + the codes so far
    sampler: Sampler
    scale: float
    gen: GenerationConfig
    progress: Callable[[int], None] | None


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
        """``static``: text and denoising steps with static shapes (``decode_graphs``); ``graphs``:
        captured in CUDA graphs and replayed. Both default to on for a model on CUDA, where decoding is
        bound by kernel launches, and off on the CPU, where reading only the filled part of the cache
        is faster (the static steps run there too when asked, eagerly: the tests compare them)."""
        self.model, self.tok = model.eval(), tokenizer
        self.dcfg = diffusion or DiffusionConfig()
        self.sp = Specials.of(tokenizer)
        self.schedule = make_schedule(self.dcfg)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cfg = model.cfg
        self.n = cfg.patches_per_image
        self.latent_shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        self.discrete, self.code_offset = cfg.discrete, cfg.vocab_size
        # tokens training never predicts as text (BOS opens, EOI follows an image, PAD pads, and the
        # image codes of a discrete model, sampled only inside an image): not sampled as text
        banned = {self.sp.bos, self.sp.eoi, self.sp.pad} - {self.sp.eos, self.sp.boi}
        banned |= set(range(cfg.vocab_size, cfg.total_vocab))
        self.banned = torch.tensor(sorted(banned), dtype=torch.long)
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs
        self.static = cuda if static is None else (static or self.graphs)
        # the static steps and the caches they were captured over live as long as the decoder, so a
        # later call with the same batch shape replays the graphs instead of capturing them again
        self._steps = decode_graphs.StaticSteps(model, self.graphs) if self.static else None
        self._caches: OrderedDict[tuple, KVCache] = OrderedDict()

    def settings(self, gen: GenerationConfig | None = None) -> GenerationConfig:
        """``gen`` with sampler, steps and cfg_scale filled in from the diffusion config where None."""
        gen, d = gen or GenerationConfig(), self.dcfg
        return dataclasses.replace(
            gen,
            sampler=gen.sampler or default_sampler(d),
            steps=gen.steps or d.sample_steps,
            cfg_scale=d.cfg_scale if gen.cfg_scale is None else gen.cfg_scale,
            guidance_max_t=d.guidance_max_t if gen.guidance_max_t == -1 else gen.guidance_max_t,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[Segment]],
        gen: GenerationConfig | None = None,
        seeds: list[int] | None = None,
        force_image: list[bool] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Segment]]:
        """Continue every prompt; returns each row's output segments (text, and image latents on the CPU).

        ``seeds`` gives each row its own generator (default 0, 1, ...); ``force_image`` overrides
        ``gen.force_image`` per row, so one batch can mix captioning and text-to-image rows;
        ``progress(k)`` is called after each denoising tick with the k rows it advanced."""
        gen = self.settings(gen)
        B = len(prompts)
        force = [gen.force_image] * B if force_image is None else [bool(f) for f in force_image]
        seeds = list(range(B)) if seeds is None else list(seeds)
        if len(seeds) != B or len(force) != B:
            raise ValueError(f"give one seed and one force_image flag per prompt ({B} prompts)")
        if B == 0:
            return []
        sampler = sampler_for(self.dcfg, self.schedule, gen.sampler, gen.steps)
        scale = gen.cfg_scale

        samples = [self._prompt_sample(p, f) for p, f in zip(prompts, force)]
        lengths = [sample_length(s, self.n) for s in samples]
        limit = self.model.cfg.max_seq_len
        for i, (length, f) in enumerate(zip(lengths, force)):
            if length + f * (self.n + 1) > limit:
                extra = f" and {self.n + 1} for its image" if f else ""
                raise ValueError(
                    f"prompt {i} needs {length} positions{extra}, but the model's context is {limit}; shorten it"
                )
        # every row fits: its prompt, its text (the last token is never fed) and its images
        images = max(gen.max_images, int(any(force)))
        capacity = min(limit, max(lengths) + gen.max_new_tokens + images * (self.n + 2))
        rows = [_Row(torch.Generator().manual_seed(int(s))) for s in seeds]
        cache = self._cache("rows", B, capacity)
        guide = scale != 1.0 and images > 0  # no images, no unconditional branch
        uncond = self._unconditional_prefix() if guide and not self.discrete else None
        twins = self._cache("twins", B, self.n + 2) if guide and self.discrete else None
        batch = _Batch(rows, cache, uncond, twins, sampler, scale, gen, progress)

        logits = self._prefill(cache, torch.arange(B), samples)  # (B, V)
        for i, row in enumerate(rows):
            row.logits = logits[i]
            if force[i]:
                self._start_image(batch, i)
        while not all(r.done for r in rows):
            self._lm_tick(batch)
            if self.discrete:
                self._code_tick(batch)
            else:
                self._diffusion_tick(batch)
        return [r.out for r in rows]

    def _cache(self, kind: str, rows: int, capacity: int) -> KVCache:
        """An empty cache of ``rows`` x ``capacity``. With static steps, the decoder keeps its last few
        caches (capacity rounded up to 64 slots, so that calls with prompts of similar length share
        one) and the graphs captured over them; otherwise a fresh one."""
        if self._steps is None:
            return KVCache(self.model, rows, capacity, self.device, self.dtype)
        if kind == "rows":
            capacity = min(self.model.cfg.max_seq_len, -(-capacity // 64) * 64)
        key = (kind, rows, capacity)
        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= KEPT_CACHES:
                self._steps.forget(self._caches.popitem(last=False)[1])
            cache = KVCache(self.model, rows, capacity, self.device, self.dtype)
        else:
            cache.reset()
        self._caches[key] = cache
        return cache

    # --- one tick of each mode ----------------------------------------------------------------
    def _lm_tick(self, b: _Batch) -> None:
        """Every row in LM mode samples a token; those that go on feed it through the model together."""
        feed: list[tuple[int, int]] = []
        for i, row in enumerate(b.rows):
            if row.done or row.drawing:
                continue
            room = b.cache.capacity - int(b.cache.lens[i])  # positions left in this row
            if room == 0 or row.n_text >= b.gen.max_new_tokens:
                self._end(row)
                continue
            logits = row.logits.clone()
            logits[self.banned.to(logits.device)] = float("-inf")
            if row.n_images >= b.gen.max_images or room < self.n + 2:  # BOI needs BOI + n patches + EOI
                logits[self.sp.boi] = float("-inf")
            token = sample_token(logits, b.gen, row.generator)
            if token == self.sp.eos:
                self._end(row)
                continue
            if token != self.sp.boi:
                row.tokens.append(token)
                row.n_text += 1
                if row.n_text >= b.gen.max_new_tokens or room == 1:  # the last token needs no forward
                    self._end(row)
                    continue
            feed.append((i, token))
        if not feed:
            return
        logits = self._text_step(b.cache, torch.tensor([i for i, _ in feed]), [t for _, t in feed])
        for j, (i, token) in enumerate(feed):
            b.rows[i].logits = logits[j]
            if token == self.sp.boi:
                self._flush_text(b.rows[i])
                self._start_image(b, i)

    def _diffusion_tick(self, b: _Batch) -> None:
        """The denoising loop, one step per tick for every row in diffusion mode, as one batch.

        Each row runs its n patches at its own timestep against its cached prefix; rows that are
        guided at this timestep (``diffusion.guidance_scale``) add their unconditional twin (prefix
        BOS BOI) to the same batch. The step's result overwrites the row's image; nothing is committed
        to the cache until the image is clean."""
        active = [i for i, row in enumerate(b.rows) if row.image is not None]
        if not active:
            return
        x = torch.stack([b.rows[i].image for i in active])  # (R, C, H, W)
        t = torch.tensor([b.sampler.timesteps[b.rows[i].step] for i in active])  # (R,)
        scales = [guidance_scale(b.scale, tt, b.gen.guidance_max_t) for tt in t.tolist()]
        twins = [j for j, s in enumerate(scales) if s != 1.0] if b.uncond is not None else []
        pred = self._image_pred_guided(b, torch.tensor(active), x, t, twins)  # (R + len(twins), C, H, W)
        for k, j in enumerate(twins):
            pred[j] = guided(pred[j], pred[len(active) + k], scales[j])
        for j, i in enumerate(active):
            row = b.rows[i]
            row.image = b.sampler.step(pred[j : j + 1], row.step, row.image[None], row.generator)[0]
            row.step += 1
        if b.progress is not None:
            b.progress(len(active))
        finished = [i for i in active if b.rows[i].step == len(b.sampler)]
        if finished:
            self._finish_images(b, finished)

    def _start_image(self, b: _Batch, i: int) -> None:
        """Diffusion mode: pure noise x_T from the row's own generator (the same noise on any device).
        Code mode (discrete images): the row's logits after BOI give the first code; a guided row's
        twin starts from BOS BOI, the conditioning dropped as training drops it."""
        row = b.rows[i]
        if not self.discrete:
            row.image = torch.randn(self.latent_shape, generator=row.generator).to(self.device)
            row.step, row.logits = 0, None
            return
        row.codes = []
        if b.twins is not None:
            b.twins.lens[i] = 0
            row.twin_logits = self._prefill(
                b.twins, torch.tensor([i]), [Sample([Text([self.sp.boi])], eos=False)]
            )[0]

    def _code_tick(self, b: _Batch) -> None:
        """Every row in code mode samples its next code (guided: the conditional and unconditional
        logits combined, ``diffusion.guided``), and the rows feed their codes through the model
        together (the twins theirs); a row with all n codes has its image: the code grid (1, h, w)
        joins its output, then EOI and LM mode (or the row ends, with ``stop_after_image``)."""
        active = [i for i, row in enumerate(b.rows) if row.codes is not None]
        if not active:
            return
        lo = self.code_offset
        for i in active:
            row = b.rows[i]
            logits = row.logits[lo:]
            if row.twin_logits is not None:
                logits = guided(logits, row.twin_logits[lo:], b.scale)
            image_gen = dataclasses.replace(b.gen, temperature=b.gen.image_temperature, top_k=0, top_p=1.0)
            row.codes.append(sample_token(logits, image_gen, row.generator))
        done = [i for i in active if len(b.rows[i].codes) == self.n]
        for i in done:
            row = b.rows[i]
            row.out.append(torch.tensor(row.codes, dtype=torch.float32).view(self.latent_shape))
            row.n_images += 1
            if b.gen.stop_after_image:
                row.done, row.codes, row.twin_logits = True, None, None
        feed = [i for i in active if not b.rows[i].done]
        if feed:
            idx = torch.tensor(feed)
            logits = self._text_step(b.cache, idx, [lo + b.rows[i].codes[-1] for i in feed])
            going = [j for j, i in enumerate(feed) if len(b.rows[i].codes) < self.n]
            if b.twins is not None and going:
                sub = idx[torch.tensor(going)]
                twin = self._text_step(b.twins, sub, [lo + b.rows[int(i)].codes[-1] for i in sub])
                for k, j in enumerate(going):
                    b.rows[feed[j]].twin_logits = twin[k]
            for j, i in enumerate(feed):
                b.rows[i].logits = logits[j]
        ended = [i for i in done if not b.rows[i].done]
        if ended:  # the image is in the cache: EOI, and back to text
            logits = self._text_step(b.cache, torch.tensor(ended), [self.sp.eoi] * len(ended))
            for j, i in enumerate(ended):
                b.rows[i].codes, b.rows[i].twin_logits, b.rows[i].logits = None, None, logits[j]
        if b.progress is not None:
            b.progress(len(active))

    def _finish_images(self, b: _Batch, finished: list[int]) -> None:
        """Each clean image joins its row's output. Rows that go on write it into the cache at t = 0,
        then EOI, and are back in LM mode."""
        go_on = []
        for i in finished:
            row = b.rows[i]
            row.out.append(row.image.cpu())
            row.n_images += 1
            if b.gen.stop_after_image:
                row.image, row.done = None, True
            else:
                go_on.append(i)
        if not go_on:
            return
        idx = torch.tensor(go_on)
        clean = torch.stack([b.rows[i].image for i in go_on])  # (R, C, H, W)
        self._image_pred(b.cache, idx, clean, torch.zeros(len(go_on), dtype=torch.long), commit=True)
        logits = self._text_step(b.cache, idx, [self.sp.eoi] * len(go_on))  # (R, V)
        for j, i in enumerate(go_on):
            b.rows[i].image, b.rows[i].logits = None, logits[j]

    def _end(self, row: _Row) -> None:
        self._flush_text(row)
        row.done = True

    def _flush_text(self, row: _Row) -> None:
        if row.tokens:
            row.out.append(self.tok.decode(row.tokens))
            row.tokens = []

    # --- the model's cached API, on this decoder's caches -----------------------------------------
    def _static_rows(self, cache: KVCache, rows: Tensor, room: int) -> int | None:
        """The first row when the static steps apply: they are on, the rows are consecutive and each
        has ``room`` free slots."""
        if self._steps is None or int(cache.lens[rows].max()) + room > cache.capacity:
            return None
        return decode_graphs.consecutive(rows)

    def _text_step(self, cache: KVCache, rows: Tensor, tokens: list[int]) -> Tensor:
        """Feed one token per row and commit it; returns next-token logits (R, V)."""
        r0 = self._static_rows(cache, rows, 1)
        if r0 is not None:
            start = cache.lens[rows].to(self.device)
            logits = self._steps.text(cache, r0, torch.tensor(tokens, device=self.device), start)
            cache.lens[rows] += 1
            return logits
        out = self.model.extend_text(torch.tensor(tokens), cache.starts(rows), cache.prefix(rows))
        cache.commit(rows, out.kv, torch.ones(len(rows), dtype=torch.long))
        return out.logits

    def _image_pred(self, cache: KVCache, rows: Tensor, images: Tensor, t: Tensor, commit: bool) -> Tensor:
        """Images (R, C, H, W) at timesteps t (R,) as the rows' next n positions; returns the
        prediction (R, C, H, W). ``commit`` writes their keys/values (for clean images, t = 0)."""
        r0 = None if commit else self._static_rows(cache, rows, 0)
        if r0 is not None:
            start = cache.lens[rows].to(self.device)
            return self._steps.image(cache, r0, images.to(self.device, self.dtype), t.to(self.device), start)
        out = self.model.extend_image(images, t, cache.starts(rows), cache.prefix(rows))
        if commit:
            cache.commit(rows, out.kv, torch.full((len(rows),), self.n, dtype=torch.long))
        return out.image_pred

    def _image_pred_pair(
        self, cache: KVCache, uncond: KVCache, rows: Tensor, images: Tensor, t: Tensor
    ) -> Tensor:
        """One forward over R conditional rows and their R unconditional twins: (2R, C, H, W), the
        conditional predictions first. ``uncond`` is a one-row cache shared by every twin."""
        x, tt = torch.cat([images, images]), torch.cat([t, t])
        r0 = self._static_rows(cache, rows, 0)
        if r0 is not None:
            start = cache.lens[rows].to(self.device)
            return self._steps.image(
                cache, r0, x.to(self.device, self.dtype), tt.to(self.device), start, uncond
            )
        out = self.model.extend_image(x, tt, cache.starts(rows, uncond), cache.prefix(rows, uncond))
        return out.image_pred

    def _image_pred_guided(
        self, b: _Batch, rows: Tensor, images: Tensor, t: Tensor, twins: list[int]
    ) -> Tensor:
        """One forward over R conditional rows and the unconditional twins of rows ``twins`` (indices
        into the R): (R + len(twins), C, H, W), conditional predictions first. Every twin reads the
        one cached BOS BOI of ``b.uncond``."""
        if len(twins) == len(rows):
            return self._image_pred_pair(b.cache, b.uncond, rows, images, t)
        if not twins:
            return self._image_pred(b.cache, rows, images, t, commit=False)
        sel = torch.tensor(twins)
        x, tt = torch.cat([images, images[sel]]), torch.cat([t, t[sel]])
        start, past = b.cache.starts(rows, b.uncond, len(twins)), b.cache.prefix(rows, b.uncond, len(twins))
        return self.model.extend_image(x, tt, start, past).image_pred

    def _prefill(self, cache: KVCache, rows: Tensor, samples: list[Sample]) -> Tensor:
        """Run whole prompts (packed one per row) into the cache; returns last-position logits (R, V)."""
        lengths = [sample_length(s, self.n) for s in samples]
        if max(lengths) > cache.capacity:
            raise ValueError(
                f"prompt needs {max(lengths)} positions but the context is {cache.capacity}; shorten it"
            )
        b = pack(samples, max(lengths), self.sp, self.n, one_per_row=True).to(self.device)
        out = self.model.prefill(b, torch.tensor(lengths) - 1)
        cache.commit(rows, out.kv, torch.tensor(lengths))
        return out.logits

    def _unconditional_prefix(self) -> KVCache:
        """BOS BOI in a one-row cache: what training shows before an image whose text was dropped
        (computed on every call: the model may have trained since the last one)."""
        uncond = self._cache("uncond", 1, 2)
        self._prefill(uncond, torch.zeros(1, dtype=torch.long), [Sample([Text([self.sp.boi])], eos=False)])
        return uncond

    def _prompt_sample(self, prompt: list[Segment], force_image: bool) -> Sample:
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
