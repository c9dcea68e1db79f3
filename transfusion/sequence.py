"""Mixed sequences: the one place that knows the layout of text and images in a row.

A ``Sample`` is an ordered list of ``Text`` and ``Image`` segments, in any number and order
(caption-first, image-first, interleaved documents). ``pack`` lays samples into fixed-length rows
(several per row when they fit) and returns a ``MixedBatch`` of tensors. One sample reads::

    BOS  t t t  BOI  p p p p  EOI  t t  EOS        (p: one position per k x k latent patch)

Shape legend: B rows, L row length, N images in the batch, C/H/W latent channels/height/width.

Per position the batch holds the token id (PAD at patch positions), ``image_index`` (0 for text, k
for the k-th image of the row, counted from 1), ``doc_ids`` (which sample of the row; padding is its
own sample), ``positions`` (RoPE position, restarting at 0 for every sample), and ``text_targets``
(the next token where the LM loss applies, else -100). Images are numbered in row-major order, so
``h[batch.patch_mask]`` lists the patches image by image in the order of ``batch.latents``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

IGNORE = -100
"""Target value where no text loss applies (``F.cross_entropy``'s ignore_index)."""


@dataclass
class Text:
    """Token ids of a text segment (without special tokens)."""

    ids: list[int]


@dataclass
class Image:
    """An image as a clean VAE latent (C, H, W), already scaled for diffusion.

    ``noise_limited`` marks an image placed before its caption: training noises it only up to the
    noise limit (PAPER.md: t <= 500). ``t`` fixes the timestep (0 for a clean prompt image); None
    lets training sample it.
    """

    latent: Tensor
    noise_limited: bool = False
    t: int | None = None
    seed: int | None = None
    """Seeds this image's timestep and noise in training, so they depend on the sample, not on the
    batch or process it lands in (exact resume, and DDP equal to one process)."""
    condition: bool = False
    """An input the model reads but is not trained to make (the image an edit starts from): training
    keeps it clean at t = 0 and puts no loss on it."""

    def __post_init__(self) -> None:
        if self.condition and self.t not in (None, 0):
            raise ValueError(f"a condition image is clean (t = 0), got t={self.t}")
        if self.condition:
            self.t = 0


@dataclass
class Sample:
    """An ordered list of segments. ``bos``/``eos``: whether to open with BOS and close with EOS;
    ``text_loss``: whether its text is trained on (an edit trains on its output image only)."""

    segments: list[Text | Image]
    bos: bool = True
    eos: bool = True
    text_loss: bool = True

    def __post_init__(self) -> None:
        for seg in self.segments:
            if not isinstance(seg, (Text, Image)):
                raise TypeError(f"a Sample holds Text and Image segments, got {type(seg).__name__}")


@dataclass(frozen=True)
class Specials:
    """The special token ids packing needs (any tokenizer's ``bos_id``... attributes)."""

    bos: int
    eos: int
    boi: int
    eoi: int
    pad: int

    @classmethod
    def of(cls, tokenizer: object) -> Specials:
        t = tokenizer
        return cls(t.bos_id, t.eos_id, t.boi_id, t.eoi_id, t.pad_id)  # type: ignore[attr-defined]


@dataclass
class MixedBatch:
    """Packed rows as tensors. Build it with ``pack``; move it with ``.to(device)``."""

    ids: Tensor  # (B, L) long
    image_index: Tensor  # (B, L) long: 0 text, k >= 1 the k-th image of the row
    doc_ids: Tensor  # (B, L) long: sample index within the row
    positions: Tensor  # (B, L) long: RoPE position within the sample
    text_targets: Tensor  # (B, L) long: next token id, or IGNORE
    latents: Tensor  # (N, C, H, W) float: clean (or, once noised, noisy) latents
    timesteps: Tensor  # (N,) long: the diffusion step of each image, -1 = to be sampled
    noise_limited: Tensor  # (N,) bool: image-first images (t <= noise limit)
    noise_seeds: Tensor | None = None  # (N,) long: per-image seed for t and noise, -1 = none
    conditions: Tensor | None = None  # (N,) bool: clean inputs without a loss (``Image.condition``)
    stats: dict[str, int] = field(default_factory=dict)
    host: MixedBatch | None = field(default=None, repr=False, compare=False)
    """The CPU batch this one was moved from (``to``), so that drawing the noise reads its timesteps,
    seeds and noise-limit flags there instead of waiting for the device; None when built here."""

    @property
    def patch_mask(self) -> Tensor:
        """(B, L) bool: positions that hold image patches."""
        return self.image_index > 0

    @property
    def num_images(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device | str) -> MixedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        host = self.host if self.host is not None else (self if self.ids.device.type == "cpu" else None)
        return dataclasses.replace(self, **moved, host=host)

    def on_host(self) -> MixedBatch:
        """This batch's CPU copy (itself when it lives on the CPU): what the host may read for free."""
        if self.ids.device.type == "cpu":
            return self
        return self.host if self.host is not None else self.to("cpu")

    def replace(self, **changes: object) -> MixedBatch:
        """A copy with ``changes``; it keeps ``host`` unless a change touches what the host copy holds."""
        if {"timesteps", "noise_limited", "noise_seeds", "ids", "image_index"} & changes.keys():
            changes.setdefault("host", None)
        return dataclasses.replace(self, **changes)


def sample_length(sample: Sample, patches_per_image: int) -> int:
    """Positions a sample takes: BOS, text, BOI + patches + EOI per image, EOS."""
    n = int(sample.bos) + int(sample.eos)
    for seg in sample.segments:
        n += len(seg.ids) if isinstance(seg, Text) else patches_per_image + 2
    return n


def images_as_tokens(sample: Sample, specials: Specials, code_offset: int) -> Sample:
    """The discrete-image layout (the Chameleon baseline): each Image segment, whose latent is a code
    grid (1, h, w) or (h, w), becomes text: BOI, its codes in raster order as ids ``code_offset +
    code``, EOI. Every position is then a token for the one next-token loss, with causal attention."""
    segs: list[Text | Image] = []
    for seg in sample.segments:
        if isinstance(seg, Image):
            codes = seg.latent.reshape(-1).round().long()
            segs.append(Text([specials.boi, *(code_offset + codes).tolist(), specials.eoi]))
        else:
            segs.append(seg)
    return Sample(segs, bos=sample.bos, eos=sample.eos, text_loss=sample.text_loss)


def truncate(sample: Sample, max_len: int, patches_per_image: int) -> Sample:
    """Cut a sample to at most ``max_len`` positions at a text boundary: a text segment may be
    shortened, an image is kept whole or dropped with everything after it. EOS is dropped."""
    out: list[Text | Image] = []
    used = int(sample.bos)
    for seg in sample.segments:
        if isinstance(seg, Text):
            room = max_len - used
            if room <= 0:
                break
            out.append(Text(seg.ids[:room]))
            used += len(out[-1].ids)
            if len(seg.ids) > room:
                break
        else:
            if used + patches_per_image + 2 > max_len:
                break
            out.append(seg)
            used += patches_per_image + 2
    return Sample(out, bos=sample.bos, eos=False, text_loss=sample.text_loss)


def layout(
    sample: Sample, specials: Specials, patches_per_image: int
) -> tuple[list[int], list[int], list[Image]]:
    """One sample as position lists: token ids (PAD at patches), image number per position (0 for
    text, j for the sample's j-th image), and its images in order."""
    ids: list[int] = [specials.bos] if sample.bos else []
    img: list[int] = [0] * len(ids)
    images: list[Image] = []
    for seg in sample.segments:
        if isinstance(seg, Text):
            ids += [int(t) for t in seg.ids]
            img += [0] * len(seg.ids)
        else:
            images.append(seg)
            ids += [specials.boi] + [specials.pad] * patches_per_image + [specials.eoi]
            img += [0] + [len(images)] * patches_per_image + [0]
    if sample.eos:
        ids.append(specials.eos)
        img.append(0)
    return ids, img, images


class RowPlanner:
    """The one row-packing rule: greedy and in order. A sample goes into the current row when it
    fits, else it opens the next row; with ``max_rows``, a sample that would open one row too many
    is refused (``add`` returns False) and the plan stays as it was. ``pack`` and the training
    loader (``BatchLoader``) both plan with it, so they cannot disagree."""

    def __init__(self, seq_len: int, max_rows: int | None = None):
        self.seq_len, self.max_rows = seq_len, max_rows
        self.rows: list[list[int]] = []
        self.room = 0
        self.count = 0

    def add(self, length: int) -> bool:
        """Place the next sample (index ``count``) of ``length`` positions; False if it does not fit."""
        if length > self.seq_len:
            raise ValueError(f"a sample of {length} positions cannot fit rows of {self.seq_len}")
        if length > self.room:
            if self.max_rows is not None and len(self.rows) == self.max_rows:
                return False
            self.rows.append([])
            self.room = self.seq_len
        self.rows[-1].append(self.count)
        self.count += 1
        self.room -= length
        return True


def fit_length(
    sample: Sample, seq_len: int, patches_per_image: int, allow_truncation: bool, name: str
) -> Sample:
    """The sample itself when it fits a row; cut at a text boundary (``truncate``) when it is too
    long and truncation is allowed; else a ``ValueError`` naming it and the two ways out."""
    n = sample_length(sample, patches_per_image)
    if n <= seq_len:
        return sample
    if not allow_truncation:
        raise ValueError(
            f"{name}: the sample needs {n} positions but rows hold {seq_len} (train.seq_len is {seq_len}); "
            "raise train.seq_len, or set data.truncate=true to cut long samples at a text boundary"
        )
    return truncate(sample, seq_len, patches_per_image)


def pack(
    samples: Sequence[Sample],
    seq_len: int,
    specials: Specials,
    patches_per_image: int,
    *,
    num_rows: int | None = None,
    allow_truncation: bool = False,
    one_per_row: bool = False,
    rows: list[list[int]] | None = None,
) -> MixedBatch:
    """Lay samples into rows of ``seq_len`` positions; several samples share a row when they fit
    (``RowPlanner``), or follow ``rows`` (a plan already made, lists of sample indices).

    A sample longer than a row is an error, or with ``allow_truncation`` is cut at a text boundary
    (``truncate``) and counted in ``batch.stats['truncated']``. ``num_rows`` pads the batch with
    empty rows (or raises if the samples need more). ``one_per_row`` puts sample i alone in row i
    (prompts for batched decoding).
    """
    if not samples:
        raise ValueError("pack() needs at least one sample")
    fitted = [
        fit_length(s, seq_len, patches_per_image, allow_truncation, f"sample {i}")
        for i, s in enumerate(samples)
    ]
    truncated = sum(a is not b for a, b in zip(fitted, samples))
    if rows is None and one_per_row:
        rows = [[i] for i in range(len(fitted))]
    elif rows is None:
        planner = RowPlanner(seq_len)
        for s in fitted:
            planner.add(sample_length(s, patches_per_image))
        rows = planner.rows
    rows = [list(r) for r in rows]
    if num_rows is not None:
        if len(rows) > num_rows:
            raise ValueError(f"the samples need {len(rows)} rows of {seq_len}, more than num_rows={num_rows}")
        rows += [[] for _ in range(num_rows - len(rows))]
    batch = _fill_rows(fitted, rows, seq_len, specials, patches_per_image)
    batch.stats = {"truncated": truncated, "samples": len(fitted), "rows": len(rows)}
    return batch


def _fill_rows(
    samples: list[Sample], rows: list[list[int]], seq_len: int, specials: Specials, patches_per_image: int
) -> MixedBatch:
    """The tensors of a packing plan: every sample laid out (``layout``) in its row, in order."""
    B, L = len(rows), seq_len
    # the ids and image numbers as two flat lists, the rest from each piece's length with numpy: per
    # position Python (or a tensor write per sample) costs more than the loader's reading at a GPU's rate
    ids_l: list[int] = []
    img_l: list[int] = []  # the sample's own image numbers (0 = text), -1 for padding
    lengths: list[int] = []  # pieces: every sample of a row, then the row's padding
    docs: list[int] = []  # each piece's sample number in its row
    offsets: list[int] = []  # images of the row before each piece
    scored: list[bool] = []  # whether each piece's text has a loss
    images: list[Image] = []
    for row in rows:
        p, k = 0, 0
        for d, si in enumerate(row):
            row_ids, row_img, row_images = layout(samples[si], specials, patches_per_image)
            ids_l += row_ids
            img_l += row_img
            lengths.append(len(row_ids))
            docs.append(d)
            offsets.append(k)
            scored.append(samples[si].text_loss)
            p, k = p + len(row_ids), k + len(row_images)
            images += row_images
        # padding is a sample of its own so that its rows of the mask are never empty
        ids_l += [specials.pad] * (L - p)
        img_l += [-1] * (L - p)
        lengths.append(L - p)
        docs.append(len(row))
        offsets.append(0)
        scored.append(True)
    n = np.array(lengths)
    img = np.array(img_l, dtype=np.int64)
    starts = np.repeat(np.cumsum(n) - n, n)
    ids = torch.from_numpy(np.array(ids_l, dtype=np.int64)).view(B, L)
    image_index = torch.from_numpy(np.where(img > 0, img + np.repeat(offsets, n), 0)).view(B, L)
    doc_ids = torch.from_numpy(np.repeat(np.array(docs, dtype=np.int64), n)).view(B, L)
    positions = torch.from_numpy(np.arange(B * L, dtype=np.int64) - starts).view(B, L)
    # text positions that belong to a sample (not padding) and carry the text loss
    is_token = torch.from_numpy((img == 0) & np.repeat(np.array(scored, dtype=bool), n)).view(B, L)
    return MixedBatch(
        ids=ids,
        image_index=image_index,
        doc_ids=doc_ids,
        positions=positions,
        text_targets=text_targets(ids, is_token, doc_ids),
        latents=_stack_latents([seg.latent for seg in images]),
        timesteps=torch.tensor([-1 if seg.t is None else int(seg.t) for seg in images], dtype=torch.long),
        noise_limited=torch.tensor([seg.noise_limited for seg in images], dtype=torch.bool),
        noise_seeds=torch.tensor(
            [-1 if seg.seed is None else int(seg.seed) for seg in images], dtype=torch.long
        ),
        conditions=torch.tensor([seg.condition for seg in images], dtype=torch.bool)
        if any(seg.condition for seg in images)
        else None,
    )


def text_targets(ids: Tensor, is_token: Tensor, doc_ids: Tensor) -> Tensor:
    """(B, L) targets of the LM loss: at i, the token at i + 1 when both are text of the same sample,
    else IGNORE. An input BOI is followed by a patch, so it gets no loss (PAPER.md); nor does a
    patch, padding, or the last position of a sample."""
    targets = torch.full_like(ids, IGNORE)
    has_loss = is_token[:, :-1] & is_token[:, 1:] & (doc_ids[:, :-1] == doc_ids[:, 1:])
    targets[:, :-1] = torch.where(has_loss, ids[:, 1:], IGNORE)
    return targets


def _stack_latents(latents: list[Tensor]) -> Tensor:
    if not latents:
        return torch.zeros(0, 0, 0, 0)
    shapes = {tuple(x.shape) for x in latents}
    if len(shapes) > 1:
        raise ValueError(f"all image latents in a batch must share one shape, got {sorted(shapes)}")
    return torch.stack([x.float() for x in latents])
