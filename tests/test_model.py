import pytest
import torch

from transfusion.config import PRESETS, ModelConfig, preset, tiny
from transfusion.model import Transfusion
from transfusion.patching import patchify, unpatchify
from transfusion.sequence import Image, Sample, Specials, Text, pack

from helpers import TOK, latent, mixed_samples

SP = Specials.of(TOK)


def noised(b, t=250):
    return b.replace(timesteps=torch.full((b.num_images,), t))


def run(model, b):
    with torch.no_grad():
        return model(b)


@pytest.fixture(scope="module")
def model():
    m = Transfusion(tiny()).eval()
    # give the zero-initialised image head weights so that image outputs depend on their inputs
    torch.nn.init.normal_(m.patcher.proj_out.weight, std=0.02)
    return m


def caption_image_caption(cfg):
    return Sample([Text(TOK.encode("abc")), Image(latent(cfg)), Text(TOK.encode("after"))])


def test_later_token_changes_no_earlier_output(model):
    cfg = model.cfg
    b = noised(pack([caption_image_caption(cfg)], 40, SP, cfg.patches_per_image))
    ref = run(model, b)
    p = 2 + cfg.patches_per_image + 4  # a text position after the image
    ids = b.ids.clone()
    ids[0, p] = (ids[0, p] + 7) % 256
    out = run(model, b.replace(ids=ids))
    torch.testing.assert_close(out.logits[0, :p], ref.logits[0, :p], atol=0, rtol=0)
    torch.testing.assert_close(out.image_pred, ref.image_pred, atol=0, rtol=0)
    assert not torch.allclose(out.logits[0, p], ref.logits[0, p])


def test_one_patch_changes_its_whole_image_and_no_earlier_text(model):
    cfg = model.cfg
    b = noised(pack([caption_image_caption(cfg)], 40, SP, cfg.patches_per_image))
    ref = run(model, b)
    lat = b.latents.clone()
    lat[0, :, -1, -1] += 3.0  # the last patch only (raster order)
    out = run(model, b.replace(latents=lat))
    start = 5  # BOS a b c BOI
    torch.testing.assert_close(out.logits[0, :start], ref.logits[0, :start], atol=0, rtol=0)
    # every patch of the image sees the change, including the first ones (bidirectional)
    per_patch = (patchify(out.image_pred, cfg.patch_size) - patchify(ref.image_pred, cfg.patch_size)).abs()
    assert (per_patch.flatten(2).amax(-1) > 1e-6).all()
    # and every later text position sees it too
    end = start + cfg.patches_per_image
    assert ((out.logits[0, start : end + 5] - ref.logits[0, start : end + 5]).abs().amax(-1) > 1e-6).all()


def test_image_never_sees_a_later_image(model):
    cfg = model.cfg
    s = Sample([Image(latent(cfg)), Text(TOK.encode("x")), Image(latent(cfg))])
    b = noised(pack([s], 40, SP, cfg.patches_per_image))
    ref = run(model, b)
    lat = b.latents.clone()
    lat[1] += 1.0
    out = run(model, b.replace(latents=lat))
    torch.testing.assert_close(out.image_pred[0], ref.image_pred[0], atol=0, rtol=0)
    assert not torch.allclose(out.image_pred[1], ref.image_pred[1])


