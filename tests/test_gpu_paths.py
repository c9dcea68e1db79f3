"""Paths that only a GPU exercises, each with a CPU test of its logic (CUDA faked where it has to be)
and a test that runs where CUDA is present: the frozen rows' gradient mask follows the gradient's
device, graph decoding captures on the model's device and keeps its graphs between calls, capture
failures fall back, the block mask is built compiled, TF32, and per-process CUDA random states."""

import pytest
import torch
from test_generate import IdTokenizer, random_head

from transfusion import checkpoint, masks
from transfusion.config import DiffusionConfig, tiny
from transfusion.decoding import graphs as decode_graphs
from transfusion.distributed import use_tf32
from transfusion.generate import Decoder, GenerationConfig
from transfusion.model import Transfusion
from transfusion.pretrained.freeze import row_mask_hook

from helpers import latent

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GEN = GenerationConfig(max_new_tokens=5, steps=4, temperature=1.0, cfg_scale=3.0, max_images=1)


def model_and_prompts(seed=5):
    torch.manual_seed(seed)
    cfg = tiny(patcher="unet", unet_channels=16)
    model = random_head(Transfusion(cfg))
    with torch.no_grad():
        model.lm_head.weight[:, 0] += 0.5
    return model, [["a red circle"], [latent(cfg)], ["two blue"]]


def same(a, b, tol=1e-5):
    for x, y in zip(a, b):
        assert [type(s) for s in x] == [type(s) for s in y]
        for u, v in zip(x, y):
            assert u == v if isinstance(u, str) else torch.allclose(u.cpu(), v.cpu(), atol=tol, rtol=tol)


