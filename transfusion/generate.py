"""Mixed-modal decoding: text token by token, images by diffusion over a cached prefix.

LM mode samples the next token (greedy, temperature, top-k, top-p) until BOI, EOS or a length
limit. On BOI (sampled, or forced for text-to-image) the row enters diffusion mode: n patches of
pure noise are appended and denoised over the sampler's steps; each step runs only those n patches
against the cached prefix and overwrites the image in place, so the model attends to the current
noisy image and the clean prefix, never to earlier noisy versions. The clean image (t = 0) is then
run once more and its keys/values committed to the cache, EOI follows, and LM mode resumes. Any
number of images can appear in one output.

Batching: every prompt is a row with its own cache length and its own random generator (so a row's
output does not depend on what else is in the batch). Each tick advances all rows: rows in LM mode
as one batch of single-token queries, rows in diffusion mode as one batch of n-patch queries. The
cache is a preallocated (rows, heads, capacity, head dim) tensor per layer, right-padded; keys past
a row's length are masked through the same attention rule as training (``masks.dense_mask``, with
padding as a separate sample). Classifier-free guidance adds one unconditional twin row per
diffusing row (prefix: BOS BOI, the conditioning dropped as in training) to the same batch.

Shape legend: R rows in a sub-batch, q query positions, S cached positions, D width, n patches,
C/H/W latent shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from transfusion import masks
from transfusion.config import DiffusionConfig
from transfusion.diffusion import Sampler, guided, make_sampler, make_schedule
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack

Segment = str | Tensor
"""A prompt or output segment: text, or an image as a scaled latent (C, H, W)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    """Limit on generated text tokens per row (images do not count)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    top_p: float = 1.0
    max_images: int = 4
    force_image: bool = False
    """Append BOI to every prompt: the output starts with an image (text-to-image)."""
    stop_after_image: bool = False
    sampler: str = "ddpm"
    steps: int = 250
    cfg_scale: float = 3.0
    """1 disables guidance (no unconditional branch)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