def test_packed_rows_equal_samples_run_alone(model):
    cfg = model.cfg
    samples = mixed_samples(cfg)
    packed = noised(pack(samples, 128, SP, cfg.patches_per_image))
    assert packed.ids.shape[0] == 1
    out = run(model, packed)
    offset, img = 0, 0
    for s in samples:
        alone = noised(pack([s], 64, SP, cfg.patches_per_image))
        ref = run(model, alone)
        L = int((alone.doc_ids[0] == 0).sum())
        torch.testing.assert_close(
            out.logits[0, offset : offset + L], ref.logits[0, :L], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            out.image_pred[img : img + ref.image_pred.shape[0]], ref.image_pred, atol=1e-5, rtol=1e-5
        )
        offset += L
        img += ref.image_pred.shape[0]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patch_sizes_roundtrip_and_forward(k):
    cfg = tiny(latent_size=8, patch_size=k)
    x = torch.randn(3, 8, 8, 8)
    p = patchify(x, k)
    assert p.shape == (3, (8 // k) ** 2, 8 * k * k)
    # raster order: patch j covers rows (j // side)*k.., cols (j % side)*k..
    side = 8 // k
    j = side + 1 if side > 1 else 0
    r, c = (j // side) * k, (j % side) * k
    assert torch.equal(p[1, j].view(8, k, k), x[1, :, r : r + k, c : c + k])
    assert torch.equal(unpatchify(p, k, 8, 8, 8), x)
    m = Transfusion(cfg)
    b = noised(pack([Sample([Text([1, 2]), Image(latent(cfg))])], 96, SP, cfg.patches_per_image))
    out = m(b)
    assert out.image_pred.shape == (1, 8, 8, 8)
    assert torch.count_nonzero(out.image_pred) == 0  # zero-initialised noise head


def test_bad_configs_say_what_to_fix():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ModelConfig(latent_size=6, patch_size=4)
    with pytest.raises(ValueError, match="patch_size"):
        ModelConfig(patch_size=3)
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


@pytest.mark.parametrize(
    "name,billions", [("0.16B", 0.16), ("0.37B", 0.37), ("0.76B", 0.76), ("1.4B", 1.4), ("7B", 7.0)]
)
def test_paper_presets_build_on_meta_with_their_size(name, billions):
    with torch.device("meta"):
        m = Transfusion(PRESETS[name]())
    n = m.num_params()
    assert abs(n / 1e9 - billions) / billions < 0.15, f"{name}: {n / 1e9:.3f}B"
    assert all(p.is_meta for p in m.parameters())


def test_rope_position_limit_is_a_clear_error():
    cfg = tiny(max_seq_len=16)
    m = Transfusion(cfg)
    b = noised(pack([Sample([Text(list(range(30)))])], 32, SP, cfg.patches_per_image))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(b)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_unet_patcher_shapes_gradients_and_attention_rule(k):
    cfg = tiny(latent_size=8, patch_size=k, patcher="unet", unet_channels=8)
    m = Transfusion(cfg)
    torch.nn.init.normal_(m.patcher.conv_out.weight, std=0.02)
    s = Sample([Text([1, 2]), Image(latent(cfg)), Text([3])])
    b = noised(pack([s], 96, SP, cfg.patches_per_image))
    out = m(b)
    assert out.image_pred.shape == (1, 8, 8, 8)
    (out.image_pred.pow(2).mean() + out.logits.logsumexp(-1).mean()).backward()
    for name, p in m.patcher.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the U-Net's tokens still obey the rule: text before the image ignores it
    lat = b.latents.clone()
    lat[0] += 1.0
    with torch.no_grad():
        ref, new = m(b), m(b.replace(latents=lat))
    torch.testing.assert_close(new.logits[0, :3], ref.logits[0, :3], atol=0, rtol=0)
    assert not torch.allclose(new.image_pred, ref.image_pred)


def test_2d_rope_positions_and_text_unchanged():
    """2D RoPE: patch k of an image starting at position s sits at (s + k // side, s + k % side); text
    at (p, p), so a text-only sequence gives exactly the 1D model's outputs."""
    from transfusion.layers import axial_positions
    from transfusion.sequence import Image, Sample, Specials, Text, pack

    from helpers import TOK, latent

    cfg = tiny(latent_size=8)  # 4 x 4 patches a side... of 2x2: side 4
    sp = Specials.of(TOK)
    b = pack(
        [Sample([Text([1, 2]), Image(latent(cfg))]), Sample([Image(latent(cfg))])],
        64,
        sp,
        cfg.patches_per_image,
    )
    ax = axial_positions(b.positions, b.image_index, cfg.patches_per_side)
    side = cfg.patches_per_side
    for row in range(b.ids.shape[0]):
        for i in range(b.ids.shape[1]):
            p = int(b.positions[row, i])
            if b.image_index[row, i] == 0:
                assert ax[row, i].tolist() == [p, p]
            else:
                first = int(b.positions[row][b.image_index[row] == b.image_index[row, i]].min())
                k = p - first
                assert ax[row, i].tolist() == [first + k // side, first + k % side]
    # decoding: one image's patches after 14 cached positions, positions far beyond the row's length
    new = torch.tensor([[14, 15, 16, 17]])
    assert axial_positions(new, torch.ones_like(new), 2).tolist() == [
        [[14, 14], [14, 15], [15, 14], [15, 15]]
    ]
    torch.manual_seed(0)
    one, two = Transfusion(tiny()), Transfusion(tiny(rope_2d=True))
    two.load_state_dict(one.state_dict())
    text = pack([Sample([Text(TOK.encode("a red circle"))])], 32, sp, 4)
    torch.testing.assert_close(two(text).logits, one(text).logits, atol=0, rtol=0)
    with_image = pack([Sample([Text([5]), Image(latent(tiny()))])], 32, sp, 4)
    with_image = with_image.replace(timesteps=torch.zeros(1, dtype=torch.long))
    assert not torch.allclose(two(with_image).logits, one(with_image).logits)  # patches moved


def test_image_pos_embed_adds_one_vector_per_patch_place():
    """Zero (as initialised) it is the paper's model exactly; set, it equals the paper's model with the
    vector of each place added to the patcher's output for that place in every image, text untouched;
    and training reaches it."""
    torch.manual_seed(0)
    cfg = tiny()
    base, placed = Transfusion(cfg).eval(), Transfusion(tiny(image_pos_embed=True)).eval()
    missing = placed.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing == ["image_pos"]
    torch.nn.init.normal_(base.patcher.proj_out.weight, std=0.02)
    torch.nn.init.normal_(placed.patcher.proj_out.weight, std=0.02)
    placed.patcher.proj_out.weight.data.copy_(base.patcher.proj_out.weight)
    two = Sample([Text(TOK.encode("ab")), Image(latent(cfg)), Text(TOK.encode("c")), Image(latent(cfg))])
    b = noised(pack([two], 48, SP, cfg.patches_per_image))
    ref = run(base, b)
    out = run(placed, b)
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.image_pred, ref.image_pred, atol=0, rtol=0)

    with torch.no_grad():
        placed.image_pos.normal_(0.0, 1.0)
    encode = base.patcher.encode

    def shifted(x, t):  # the reference: the place vectors added by hand
        tokens, ctx = encode(x, t)
        return tokens + placed.image_pos, ctx

    base.patcher.encode = shifted
    ref = run(base, b)
    del base.patcher.encode
    out = run(placed, b)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.image_pred, ref.image_pred)
    assert not torch.allclose(out.image_pred, run(base, b).image_pred)
    start = 4  # BOS a b BOI: text before the first image is untouched
    torch.testing.assert_close(out.logits[0, :start], run(base, b).logits[0, :start], atol=0, rtol=0)

    placed.train()
    loss = ((placed(b).image_pred - b.latents) ** 2).mean()
    loss.backward()
    assert placed.image_pos.grad is not None and bool(placed.image_pos.grad.abs().gt(0).all())


def test_image_pos_embed_needs_continuous_images():
    with pytest.raises(ValueError, match="image_pos_embed needs continuous images"):
        ModelConfig(image_pos_embed=True, image_tokens="discrete", codebook_size=16, patch_size=1,
                    latent_channels=1)  # fmt: skip
