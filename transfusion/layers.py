"""Building blocks of the Llama-style trunk: RMSNorm, RoPE, attention, SwiGLU, the block, and the
sinusoidal timestep embedding.

Shape legend: B batch rows, L query length, S cached length, D width, H heads,
Hk key/value heads, Dh head width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfusion.config import ModelConfig

KV = tuple[Tensor, Tensor]


@dataclass
class Prefix:
    """The cached keys and values one layer's new positions attend to, read where they lie.

    Decoding appends a few positions (a token, or one image's patches) to long cached prompts.
    Concatenating the cache with the new keys would copy the whole prefix on every step (and, with
    guidance, pad every unconditional twin to the longest prompt), so the batch rows are split into
    ``parts``, each ``(rows, k, v, valid)`` for the next ``rows`` batch rows: cached k/v
    (rows or 1, Hk, S, Dh), views into the cache, and ``valid`` (rows or 1, S), the slots that hold
    positions. A size-1 leading dimension is shared by all the part's rows (one unconditional
    prompt for every twin). The new positions see every cached slot that is valid and each other
    (one token, or one image: bidirectional).
    """

    parts: list[tuple[int, Tensor, Tensor, Tensor | None]]
    causal: bool = False
    """The new positions see only earlier new positions (an image under causal image attention)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, H, L, Dh) and the new k, v (B, Hk, L, Dh) -> (B, H, L, Dh). A part with a prefix per row
        runs as one SDPA call over [prefix, new] (the prefix copied once: it is short next to the
        dozen small ops of the explicit form, which cost more on a CPU); a shared prefix (the twins'
        one unconditional prompt) is read where it lies, never copied per row."""
        B, H, L, Dh = q.shape
        Hk = k.shape[1]
        out, start = [], 0
        for n, pk, pv, valid in self.parts:
            kn, vn = k[start : start + n], v[start : start + n]
            if pk.shape[0] == n:
                out.append(self._joined(q[start : start + n], kn, vn, pk, pv, valid))
                start += n
                continue
            # grouped-query heads: query head h reads key head h // (H // Hk)
            qg = q[start : start + n].reshape(n, Hk, (H // Hk) * L, Dh) * Dh**-0.5
            S = pk.shape[2]
            scores = torch.cat([qg @ pk.transpose(-1, -2), qg @ kn.transpose(-1, -2)], dim=-1)
            if valid is not None:
                scores[..., :S].masked_fill_(~valid[:, None, None, :], float("-inf"))
            if self.causal and L > 1:
                later = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1).repeat(H // Hk, 1)
                scores[..., S:].masked_fill_(later, float("-inf"))  # (rep L, L) rows: query i of each head
            p = scores.float().softmax(-1).to(q.dtype)  # (n, Hk, rep L, S + L)
            y = p[..., :S] @ pv + p[..., S:] @ vn
            out.append(y.view(n, H, L, Dh))
            start += n
        if start != B:
            raise ValueError(f"the prefix parts cover {start} rows, the batch has {B}")
        return torch.cat(out) if len(out) > 1 else out[0]

    def _joined(
        self, q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, valid: Tensor | None
    ) -> Tensor:
        """Attention of q (n, H, L, Dh) over the part's own prefix pk, pv (n, Hk, S, Dh) and the new k, v:
        every valid cached slot, and the new positions (all of them, or the earlier ones when causal)."""
        n, H, L, _ = q.shape
        S = pk.shape[2]
        mask = None
        if valid is not None or (self.causal and L > 1):
            new = torch.ones(L, L, dtype=torch.bool, device=q.device)
            new = new.tril() if self.causal else new
            old = valid[:, None, None, :] if valid is not None else new.new_ones(1, 1, 1, S)
            mask = torch.cat([old.expand(n, 1, L, S), new.expand(n, 1, L, L)], dim=-1)
        keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=k.shape[1] != H)


@dataclass
class Route:
    """Which positions of a (B, L) sequence are image patches, for modality-specific weights (MoT):
    the flat indices of the text positions and of the image positions."""

    text: Tensor
    image: Tensor

    @classmethod
    def of(cls, is_image: Tensor, patches: int | None = None) -> Route:
        """The routes of a (B, L) mask. With ``patches``, the number of True positions as the host
        already knows it (images x patches per image), the indices come from a stable sort on the
        device: no ``nonzero``, whose output size the host would have to wait for."""
        flat = is_image.reshape(-1)
        if patches is None:
            return cls(torch.nonzero(~flat).squeeze(1), torch.nonzero(flat).squeeze(1))
        # text positions first, then patches, each in their order
        order = torch.argsort(flat.to(torch.uint8), stable=True)
        split = flat.shape[0] - patches
        return cls(order[:split], order[split:])


Routing = Route | str | None
"""A ``Route``; 'text' or 'image' when every position has that modality (cached decoding: a token, an
image's patches); None for a model with shared weights."""


class Pair(nn.Module):
    """A text copy and an image copy of one module (a norm or a linear layer): each position goes
    through its modality's copy, gathered, run once, and scattered back: no position computed twice."""

    def __init__(self, make: Callable[[], nn.Module]):
        super().__init__()
        self.text, self.image = make(), make()

    def forward(self, x: Tensor, route: Routing) -> Tensor:
        if route == "text" or route is None:
            return self.text(x)
        if route == "image":
            return self.image(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        yt, yi = self.text(flat[route.text]), self.image(flat[route.image])
        out = yt.new_empty(flat.shape[0], yt.shape[-1], dtype=torch.promote_types(yt.dtype, yi.dtype))
        out[route.text] = yt.to(out.dtype)
        out[route.image] = yi.to(out.dtype)
        return out.view(*lead, -1)


def routed(module: nn.Module, x: Tensor, route: Routing) -> Tensor:
    """``module(x)``, through the modality copies when ``module`` is a ``Pair``."""
    return module(x, route) if isinstance(module, Pair) else module(x)


def maybe_pair(mot: bool, make: Callable[[], nn.Module]) -> nn.Module:
    return Pair(make) if mot else make()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one kernel, the same sum
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE tables indexed by position ids. Uses the half-split ("rotate_half") layout of Hugging
    Face's Llama, so pretrained checkpoints load without permuting q/k weights."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, Dh/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: Tensor, axial: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """positions (B, L) -> cos, sin (B, 1, L, Dh), made once for all layers in the form
        ``apply_rope`` takes: cos repeated over both halves, sin as (-sin, sin). With ``axial`` (B, L, 2), the even frequency
        pairs rotate by its first column and the odd ones by its second (2D positions of image
        patches, ``axial_positions``). The range is checked on the CPU, where it is free (on a GPU it
        would wait for the device and break CUDA graphs and compiled graphs)."""
        if (positions.device.type == "cpu" and not torch.compiler.is_compiling() and positions.numel()
                and int(positions.max()) >= self.cos.shape[0]):  # fmt: skip
            raise ValueError(
                f"position {int(positions.max())} exceeds model.max_seq_len {self.cos.shape[0]}; "
                "use a longer max_seq_len or shorter samples"
            )
        if axial is None:
            cos, sin = self.cos[positions], self.sin[positions]
        else:
            even = torch.arange(self.cos.shape[1], device=positions.device) % 2 == 0
            cos = torch.where(even, self.cos[axial[..., 0]], self.cos[axial[..., 1]])
            sin = torch.where(even, self.sin[axial[..., 0]], self.sin[axial[..., 1]])
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


def axial_positions(positions: Tensor, image_index: Tensor, side: int) -> Tensor:
    """(B, L, 2) positions for 2D RoPE: a text position p is (p, p); the patch k of an image whose first
    patch sits at position s (raster order, ``side`` patches a row) is (s + k // side, s + k % side).
    Computed on the device from the row's positions and image numbers (no host sync)."""
    B, L = positions.shape
    group = image_index + torch.arange(B, device=positions.device)[:, None] * (L + 1)  # (row, image) ids
    first = torch.full(
        (B * (L + 1),), torch.iinfo(positions.dtype).max, device=positions.device, dtype=positions.dtype
    )
    first = first.scatter_reduce(0, group.flatten(), positions.flatten(), "amin")[group]  # (B, L)
    k = positions - first
    patch = image_index > 0
    rows = torch.where(patch, first + k // side, positions)
    cols = torch.where(patch, first + k % side, positions)
    return torch.stack([rows, cols], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, Dh) rotated by the tables of ``RotaryEmbedding`` (B, 1, L, Dh), half-split layout:
    (x1 cos - x2 sin, x2 cos + x1 sin), computed in fp32 (the tables are) and returned in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention, over a whole sequence or after a cached ``Prefix``.

    ``mask`` is a dense boolean (B, 1, L, L) tensor for SDPA or a FlexAttention ``BlockMask``.
    Returns the output and this call's own (k, v) (after RoPE), for the caller to cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        mot = cfg.modality_weights == "mot"
        self.wq = maybe_pair(mot, lambda: nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias))
        self.wk = maybe_pair(mot, lambda: nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias))
        self.wv = maybe_pair(mot, lambda: nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias))
        self.wo = maybe_pair(mot, lambda: nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: object,
        past: Prefix | None = None,
        route: Routing = None,
        keep_kv: bool = True,
    ) -> tuple[Tensor, KV | None]:
        B, L, _ = x.shape
        H, Hk, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        if past is not None and joinable(self.wq, self.wk, self.wv):
            # decoding: one GEMM for q, k and v (weights joined once, ``joined_weights``), one RoPE for q and k
            qkv = F.linear(x, *joined_weights(self, self.wq, self.wk, self.wv)).view(B, L, H + 2 * Hk, Dh)
            qkv = qkv.transpose(1, 2)  # (B, H + 2 Hk, L, Dh)
            qk = apply_rope(qkv[:, : H + Hk], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hk :]
        else:
            q = routed(self.wq, x, route).view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
            k = routed(self.wk, x, route).view(B, L, Hk, Dh).transpose(1, 2)  # (B, Hk, L, Dh)
            v = routed(self.wv, x, route).view(B, L, Hk, Dh).transpose(1, 2)  # (B, Hk, L, Dh)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:  # decoding: new positions after cached ones (``mask`` is unused)
            y = past.attend(q, k, v)
            return routed(self.wo, y.transpose(1, 2).reshape(B, L, -1), route), (k, v)
        new = (k, v) if keep_kv else None  # v is a view: training returns none (FSDP2 warns of views)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, Tensor) or mask is None:
            if gqa:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
        else:
            y = _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)
        return routed(self.wo, y.transpose(1, 2).reshape(B, L, -1), route), new