class KVCache:
    """Per-layer keys and values for B rows, preallocated to ``capacity`` positions."""

    def __init__(
        self, model: Transfusion, rows: int, capacity: int, device: torch.device, dtype: torch.dtype
    ):
        cfg = model.cfg
        shape = (rows, cfg.kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lens = torch.zeros(rows, dtype=torch.long)
        self.capacity = capacity

    def past(self, rows: Tensor, upto: int) -> list[tuple[Tensor, Tensor]]:
        if len(rows) == self.k[0].shape[0] and bool((rows == torch.arange(len(rows))).all()):
            return [(k[:, :, :upto], v[:, :, :upto]) for k, v in zip(self.k, self.v)]  # views, no copy
        idx = rows.to(self.k[0].device)
        return [(k[idx, :, :upto], v[idx, :, :upto]) for k, v in zip(self.k, self.v)]

    def commit(self, rows: Tensor, new_kv: list[tuple[Tensor, Tensor]], counts: Tensor) -> None:
        """Append the first ``counts[i]`` new positions of sub-batch row i to cache row rows[i]."""
        for i, r in enumerate(rows.tolist()):
            start, c = int(self.lens[r]), int(counts[i])
            if start + c > self.capacity:
                raise ValueError(f"output exceeds the model's context of {self.capacity} positions")
            for layer, (k, v) in enumerate(new_kv):
                self.k[layer][r, :, start : start + c] = k[i, :, :c]
                self.v[layer][r, :, start : start + c] = v[i, :, :c]
            self.lens[r] += c


@dataclass
class _Row:
    generator: torch.Generator
    out: list[Segment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # text tokens since the last image
    n_text: int = 0
    n_images: int = 0
    logits: Tensor | None = None  # next-token logits, in LM mode
    image: Tensor | None = None  # the noisy image, in diffusion mode
    step: int = 0
    done: bool = False


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
        drop = probs.cumsum(-1) - probs > gen.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoder:
    """Holds a model, its tokenizer and diffusion settings; ``generate`` runs prompts to outputs."""

    def __init__(self, model: Transfusion, tokenizer: object, diffusion: DiffusionConfig):
        self.model, self.tok, self.dcfg = model.eval(), tokenizer, diffusion
        self.sp = Specials.of(tokenizer)
        self.schedule = make_schedule(diffusion)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # --- the model, run on chunks of new positions against the cache -------------------------
    def _run(self, cache: KVCache, rows: Tensor, x: Tensor, is_image: bool) -> tuple[Tensor, list]:
        """x (R, q, D) new positions for cache rows ``rows``; returns hidden (R, q, D) and new (k, v)."""
        R, q, _ = x.shape
        lens = cache.lens[rows]
        S = int(lens.max())
        k_doc = (torch.arange(S)[None, :] >= lens[:, None]).long()  # 0: the row's prefix, 1: padding
        k_doc = torch.cat([k_doc, torch.zeros(R, q, dtype=torch.long)], dim=1).to(self.device)
        k_img = torch.zeros(R, S + q, dtype=torch.long, device=self.device)
        k_img[:, S:] = int(is_image)  # the new patches form one image: bidirectional among themselves
        q_doc = torch.zeros(R, q, dtype=torch.long, device=self.device)
        mask = masks.dense_mask(k_doc, k_img, q_doc, k_img[:, S:], q_offset=S)
        positions = (lens[:, None] + torch.arange(q)[None, :]).to(self.device)  # (R, q)
        return self.model.trunk(x, positions, mask, cache.past(rows, S))

    def _text_step(self, cache: KVCache, rows: Tensor, tokens: list[int]) -> Tensor:
        x = self.model.tok_emb(torch.tensor(tokens, device=self.device)[:, None])  # (R, 1, D)
        h, kv = self._run(cache, rows, x, is_image=False)
        cache.commit(rows, kv, torch.ones(len(rows), dtype=torch.long))
        return self.model.lm_head(h[:, -1]).float()  # (R, V)

    def _image_pred(self, cache: KVCache, rows: Tensor, images: Tensor, t: Tensor, commit: bool) -> Tensor:
        patches, ctx = self.model.patcher.encode(images.to(self.dtype), t.to(self.device))  # (R, n, D)
        h, kv = self._run(cache, rows, patches, is_image=True)
        if commit:
            cache.commit(rows, kv, torch.full((len(rows),), patches.shape[1], dtype=torch.long))
        return self.model.patcher.decode(h, ctx).float()  # (R, C, H, W)

    def _prefill(self, cache: KVCache, rows: Tensor, samples: list[Sample]) -> Tensor:
        """Run whole prompts (packed one per row) into the cache; returns last-position logits (R, V)."""
        cfg = self.model.cfg
        lengths = [len(_flat(s, self.sp, cfg.patches_per_image)) for s in samples]
        if max(lengths) > cache.capacity:
            raise ValueError(
                f"prompt needs {max(lengths)} positions but the model's context is {cache.capacity}; shorten it"
            )
        b = pack(samples, max(lengths), self.sp, cfg.patches_per_image, one_per_row=True).to(self.device)
        x, ctx = self.model.embed(b.ids, b.patch_mask, b.latents.to(self.dtype), b.timesteps.clamp(min=0))
        mask = masks.dense_mask(b.doc_ids, b.image_index)
        h, kv = self.model.trunk(x, b.positions, mask)
        cache.commit(rows, kv, torch.tensor(lengths))
        last = torch.tensor(lengths, device=self.device) - 1
        return self.model.lm_head(h[torch.arange(len(samples), device=self.device), last]).float()

    # --- the loop -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[Segment]],
        gen: GenerationConfig,
        seeds: list[int] | None = None,
        force_image: list[bool] | None = None,
    ) -> list[list[Segment]]:
        """Continue every prompt; returns each row's output segments (text and image latents).

        ``seeds`` gives each row its own generator (default 0, 1, ...); ``force_image`` overrides
        ``gen.force_image`` per row, so one batch can mix captioning and text-to-image rows."""
        cfg = self.model.cfg
        force = [gen.force_image] * len(prompts) if force_image is None else list(force_image)
        seeds = list(range(len(prompts))) if seeds is None else seeds
        if len(seeds) != len(prompts):
            raise ValueError("give one seed per prompt")
        sampler = make_sampler(gen.sampler, self.schedule, gen.steps, self.dcfg.objective)
        guide = gen.cfg_scale != 1.0
        B = len(prompts)
        rows = [_Row(torch.Generator().manual_seed(s)) for s in seeds]
        cache = KVCache(self.model, B, cfg.max_seq_len, self.device, self.dtype)
        # one unconditional twin per row for guidance: BOS BOI, then the image being drawn
        uncond = KVCache(self.model, B, 2 + cfg.patches_per_image, self.device, self.dtype) if guide else None

        samples = [self._prompt_sample(p, f) for p, f in zip(prompts, force)]
        logits = self._prefill(cache, torch.arange(B), samples)
        for i, row in enumerate(rows):
            if force[i]:
                self._start_image(row, uncond, i)
            else:
                row.logits = logits[i]

        while not all(r.done for r in rows):
            # LM rows: sample a token each, then feed them through the model together
            feed: list[tuple[int, int]] = []
            for i, row in enumerate(rows):
                if row.done or row.image is not None:
                    continue
                logits = row.logits
                if row.n_images >= gen.max_images:  # no more images: BOI cannot be sampled
                    logits = logits.clone()
                    logits[self.sp.boi] = float("-inf")
                token = sample_token(logits, gen, row.generator)
                row.n_text += 1
                if token == self.sp.eos or row.n_text > gen.max_new_tokens:
                    row.done = True
                    self._flush_text(row)
                    continue
                if token != self.sp.boi:
                    row.tokens.append(token)
                feed.append((i, token))
            if feed:
                idx = torch.tensor([i for i, _ in feed])
                out = self._text_step(cache, idx, [t for _, t in feed])
                for j, (i, token) in enumerate(feed):
                    row = rows[i]
                    if token == self.sp.boi:
                        self._flush_text(row)
                        self._start_image(row, uncond, i)
                    else:
                        row.logits = out[j]
            # diffusion rows: one denoising step each, as one batch (with their unconditional twins)
            active = [i for i, r in enumerate(rows) if not r.done and r.image is not None]
            if active:
                self._denoise_step(cache, uncond, rows, active, sampler, gen)
        return [r.out for r in rows]

    def _denoise_step(
        self,
        cache: KVCache,
        uncond: KVCache | None,
        rows: list[_Row],
        active: list[int],
        sampler: Sampler,
        gen: GenerationConfig,
    ) -> None:
        idx = torch.tensor(active)
        x = torch.stack([rows[i].image for i in active])  # (R, C, H, W)
        t = torch.tensor([sampler.timesteps[rows[i].step] for i in active])
        if uncond is None:
            pred = self._image_pred(cache, idx, x, t, commit=False)
        else:  # conditional and unconditional branches as one batch, each with its own prefix
            both = self._image_pred_pair(cache, uncond, idx, x, t)
            pred = guided(both[: len(active)], both[len(active) :], gen.cfg_scale)
        for j, i in enumerate(active):
            row = rows[i]
            row.image = sampler.step(pred[j : j + 1], row.step, row.image[None], row.generator)[0]
            row.step += 1
            if row.step == len(sampler.timesteps):
                self._finish_image(cache, i, row, gen)

    def _image_pred_pair(self, cache: KVCache, uncond: KVCache, idx: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """One forward over R conditional rows and their R unconditional twins (shorter prefixes)."""
        R = len(idx)
        patches, ctx = self.model.patcher.encode(
            torch.cat([x, x]).to(self.dtype), torch.cat([t, t]).to(self.device)
        )
        lens = torch.cat([cache.lens[idx], uncond.lens[idx]])
        S = int(lens.max())
        past = [
            (_pad_cat(kc, ku, S), _pad_cat(vc, vu, S))
            for (kc, vc), (ku, vu) in zip(cache.past(idx, S), uncond.past(idx, int(uncond.lens[idx].max())))
        ]
        q = patches.shape[1]
        k_doc = torch.cat(
            [(torch.arange(S)[None, :] >= lens[:, None]).long(), torch.zeros(2 * R, q, dtype=torch.long)], 1
        )
        k_img = torch.zeros(2 * R, S + q, dtype=torch.long)
        k_img[:, S:] = 1
        k_doc, k_img = k_doc.to(self.device), k_img.to(self.device)
        mask = masks.dense_mask(
            k_doc, k_img, torch.zeros(2 * R, q, dtype=torch.long, device=self.device), k_img[:, S:], S
        )
        positions = (lens[:, None] + torch.arange(q)[None, :]).to(self.device)
        h, _ = self.model.trunk(patches, positions, mask, past)
        return self.model.patcher.decode(h, ctx).float()  # (2R, C, H, W)

    def _start_image(self, row: _Row, uncond: KVCache | None, i: int) -> None:
        cfg = self.model.cfg
        shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        row.image = torch.randn(shape, generator=row.generator).to(self.device)
        row.step = 0
        row.logits = None
        if uncond is not None:
            uncond.lens[i] = 0
            self._text_step(uncond, torch.tensor([i]), [self.sp.bos])
            self._text_step(uncond, torch.tensor([i]), [self.sp.boi])

    def _finish_image(self, cache: KVCache, i: int, row: _Row, gen: GenerationConfig) -> None:
        """Write the clean image (t = 0) into the cache, then EOI; back to LM mode."""
        clean = row.image
        self._image_pred(cache, torch.tensor([i]), clean[None], torch.zeros(1, dtype=torch.long), commit=True)
        row.out.append(clean.cpu())
        row.image = None
        row.n_images += 1
        row.logits = self._text_step(cache, torch.tensor([i]), [self.sp.eoi])[0]
        if gen.stop_after_image:
            row.done = True

    def _flush_text(self, row: _Row) -> None:
        if row.tokens:
            row.out.append(self.tok.decode(row.tokens))
            row.tokens = []

    def _prompt_sample(self, prompt: list[Segment], force_image: bool) -> Sample:
        segs: list[Text | Image] = []
        for seg in prompt:
            if isinstance(seg, str):
                segs.append(Text(self.tok.encode(seg)))
            elif isinstance(seg, Tensor):
                cfg = self.model.cfg
                want = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
                if tuple(seg.shape) != want:
                    raise ValueError(
                        f"prompt image latent has shape {tuple(seg.shape)}, the model expects {want}"
                    )
                segs.append(Image(seg.float(), t=0))
            else:
                raise TypeError(f"prompt segments are str or latent tensors, got {type(seg).__name__}")
        if force_image:
            segs.append(Text([self.sp.boi]))
        return Sample(segs, bos=True, eos=False)


def _flat(sample: Sample, sp: Specials, n: int) -> list[int]:
    from transfusion.sequence import layout

    return layout(sample, sp, n)[0]


def _pad_cat(a: Tensor, b: Tensor, S: int) -> Tensor:
    """Stack two (R, Hk, s, Dh) caches along rows, right-padding the shorter one to S positions."""

    def pad(x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, S - x.shape[2]))

    return torch.cat([pad(a), pad(b)])


# --- conveniences -------------------------------------------------------------------------------
def text_to_image(
    decoder: Decoder, captions: list[str], gen: GenerationConfig | None = None, seeds: list[int] | None = None
) -> list[Tensor]:
    """One latent (C, H, W) per caption."""
    gen = gen or GenerationConfig()
    gen = GenerationConfig(**{**gen.__dict__, "force_image": True, "stop_after_image": True, "max_images": 1})
    outs = decoder.generate([[c] for c in captions], gen, seeds)
    return [next(s for s in out if isinstance(s, Tensor)) for out in outs]


def caption(
    decoder: Decoder,
    latents: list[Tensor],
    gen: GenerationConfig | None = None,
    seeds: list[int] | None = None,
) -> list[str]:
    """A caption per image latent: image-first prompts, text until EOS (no images drawn)."""
    gen = gen or GenerationConfig(temperature=0.0)
    gen = GenerationConfig(**{**gen.__dict__, "force_image": False, "max_images": 0})
    outs = decoder.generate([[z] for z in latents], gen, seeds)
    return ["".join(s for s in out if isinstance(s, str)).strip() for out in outs]
