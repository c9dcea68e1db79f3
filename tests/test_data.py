"""Data sources, the paper's pairing rules, the loader's exact resume, the latent cache, bad input."""

import importlib.util
import io
import json
import random
import tarfile
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from transfusion.config import Config, DataConfig, TrainConfig, tiny
from transfusion.data.base import Record
from transfusion.data.latents import LatentShards, build_latents
from transfusion.data.loader import BatchLoader
from transfusion.data.pairing import pair
from transfusion.data.sources import FashionMNIST, make_source
from transfusion.sequence import Image as ImageSeg
from transfusion.sequence import Text
from transfusion.vae import pil_to_tensor, unit_range

from helpers import TOK


def fake_encode(images):
    """A stand-in encoder: 16x16 pixels (PIL images, or uint8 (N, S, S, 3) as the loader sends them)
    -> 4x4 latents with 8 channels."""
    x = pil_to_tensor(images) if isinstance(images, list) else unit_range(images.permute(0, 3, 1, 2))
    return F.avg_pool2d(x, 4).repeat(1, 3, 1, 1)[:, :8]


def png_bytes(size=(20, 20), color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes((40, 20)))
    (tmp_path / "a.txt").write_text("a red thing")
    (tmp_path / "b.png").write_bytes(png_bytes())
    src = make_source(DataConfig(source="folder", path=str(tmp_path), image_size=16, val_fraction=0.0))
    recs = [src[i] for i in range(len(src))]
    assert [r.text for r in recs] == ["a red thing", None]
    assert all(r.image.size == (16, 16) for r in recs)  # shorter side resized, centre-cropped
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"image": "a.png", "caption": "one"})
        + "\n"
        + json.dumps({"path": "b.png", "text": "two"})
        + "\n"
    )
    src = make_source(DataConfig(source="jsonl", path=str(manifest), image_size=16, val_fraction=0.0))
    assert [src[i].text for i in range(2)] == ["one", "two"]
    with pytest.raises(ValueError, match="data.path"):
        make_source(DataConfig(source="folder"))


