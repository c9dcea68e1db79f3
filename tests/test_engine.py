"""The decoding engine: requests join a running batch at any tick, leave when done or cancelled, and
each one's output equals what ``Decoder.generate`` gives it alone."""

import torch
from test_generate import SP, IdTokenizer, random_head

from transfusion.config import DiffusionConfig, tiny
from transfusion.generate import Decoder, GenerationConfig
from transfusion.model import Transfusion

from helpers import latent


def decoder(seed=7):
    torch.manual_seed(seed)
    model = random_head(Transfusion(tiny(max_seq_len=128)))
    with torch.no_grad():  # BOI is sampled now and then: rows switch modes at different ticks
        model.tok_emb.weight[:, 0] += 1.0
        model.lm_head.weight[SP.boi, 0] = 0.6
    return Decoder(model, IdTokenizer(), DiffusionConfig(guidance_max_t=600))


def same(a, b):
    assert [type(s) for s in a] == [type(s) for s in b], (a, b)
    for x, y in zip(a, b):
        assert x == y if isinstance(x, str) else torch.allclose(x, y, atol=1e-5, rtol=1e-5)


def test_rows_join_and_leave_a_running_batch_and_equal_generate_alone():
    dec = decoder()
    cfg = dec.model.cfg
    t2i = dec.settings(GenerationConfig(steps=5, cfg_scale=3.0, stop_after_image=True, force_image=True))
    cap = dec.settings(GenerationConfig(max_new_tokens=6, temperature=0.0, max_images=0))
    mixed = dec.settings(
        GenerationConfig(max_new_tokens=6, steps=3, cfg_scale=2.0, max_images=2, sampler="ddim")
    )
    requests = [  # (tick it arrives, prompt, settings, seed, force_image)
        (0, ["a red circle"], t2i, 11, True),
        (0, [latent(cfg)], cap, 12, False),
        (2, ["x", latent(cfg), "y z"], mixed, 13, False),
        (3, ["two blue squares"], t2i, 14, True),
        (4, ["more text"], mixed, 15, False),
        (9, [latent(cfg), "this is"], cap, 16, False),
    ]
    engine = dec.engine(rows=3, capacity=cfg.max_seq_len)
    rows, tick, joined_busy = [], 0, False
    while tick < 10 or not engine.idle:
        for at, prompt, gen, seed, force in requests:
            if at == tick:
                joined_busy |= bool(engine.active)
                rows.append(engine.add(dec.row(prompt, gen, seed, force)))
        engine.tick()
        assert len(engine.active) <= 3
        tick += 1
    assert joined_busy and all(row.done for row in rows)
    for row, (_, prompt, gen, seed, force) in zip(rows, requests):
        same(row.out, dec.generate([prompt], gen, [seed], [force])[0])


def test_a_cancelled_row_frees_its_cache_row_at_the_next_tick_and_events_arrive():
    dec = decoder()
    gen = dec.settings(GenerationConfig(steps=6, cfg_scale=3.0, stop_after_image=True, force_image=True))
    engine = dec.engine(rows=1, capacity=dec.model.cfg.max_seq_len)
    events: list[tuple[str, dict]] = []
    first = engine.add(
        dec.row(["a"], gen, 1, True, events=lambda k, p: events.append((k, p)), preview_every=2)
    )
    second = engine.add(dec.row(["b"], gen, 2, True))
    engine.tick()
    engine.tick()
    assert engine.active == [first] and second.slot == -1  # one cache row: the second waits
    engine.cancel(first)
    engine.tick()  # the cancelled row leaves at the end of this tick
    assert first.done and not first.out and engine.active == []
    engine.tick()
    assert engine.active == [second]
    while not engine.idle:
        engine.tick()
    same(second.out, dec.generate([["b"]], gen, [2], [True])[0])
    steps = [p for k, p in events if k == "step"]
    assert [p["step"] for p in steps] == [0, 1] and steps[0]["preview"].shape == tuple(
        latent(dec.model.cfg).shape
    )
    assert steps[1]["preview"] is None and not any(k == "done" for k, _ in events)  # cancelled: no done