@functools.cache
def _flex_attention(compiled: bool):
    """FlexAttention, compiled into a fused kernel on CUDA. On CPU it runs unfused (forward only in
    torch 2.13): useful to check that both backends agree, not for speed."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        return torch.compile(flex_attention, dynamic=False)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, mot: bool = False):
        super().__init__()
        self.gate = maybe_pair(mot, lambda: nn.Linear(dim, hidden, bias=False))
        self.up = maybe_pair(mot, lambda: nn.Linear(dim, hidden, bias=False))
        self.down = maybe_pair(mot, lambda: nn.Linear(hidden, dim, bias=False))

    def forward(self, x: Tensor, route: Routing = None, decoding: bool = False) -> Tensor:
        if decoding and joinable(self.gate, self.up):  # one GEMM for gate and up (``joined_weights``)
            gate, up = F.linear(x, *joined_weights(self, self.gate, self.up)).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return routed(self.down, F.silu(routed(self.gate, x, route)) * routed(self.up, x, route), route)


def joinable(*linears: nn.Module) -> bool:
    """Whether ``linears`` (reading the same input) may run as one GEMM here: plain linear layers (not
    MoT pairs), without gradients (decoding)."""
    return not torch.is_grad_enabled() and all(type(m) is nn.Linear for m in linears)


def joined_weights(owner: nn.Module, *linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The weights (and biases) of ``linears`` stacked into one matrix, made on first use and kept on
    ``owner`` while every weight is the tensor it was, unchanged (its storage and its version counter:
    an optimizer step, ``load_state_dict`` or ``.to()`` makes it anew). Decoding a small model is bound
    by the number of ops per step, not their size: q, k and v in one GEMM, and gate and up in one, cut
    a block's ops by a quarter. Never used with gradients: training keeps its separate GEMMs."""
    key = tuple((t.data_ptr(), t._version) for m in linears for t in (m.weight, m.bias) if t is not None)
    cached = owner.__dict__.get("_joined")
    if cached is None or cached[0] != key:
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        cached = owner.__dict__["_joined"] = (key, weight, bias)
    return cached[1], cached[2]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). With modality-specific
    weights (``model.modality_weights=mot``) every norm and linear layer is a ``Pair`` and ``route``
    says which positions take the image copies; attention still runs over the whole sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mot = cfg.modality_weights == "mot"
        self.attn_norm = maybe_pair(mot, lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.attn = Attention(cfg)
        self.mlp_norm = maybe_pair(mot, lambda: RMSNorm(cfg.dim, cfg.norm_eps))
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim, mot)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: object,
        past: Prefix | None = None,
        route: Routing = None,
        keep_kv: bool = True,
    ) -> tuple[Tensor, KV | None]:
        """The block's output and its new positions' (k, v); None for them with ``keep_kv=False``
        (training: nothing to cache, and no view of an activation leaves an FSDP2-wrapped block,
        where an in-place op on it would skip FSDP's pre-backward hook)."""
        h, kv = self.attn(routed(self.attn_norm, x, route), cos, sin, mask, past, route, keep_kv)
        x = x + h
        return x + self.mlp(routed(self.mlp_norm, x, route), route, past is not None), kv


def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal features of (possibly fractional) timesteps: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP to ``out_dim``."""

    def __init__(self, freq_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal(t, self.freq_dim))  # (N, out_dim)
