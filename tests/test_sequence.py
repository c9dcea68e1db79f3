import pytest
import torch

from transfusion.config import tiny
from transfusion.sequence import IGNORE, Image, Sample, Specials, Text, pack, sample_length

from helpers import TOK, latent, mixed_samples

SP = Specials.of(TOK)
CFG = tiny()
N = CFG.patches_per_image


def test_layout_of_one_caption_first_sample():
    s = Sample([Text(TOK.encode("ab")), Image(latent(CFG))])
    b = pack([s], 16, SP, N)
    expected = [SP.bos, 97, 98, SP.boi] + [SP.pad] * N + [SP.eoi, SP.eos]
    L = len(expected)
    assert b.ids[0, :L].tolist() == expected
    assert b.image_index[0, :L].tolist() == [0, 0, 0, 0] + [1] * N + [0, 0]
    assert b.positions[0, :L].tolist() == list(range(L))
    # targets: BOS->a, a->b, b->BOI, (BOI input: no loss), patches: none, EOI->EOS, EOS: none
    assert b.text_targets[0, :L].tolist() == [97, 98, SP.boi, IGNORE] + [IGNORE] * N + [SP.eos, IGNORE]
    assert (b.text_targets[0, L:] == IGNORE).all() and (b.ids[0, L:] == SP.pad).all()
    assert b.num_images == 1 and b.timesteps.tolist() == [-1]


def test_packing_several_samples_per_row_and_ordering():
    samples = mixed_samples(CFG)
    lengths = [sample_length(s, N) for s in samples]
    b = pack(samples, sum(lengths[:2]) + 1, SP, N)
    assert b.ids.shape[0] == 3  # first two share a row; the others each need their own
    assert b.doc_ids[0, : lengths[0]].eq(0).all() and b.doc_ids[0, lengths[0] : sum(lengths[:2])].eq(1).all()
    assert b.positions[0, lengths[0]] == 0  # positions restart per sample
    # images numbered row-major: latents line up with h[patch_mask]
    assert b.num_images == 5
    order = [s_.latent for s in samples for s_ in s.segments if isinstance(s_, Image)]
    assert all(torch.equal(a, c) for a, c in zip(order, b.latents))
    assert b.noise_limited.tolist() == [False, False, True, False, False]
    assert b.image_index.max(dim=1).values.tolist() == [2, 1, 2]
    assert int(b.patch_mask.sum()) == 5 * N
    # no text target crosses a sample boundary
    end0 = lengths[0] - 1
    assert b.text_targets[0, end0] == IGNORE


def test_too_long_is_an_error_or_truncated_at_text_boundary():
    s = Sample([Text(TOK.encode("x" * 10)), Image(latent(CFG)), Text(TOK.encode("tail text"))])
    need = sample_length(s, N)
    with pytest.raises(ValueError, match="positions"):
        pack([s], need - 1, SP, N)
    b = pack([s], need - 3, SP, N, allow_truncation=True)
    assert b.stats["truncated"] == 1
    assert b.num_images == 1 and int(b.patch_mask.sum()) == N
    # cut lands inside the tail text; no EOS after a cut
    assert SP.eos not in b.ids[0].tolist()
    # too short for the image: the image goes whole, never cut through
    b = pack([s], 14, SP, N, allow_truncation=True)
    assert b.num_images == 0 and int(b.patch_mask.sum()) == 0
    assert b.ids[0, :11].tolist() == [SP.bos] + [ord("x")] * 10


def test_num_rows_pads_and_checks():
    b = pack(mixed_samples(CFG)[:1], 64, SP, N, num_rows=3)
    assert b.ids.shape == (3, 64)
    assert (b.text_targets[1:] == IGNORE).all()
    with pytest.raises(ValueError, match="num_rows"):
        pack(mixed_samples(CFG), 30, SP, N, num_rows=1)


def test_fixed_timesteps_and_shape_mismatch():
    s = Sample([Image(latent(CFG), t=0), Text([1])])
    assert pack([s], 32, SP, N).timesteps.tolist() == [0]
    bad = Sample([Image(torch.zeros(8, 2, 2)), Image(latent(CFG))])
    with pytest.raises(ValueError, match="shape"):
        pack([bad], 64, SP, N)