# --- 1. frozen rows: the mask follows the gradient ---------------------------------------------------
def test_row_mask_follows_the_gradients_device():
    """The mask is made on the CPU when the model is frozen there; a gradient on another device (meta
    stands in for CUDA) must not meet a CPU mask, which is the crash at the first backward on CUDA."""
    mask = torch.tensor([[True], [False], [True]])
    hook = row_mask_hook(mask)
    g = torch.ones(3, 4)
    assert torch.equal(hook(g), torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4]))
    out = hook(torch.ones(3, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 4)


@needs_cuda
def test_row_mask_after_moving_the_model_to_cuda():
    emb = torch.nn.Embedding(3, 4)
    emb.weight.register_hook(row_mask_hook(torch.tensor([[True], [False], [True]])))
    emb.cuda()
    emb(torch.tensor([0, 1, 2], device="cuda")).sum().backward()
    assert emb.weight.grad[1].abs().sum() == 0 and emb.weight.grad[0].abs().sum() > 0


# --- 2-3, 5, 8. graph decoding: the model's device, graphs kept between calls, fallback -----------
def test_graph_capture_keys_on_the_models_device(monkeypatch):
    """A model on the CPU never captures, even where CUDA is available (capture used to be switched on
    by ``torch.cuda.is_available()``)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = model_and_prompts()
    steps = decode_graphs.StaticSteps(model, capture=True)
    assert steps.device == torch.device("cpu") and not steps.capture


def test_static_decoder_keeps_its_caches_between_calls():
    """The static steps' caches (and the graphs captured over them on a GPU) outlive a call: a second
    call with the same batch shape reuses them, empties them first, and gives what a fresh decoder gives."""
    model, prompts = model_and_prompts()
    dec = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=True)
    first = dec.generate(prompts, GEN, [1, 2, 3], [True, False, False])
    serials = {k: c.serial for k, c in dec.steps._caches.items()}
    second = dec.generate(prompts, GEN, [4, 5, 6], [True, False, False])
    assert {k: c.serial for k, c in dec.steps._caches.items()} == serials
    fresh = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=True)
    same(second, fresh.generate(prompts, GEN, [4, 5, 6], [True, False, False]))
    same(first, Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow")).generate(
        prompts, GEN, [1, 2, 3], [True, False, False]), tol=1e-4)  # fmt: skip
    # a few shapes at most are kept, and an evicted cache takes its graphs with it
    dec.steps.static.graphs = {("text", c.serial, 0, 1): None for c in dec.steps._caches.values()}
    for rows in (1, 2, 4, 5):
        dec.generate([["x"]] * rows, GenerationConfig(max_new_tokens=2, max_images=0))
    kept = {c.serial for c in dec.steps._caches.values()}
    assert len(dec.steps._caches) <= 4 and all(k[1] in kept for k in dec.steps.static.graphs)


def test_a_failed_capture_warns_once_and_decodes_eagerly(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    model, prompts = model_and_prompts()
    monkeypatch.setattr(decode_graphs, "StepGraph", refuse)
    dec = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=True)
    dec.steps.static.capture = True  # as on a GPU
    got = dec.generate(prompts, GEN, [1, 2, 3], [True, False, False])
    want = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=True).generate(
        prompts, GEN, [1, 2, 3], [True, False, False]
    )
    same(got, want)
    err = capsys.readouterr().err
    assert err.count("warning: CUDA graph capture failed") == 1 and "decoding without graphs" in err


@needs_cuda
@pytest.mark.parametrize("index", [0, 1])
def test_cuda_graphs_on_any_device_equal_eager_and_replay_across_calls(index):
    if index >= torch.cuda.device_count():
        pytest.skip(f"needs {index + 1} GPUs")
    model, prompts = model_and_prompts()
    model = model.to(f"cuda:{index}")
    prompts = [[s.to(f"cuda:{index}") if isinstance(s, torch.Tensor) else s for s in p] for p in prompts]
    eager = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=False, graphs=False)
    graphed = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), graphs=True)
    for seeds in ([1, 2, 3], [4, 5, 6]):
        same(graphed.generate(prompts, GEN, seeds, [True, False, False]),
             eager.generate(prompts, GEN, seeds, [True, False, False]), tol=1e-3)  # fmt: skip
        if seeds[0] == 1:
            captured = len(graphed.steps.static.graphs)
    assert captured > 0 and len(graphed.steps.static.graphs) == captured  # the second call captured nothing


def test_capture_runs_on_a_stream_of_the_models_device_holding_the_capture_lock(monkeypatch):
    """CUDA faked: the capture is given a stream made on the model's device (PyTorch's default capture
    stream is made once per process on whichever device was current, so a decoder on cuda:1 after one
    on cuda:0 captured on cuda:0's stream), and holds ``CAPTURE_LOCK`` while it records."""
    seen = {}

    class Stream:
        def __init__(self, device):
            self.device = device

        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self, graph, pool=None, stream=None):
            seen["stream"] = stream

        def __enter__(self):
            seen["locked"] = decode_graphs.CAPTURE_LOCK.locked()

        def __exit__(self, *exc):
            return False

    fake = torch.cuda
    monkeypatch.setattr(fake, "Stream", Stream)
    monkeypatch.setattr(fake, "stream", lambda s: __import__("contextlib").nullcontext())
    monkeypatch.setattr(fake, "device", lambda d: __import__("contextlib").nullcontext())
    monkeypatch.setattr(fake, "current_stream", lambda d=None: Stream(d))
    monkeypatch.setattr(fake, "CUDAGraph", lambda: object())
    monkeypatch.setattr(fake, "graph", Graph)
    g = decode_graphs.StepGraph(lambda x: x * 2, [torch.ones(2)], torch.device("cuda:1"), None)
    assert seen["stream"].device == torch.device("cuda:1") and seen["locked"]
    assert torch.equal(g.output, torch.full((2,), 2.0)) and not decode_graphs.CAPTURE_LOCK.locked()


def test_an_upload_waits_for_a_capture_in_progress(monkeypatch):
    """``serve`` encodes uploads on a worker thread: while the decoder's thread captures (the lock held)
    the upload waits, then goes through."""
    import threading

    from transfusion.serve.app import encode_beside_decoding

    class Pipe:  # the pipeline's encode, as far as this test needs it
        def encode(self, images):
            return [torch.zeros(1) for _ in images]

    done = threading.Event()
    with decode_graphs.CAPTURE_LOCK:
        worker = threading.Thread(target=lambda: (encode_beside_decoding(Pipe(), "image"), done.set()))
        worker.start()
        assert not done.wait(0.3)  # a capture is recording: the upload has not touched the GPU
    assert done.wait(5)
    worker.join()