def test_bad_inputs_are_skipped_and_counted_or_stop_when_strict(tmp_path):
    good = png_bytes()
    (tmp_path / "ok.png").write_bytes(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notimage.png").write_bytes(b"this is text, not a picture")
    (tmp_path / "small.png").write_bytes(png_bytes((8, 8)))
    (tmp_path / "badcap.png").write_bytes(good)
    (tmp_path / "badcap.txt").write_bytes(b"\xff\xfe caption")
    src = make_source(DataConfig(source="folder", path=str(tmp_path), image_size=16, val_fraction=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = {src.items[i][0].name: src[i] for i in range(len(src))}
    assert recs["ok.png"] is not None
    for name in ("empty.png", "truncated.png", "notimage.png", "small.png", "badcap.png"):
        assert recs[name] is None, name
        assert any(name.split(".")[0] in str(w.message) for w in caught), name
    assert dict(src.skipped) == {"empty": 1, "unreadable": 2, "too_small": 1, "not_utf8": 1}
    strict = make_source(
        DataConfig(source="folder", path=str(tmp_path), image_size=16, strict=True, val_fraction=0.0)
    )
    with pytest.raises(ValueError, match="badcap.txt: caption is not UTF-8 .strict mode"):
        [strict[i] for i in range(len(strict))]


def test_text_source(tmp_path):
    (tmp_path / "doc.txt").write_text("first paragraph\n\nsecond one\n")
    src = make_source(DataConfig(source="text", path=str(tmp_path), val_fraction=0.0))
    assert [src[i].text for i in range(len(src))] == ["first paragraph", "second one"]
    assert src[0].image is None


def test_webdataset_source(tmp_path):
    pytest.importorskip("webdataset")
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, data in [
            ("s1.png", png_bytes()),
            ("s1.txt", b"a red square"),
            ("s2.png", b"junk"),
            ("s2.txt", b"x"),
        ]:
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = make_source(DataConfig(source="webdataset", path=str(shard), image_size=16, val_fraction=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = list(src)
    assert recs[0].text == "a red square" and recs[0].image.size == (16, 16)
    assert recs[1] is None and src.skipped["unreadable"] == 1


def test_fashion_mnist_from_debian_package():
    try:
        src = FashionMNIST(DataConfig(source="fashion_mnist", image_size=32), "train")
    except ValueError as e:
        assert "apt-get install dataset-fashion-mnist" in str(e)
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    assert len(src) == 55000
    r = src[0]
    assert r.image.size == (32, 32) and r.image.mode == "RGB"
    assert r.meta["class"] in r.text and r.meta["label"] == 9  # the first training item is an ankle boot
    assert len(FashionMNIST(DataConfig(source="fashion_mnist"), "test")) == 10000


@pytest.mark.parametrize("corpus", [False, True])
def test_pairing_ratios_and_noise_limit(corpus):
    """The paper's mix; with a text corpus (data.text_path) the text-only share comes from that corpus
    (the loader's job), so a captioned record is never turned into text alone and the image-only share
    stays image_only_ratio (it once became text_only_ratio + image_only_ratio: 30% image-only pairs,
    which taught the model to end a sequence after an image instead of captioning it)."""
    cfg = DataConfig(caption_first_prob=0.8, cond_dropout=0.1, text_only_ratio=0.1, image_only_ratio=0.05)
    cfg.text_path = "corpus.txt" if corpus else None
    rec = Record(Image.new("RGB", (16, 16)), "a caption")
    kinds = []
    for i in range(4000):
        s = pair(rec, TOK.encode, cfg, random.Random(f"t-{i}"))
        segs = [type(x).__name__ for x in s.segments]
        if segs == ["Image", "Text"]:
            assert s.segments[0].noise_limited
            kinds.append("image_first")
        elif segs == ["Text", "Image"]:
            assert not s.segments[1].noise_limited
            kinds.append("caption_first")
        elif segs == ["Image"]:
            kinds.append("image_only")
        else:
            kinds.append("text_only")
    f = {k: kinds.count(k) / len(kinds) for k in ("text_only", "image_only", "image_first", "caption_first")}
    text_only = 0.0 if corpus else 0.1
    paired = 1 - text_only - 0.05
    assert f["text_only"] == pytest.approx(text_only, abs=0.015)
    assert f["image_first"] == pytest.approx(paired * 0.2, abs=0.02)
    assert f["caption_first"] == pytest.approx(paired * 0.8 * 0.9, abs=0.02)
    assert f["image_only"] == pytest.approx(0.05 + paired * 0.8 * 0.1, abs=0.015)
    a = pair(rec, TOK.encode, cfg, random.Random("same"))
    b = pair(rec, TOK.encode, cfg, random.Random("same"))
    assert [type(x) for x in a.segments] == [type(x) for x in b.segments]


def test_describe_in_reading_order_rewrites_captions_after_images_only():
    """Image-first captions name the upper or left object first; caption-first ones (prompts) keep
    their wording; the random stream is the same, so every sample is otherwise the one without it."""
    rec = Record(Image.new("RGB", (16, 16)), "a red circle below a blue square")
    plain, rewritten = DataConfig(), DataConfig(describe_in_reading_order=True)
    seen = Counter()
    for i in range(300):
        a = pair(rec, TOK.encode, plain, random.Random(f"r-{i}"))
        b = pair(rec, TOK.encode, rewritten, random.Random(f"r-{i}"))
        assert [type(x) for x in a.segments] == [type(x) for x in b.segments]
        assert [x.seed for x in a.segments if isinstance(x, ImageSeg)] == [
            x.seed for x in b.segments if isinstance(x, ImageSeg)
        ]
        if isinstance(b.segments[0], Text):
            assert TOK.decode(b.segments[0].ids) == rec.text
            seen["prompt"] += 1
        elif len(b.segments) == 2:
            assert TOK.decode(b.segments[1].ids) == "a blue square above a red circle"
            assert TOK.decode(a.segments[1].ids) == rec.text
            seen["caption"] += 1
    assert seen["prompt"] > 150 and seen["caption"] > 30


def loader_cfg():
    cfg = Config(model=tiny(), train=TrainConfig(batch_size=3, seq_len=64))
    cfg.data.image_size = 16
    return cfg


def same(b1, b2):
    return (
        torch.equal(b1.ids, b2.ids)
        and torch.equal(b1.latents, b2.latents)
        and torch.equal(b1.noise_seeds, b2.noise_seeds)
    )


def test_loader_batches_resume_and_sharding():
    cfg = loader_cfg()
    straight = BatchLoader(cfg, TOK, fake_encode)
    batches = [next(straight) for _ in range(6)]
    assert all(b.ids.shape == (3, 64) for b in batches)
    assert all(b.latents.shape[1:] == (8, 4, 4) for b in batches if b.num_images)
    first = BatchLoader(cfg, TOK, fake_encode)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = BatchLoader(cfg, TOK, fake_encode)
    resumed.load_state_dict(state)
    assert all(same(next(resumed), b) for b in batches[3:])
    # two ranks read disjoint indices that together cover the stream
    r0, r1 = BatchLoader(cfg, TOK, fake_encode, 0, 2), BatchLoader(cfg, TOK, fake_encode, 1, 2)
    next(r0), next(r1)
    assert r0.next_index % 2 == 0 and r1.next_index % 2 == 1


def test_latent_store_roundtrip_invalidation_and_resume(tmp_path):
    src = make_source(DataConfig(source="shapes", image_size=16))
    out = tmp_path / "cache"
    build_latents(src, fake_encode, "hash-a", out, count=40, batch_size=16, shard_size=16, progress=False)
    store = LatentShards(out, "hash-a")
    assert len(store) == 40 and store.meta["shards"] == 3
    for i in (0, 17, 39):
        torch.testing.assert_close(store[i].latent, fake_encode([src[i].image])[0])
        assert store[i].text == src[i].text and store[i].image is None
    with pytest.raises(ValueError, match="encode them again"):
        LatentShards(out, "hash-b")
    build_latents(src, lambda px: fake_encode(px) + 1, "hash-b", out, count=40, progress=False)  # rebuilt
    torch.testing.assert_close(LatentShards(out, "hash-b")[0].latent, fake_encode([src[0].image])[0] + 1)
    with pytest.raises(ValueError, match="another VAE"):  # what `transfusion encode` does: never replaces
        build_latents(src, fake_encode, "hash-a", out, count=40, replace=False, progress=False)

    encoded, crash = [], [True]

    def crashing(pixels):
        encoded.append(len(pixels))
        if crash[0] and len(encoded) == 2:
            raise RuntimeError("killed")
        return fake_encode(pixels)

    with pytest.raises(RuntimeError):
        build_latents(
            src, crashing, "hash-c", tmp_path / "c2", count=40, batch_size=16, shard_size=16, progress=False
        )
    assert (
        not (tmp_path / "c2" / "index.json").exists()
        and (tmp_path / "c2" / "shard_00000.safetensors").exists()
    )
    with pytest.raises(ValueError, match="not a complete latent store"):
        LatentShards(tmp_path / "c2", "hash-c")
    encoded.clear()
    crash[0] = False
    build_latents(
        src, crashing, "hash-c", tmp_path / "c2", count=40, batch_size=16, shard_size=16, progress=False
    )
    assert encoded == [16, 8]  # resumed: the first shard was not encoded again
    assert len(LatentShards(tmp_path / "c2", "hash-c")) == 40


def test_latent_store_is_built_by_every_rank(tmp_path):
    """Ranks encode disjoint shards (r, r + world, ...); rank 0 waits for all, then writes the index.
    Here the three ranks run one after another (rank 0 last: it waits for every shard)."""
    src = make_source(DataConfig(source="shapes", image_size=16))
    seen = {r: [] for r in range(3)}

    def encoder(rank):
        return lambda px: (seen[rank].append(len(px)), fake_encode(px))[1]

    kw = dict(count=70, batch_size=8, shard_size=16, world=3, progress=False)
    import threading

    threads = [threading.Thread(target=build_latents, args=(src, encoder(r), "h", tmp_path / "s"), kwargs={**kw, "rank": r})
               for r in (0, 1, 2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(map(sum, seen.values())) == 70 and all(seen.values())  # each item once, every rank worked
    store, one = LatentShards(tmp_path / "s", "h"), None
    build_latents(src, fake_encode, "h", tmp_path / "one", count=70, shard_size=16, progress=False)
    one = LatentShards(tmp_path / "one", "h")
    assert all(torch.equal(store[i].latent, one[i].latent) for i in range(70))


def test_loader_reads_latents_from_the_store(tmp_path):
    cfg = loader_cfg()
    src = make_source(cfg.data)
    build_latents(src, fake_encode, "h", tmp_path / "c", count=200, progress=False)
    a = BatchLoader(cfg, TOK, fake_encode)
    b = BatchLoader(cfg, TOK, lambda ims: 1 / 0, source=LatentShards(tmp_path / "c", "h"))
    for _ in range(3):
        assert same(next(a), next(b))


def test_images_are_segments_with_seeds():
    rec = Record(Image.new("RGB", (16, 16)), "x")
    s = pair(rec, TOK.encode, DataConfig(caption_first_prob=1.0, cond_dropout=0.0), random.Random(0))
    assert (
        isinstance(s.segments[0], Text)
        and isinstance(s.segments[1], ImageSeg)
        and s.segments[1].seed is not None
    )
    seed = s.segments[1].seed
    assert isinstance(seed, int) and 0 <= seed < 2**62
    again = pair(rec, TOK.encode, DataConfig(caption_first_prob=1.0, cond_dropout=0.0), random.Random(0))
    other = pair(rec, TOK.encode, DataConfig(caption_first_prob=1.0, cond_dropout=0.0), random.Random(1))
    assert again.segments[1].seed == seed and other.segments[1].seed != seed  # a function of the sample


def write_folder(root, n, start=0):
    root.mkdir(exist_ok=True)
    for i in range(start, start + n):
        (root / f"img{i:03d}.png").write_bytes(png_bytes(color=(i % 256, 40, 200)))
        (root / f"img{i:03d}.txt").write_text(f"picture {i}")


def test_held_out_split_is_disjoint_stable_and_never_empty(tmp_path):
    write_folder(tmp_path / "d", 200)
    cfg = DataConfig(source="folder", path=str(tmp_path / "d"), image_size=16, val_fraction=0.05)
    names = {s: {p.name for p, _ in make_source(cfg, s).items} for s in ("train", "val", "test")}
    assert names["val"] == names["test"] and not names["train"] & names["val"]
    assert len(names["train"] | names["val"]) == 200 and 2 <= len(names["val"]) <= 25
    write_folder(tmp_path / "d", 50, start=200)  # new files never move old ones between splits
    grown = {p.name for p, _ in make_source(cfg, "val").items}
    assert names["val"] <= grown and not grown & names["train"]
    write_folder(tmp_path / "tiny", 3)  # too few items for 5%: one is still held out
    tiny_cfg = DataConfig(source="folder", path=str(tmp_path / "tiny"), image_size=16, val_fraction=0.05)
    assert len(make_source(tiny_cfg, "val")) == 1 and len(make_source(tiny_cfg, "train")) == 2
    none = DataConfig(source="folder", path=str(tmp_path / "tiny"), image_size=16, val_fraction=0.0)
    assert len(make_source(none, "train")) == 3
    with pytest.raises(ValueError, match="val_fraction"):
        make_source(none, "val")
    (tmp_path / "t.txt").write_text("\n\n".join(f"document {i}" for i in range(100)))
    docs = {s: {make_source(DataConfig(source="text", path=str(tmp_path / "t.txt"), val_fraction=0.1), s)[i].text
                for i in range(len(make_source(DataConfig(source="text", path=str(tmp_path / "t.txt"), val_fraction=0.1), s)))}
            for s in ("train", "val")}  # fmt: skip
    assert not docs["train"] & docs["val"] and len(docs["train"] | docs["val"]) == 100


def test_text_corpus_mixed_in_beside_image_captions(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"language document number {i}" for i in range(50)))
    cfg = loader_cfg()
    cfg.data.text_path = str(tmp_path / "corpus.txt")
    cfg.data.text_only_ratio = 0.3
    cfg.data.val_fraction = 0.0
    loader = BatchLoader(cfg, TOK, fake_encode)
    kinds = []
    for i in range(600):
        read = loader.reader.read(i)
        if read.item == -1:  # a document of the text corpus
            assert read.pixels is None and len(read.sample.segments) == 1
            assert TOK.decode(read.sample.segments[0].ids).startswith("language document")
            kinds.append("text")
        else:
            kinds.append("image")
    assert kinds.count("text") / len(kinds) == pytest.approx(0.3, abs=0.06)
    batch = next(loader)  # and batches pack both kinds
    assert batch.num_images > 0


def test_long_samples_stop_with_the_item_named_or_are_truncated_and_counted(tmp_path):
    manifest = tmp_path / "m.jsonl"
    (tmp_path / "a.png").write_bytes(png_bytes())
    manifest.write_text(json.dumps({"image": "a.png", "caption": "a very long caption " * 10}) + "\n")
    cfg = loader_cfg()
    cfg.data = DataConfig(source="jsonl", path=str(manifest), image_size=16, val_fraction=0.0, caption_first_prob=1.0,
                          cond_dropout=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="a.png.*train.seq_len is 64.*data.truncate=true"):
        next(BatchLoader(cfg, TOK, fake_encode))
    cfg.data.truncate = True
    loader = BatchLoader(cfg, TOK, fake_encode)
    batch = next(loader)
    assert loader.stats["truncated"] == 3 and batch.num_images == 0  # the caption is cut, the image dropped


def test_tar_shards_cycle_past_their_end_and_count_skips_by_reason(tmp_path):
    """Local shards are indexed (map-style); remote ones stream through the webdataset package (an
    iterable source, here read from the same local file): both give the same items."""
    from transfusion.data.sources import TarShards, WebDatasetSource

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, data in [("s1.png", png_bytes()), ("s1.txt", b"red"), ("s2.png", b"junk"), ("s2.txt", b"x"),
                          ("s3.png", png_bytes(color=(0, 0, 250))), ("s3.txt", b"blue")]:  # fmt: skip
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = loader_cfg()
    cfg.data = DataConfig(
        source="webdataset", path=str(shard), image_size=16, val_fraction=0.0, cond_dropout=0.0
    )
    assert isinstance(make_source(cfg.data), TarShards)
    sources = [make_source(cfg.data)]
    if importlib.util.find_spec("webdataset"):
        sources.append(WebDatasetSource(cfg.data, "train"))
    for source in sources:
        loader = BatchLoader(cfg, TOK, fake_encode, source=source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reads = [loader.reader.read(i) for i in range(9)]  # three passes over a 3-item shard
        texts = [None if r.sample is None else TOK.decode(next(s.ids for s in r.sample.segments if isinstance(s, Text)))
                 for r in reads]  # fmt: skip
        assert texts == ["red", None, "blue"] * 3
        skipped = sum((Counter(r.skipped) for r in reads), Counter())
        assert skipped == {"skipped": 3, "skipped_unreadable": 3}
        assert {r.item for r in reads if r.sample is None} == {1}  # one item, met on each of three passes


def test_skipped_items_are_counted_once_each_as_well_as_per_encounter(tmp_path):
    """4 unreadable files in a 44-item folder, read over many passes: the per-encounter count grows
    with every pass, the distinct count stays 4 (and survives a resume)."""
    write_folder(tmp_path / "d", 44)
    bad = sorted((tmp_path / "d").glob("*.png"))[::11]
    for f in bad:
        f.write_bytes(b"not a png")
    cfg = loader_cfg()
    cfg.data = DataConfig(source="folder", path=str(tmp_path / "d"), image_size=16, val_fraction=0.0)
    loader = BatchLoader(cfg, TOK, fake_encode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(30):
            next(loader)
    assert loader.stats["skipped"] > 3 * 4  # every pass meets the 4 files again
    assert len(loader.skipped_items) == 4
    again = BatchLoader(cfg, TOK, fake_encode)
    again.load_state_dict(loader.state_dict())
    assert again.skipped_items == loader.skipped_items


def test_latent_cache_follows_the_vae_and_the_files(tmp_path):
    from transfusion.config import VAEConfig
    from transfusion.training import image_encoder
    from transfusion.vae import KLVAE, vae_hash

    write_folder(tmp_path / "d", 6)
    cfg = DataConfig(source="folder", path=str(tmp_path / "d"), image_size=16, val_fraction=0.0)
    vaes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vaes.append(KLVAE(VAEConfig(image_size=16, base_channels=8)).eval())
    (enc_a, enc_b), (ha, hb) = (
        [image_encoder(v, torch.device("cpu")) for v in vaes],
        [vae_hash(v) for v in vaes],
    )
    assert ha != hb
    src, out = make_source(cfg), tmp_path / "cache"
    build_latents(src, enc_a, ha, out, progress=False)
    torch.testing.assert_close(LatentShards(out, ha)[2].latent, enc_a([src[2].image])[0])
    build_latents(src, enc_b, hb, out, progress=False)  # another VAE: rebuilt
    torch.testing.assert_close(LatentShards(out, hb)[2].latent, enc_b([src[2].image])[0])
    (tmp_path / "d" / "img002.png").write_bytes(png_bytes((24, 24), (255, 255, 0)))  # edited data, same count
    src = make_source(cfg)
    build_latents(src, enc_b, hb, out, progress=False)
    torch.testing.assert_close(LatentShards(out, hb)[2].latent, enc_b([src[2].image])[0])


def test_fortune_files_split_at_percent_lines(tmp_path):
    """Debian's fortune format: documents between lines holding a lone '%'; a folder's files without
    a suffix are read beside its .txt files, binary index files (.dat) are not."""
    from transfusion.data.sources import TextFiles, split_documents

    assert split_documents("one\nline two\n%\nthree\n\nstill three\n%\nfour\n") == [
        "one\nline two", "three\n\nstill three", "four\n"]  # fmt: skip
    assert split_documents("a\n\nb") == ["a", "b"]
    (tmp_path / "science").write_text("E = mc^2\n%\nF = ma\n%\n")
    (tmp_path / "science.dat").write_bytes(b"\x00\x01binary")
    (tmp_path / "notes.txt").write_text("para one\n\npara two")
    docs = TextFiles(DataConfig(val_fraction=0.0), "train", str(tmp_path)).docs
    assert sorted(docs) == ["E = mc^2", "F = ma", "para one", "para two"]


def test_worker_processes_give_the_same_stream_and_resume_exactly(tmp_path):
    """Decoding, pairing and tokenizing in 2 worker processes: the same batches as in the training
    process, the same skip counts, and a resumed loader continues bit for bit."""
    write_folder(tmp_path / "d", 44)
    for f in sorted((tmp_path / "d").glob("*.png"))[::11]:
        f.write_bytes(b"not a png")
    cfg = loader_cfg()
    cfg.data = DataConfig(
        source="folder", path=str(tmp_path / "d"), image_size=16, val_fraction=0.0, prefetch=4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        here = BatchLoader(cfg, TOK, fake_encode, 1, 2, workers=0)
        want = [next(here) for _ in range(8)]
        workers = BatchLoader(cfg, TOK, fake_encode, 1, 2, workers=2)
        got = [next(workers) for _ in range(4)]
        state = json.loads(json.dumps(workers.state_dict()))
        resumed = BatchLoader(cfg, TOK, fake_encode, 1, 2, workers=2)
        resumed.load_state_dict(state)
        got += [next(resumed) for _ in range(4)]
    assert all(same(a, b) for a, b in zip(want, got))
    assert here.stats == resumed.stats and here.skipped_items == resumed.skipped_items
    assert here.stats["skipped_unreadable"] > 0