@needs_cuda
def test_uploads_encoded_during_captures_leave_graphs_on():
    """Uploads encoded through the VAE on another thread while the decoder captures: no capture fails
    (graphs stay on) and the images equal eager decoding."""
    import threading

    from transfusion.config import VAEConfig
    from transfusion.serve.app import encode_beside_decoding
    from transfusion.vae import KLVAE, encode_images

    vae = KLVAE(VAEConfig(image_size=16, base_channels=8)).cuda().eval()
    stop, errors = threading.Event(), []

    def upload_loop():
        from PIL import Image as PILImage

        image = PILImage.new("RGB", (16, 16), "red")
        while not stop.is_set():
            try:
                encode_beside_decoding(uploads, image)
            except Exception as e:  # reported below
                errors.append(e)

    model, prompts = model_and_prompts()
    model = model.cuda()

    class Uploads:  # what serve's pipeline does with an upload: the VAE's encoder, on the GPU
        def encode(self, images):
            return list(encode_images(vae, images))

    uploads = Uploads()
    prompts = [[s.cuda() if isinstance(s, torch.Tensor) else s for s in p] for p in prompts]
    graphed = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), graphs=True)
    uploader = threading.Thread(target=upload_loop)
    uploader.start()
    try:
        got = graphed.generate(prompts, GEN, [1, 2, 3], [True, False, False])
    finally:
        stop.set()
        uploader.join()
    assert not errors and graphed.steps.static.capture and graphed.steps.static.graphs
    eager = Decoder(model, IdTokenizer(), DiffusionConfig(objective="flow"), static=False, graphs=False)
    same(got, eager.generate(prompts, GEN, [1, 2, 3], [True, False, False]), tol=1e-3)


# --- 4. the block mask, compiled -------------------------------------------------------------------
def block_mask_inputs(device="cpu"):
    doc = torch.zeros(2, 256, dtype=torch.long, device=device)
    doc[:, 130:] = 1
    img = torch.zeros(2, 256, dtype=torch.long, device=device)
    img[:, 10:26] = 1
    img[1, 140:204] = 2
    return doc, img


def test_block_mask_is_compiled_on_cuda_only(monkeypatch):
    seen = []
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: seen.append(k["_compile"]))
    doc, img = block_mask_inputs()
    masks.block_mask(doc, img)
    masks.block_mask(doc, img, compiled=True)
    assert seen == [False, True]


@pytest.mark.slow
def test_compiled_block_mask_equals_the_eager_one_on_the_cpu():
    doc, img = block_mask_inputs()
    dense = masks.block_mask(doc, img, compiled=False).to_dense()
    assert torch.equal(masks.block_mask(doc, img, compiled=True).to_dense(), dense)


@needs_cuda
def test_compiled_block_mask_on_cuda_equals_the_rule():
    doc, img = block_mask_inputs("cuda")
    assert torch.equal(masks.block_mask(doc, img).to_dense().cpu(), masks.block_mask(
        doc.cpu(), img.cpu(), compiled=False).to_dense())  # fmt: skip


# --- 6. TF32 ---------------------------------------------------------------------------------------
def test_tf32_for_cuda_only():
    from transfusion.commands.options import pick_device

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        pick_device("cpu")
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        use_tf32()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


# --- 7. random states per process, not per visible GPU ---------------------------------------------
def test_cuda_random_state_is_this_devices_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("all"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.append(("set", s.tolist())))
    state = checkpoint.rng_state()
    assert state["cuda"].tolist() == [7] and "all" not in calls
    checkpoint.set_rng_state(state)
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([9], dtype=torch.uint8)] * 8})  # old: 8 GPUs
    assert calls == [("set", [7]), ("set", [9])]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint.set_rng_state(state)  # a machine without a GPU resumes too
