"""`transfusion serve`: the API on a tiny checkpoint, in-process and on a real socket. Outputs equal
`transfusion generate`'s while other requests run; a disconnect frees its row; the queue limit
answers 503; bad input is a 4xx and the next request succeeds; the key is checked."""

import base64
import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_generate import random_head  # noqa: E402

from transfusion import cli  # noqa: E402
from transfusion.checkpoint import save_model  # noqa: E402
from transfusion.config import Config, VAEConfig, tiny  # noqa: E402
from transfusion.generate import GenerationConfig, caption  # noqa: E402
from transfusion.model import Transfusion  # noqa: E402
from transfusion.pipeline import Pipeline  # noqa: E402
from transfusion.sequence import Specials  # noqa: E402
from transfusion.serve.app import ServeLimits, make_app  # noqa: E402
from transfusion.serve.worker import EngineLoop  # noqa: E402
from transfusion.tokenizer import ByteTokenizer  # noqa: E402
from transfusion.vae import KLVAE, decode_latents, encode_images, save_vae  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "ckpt"
    cfg = Config(model=tiny(max_seq_len=96), vae=VAEConfig(image_size=16, base_channels=8))
    torch.manual_seed(0)
    model = random_head(Transfusion(cfg.model))
    with torch.no_grad():
        model.lm_head.weight[Specials.of(ByteTokenizer()).boi, 0] = (
            0.6  # images now and then in interleaved output
        )
        model.tok_emb.weight[:, 0] += 1.0
    save_model(root, model, cfg, ByteTokenizer(), {"step": 1, "vae": "vae"})
    save_vae(KLVAE(cfg.vae).eval(), root / "vae")
    return root


def start(checkpoint: Path, max_batch: int = 8, max_queue: int = 16, **limits):
    loop = EngineLoop(Pipeline.from_pretrained(checkpoint, "cpu"), max_batch, max_queue).start()
    return loop, make_app(loop, ServeLimits(**{"preview_every": 2, **limits}))


@pytest.fixture
def served(checkpoint):
    loop, app = start(checkpoint)
    with TestClient(app) as client:
        yield loop, client
    loop.stop()


def same_picture(b64: str, latent, vae) -> bool:
    """The served PNG shows the latent as decoded here: the same pixels, up to one level of rounding
    (a row computed in another batch differs in the last float bits)."""
    import numpy as np

    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)
    here = np.asarray(decode_latents(vae, latent[None])[0], dtype=np.int16)
    return served.shape == here.shape and int(np.abs(served - here).max()) <= 1


def picture(size=(16, 16), color=(220, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_outputs_equal_generate_while_other_requests_run(served):
    loop, client = served
    dec, vae = loop.decoder, loop.vae
    busy = [{"prompt": f"noise {i}", "n": 2, "steps": 9, "seed": 40 + i, "guidance": 2.0} for i in range(3)]
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(client.post, "/v1/images", json=b) for b in busy]
        time.sleep(0.2)  # they are decoding when the requests under test arrive
        t2i = pool.submit(
            client.post, "/v1/images", json={"prompt": "a red circle", "n": 2, "steps": 6, "seed": 5}
        )
        files = {"file": ("red.png", picture(), "image/png")}
        cap = pool.submit(client.post, "/v1/caption", files=files, data={"max_new_tokens": "6", "seed": "2"})
        segs = [
            {"text": "look:"},
            {"image": base64.b64encode(picture(color=(0, 0, 200))).decode()},
            {"text": "then"},
        ]
        mixed = pool.submit(client.post, "/v1/generate", json={"segments": segs, "max_new_tokens": 8, "max_images": 1,
                                                               "steps": 4, "seed": 9, "n": 2})  # fmt: skip
        results = [f.result() for f in (t2i, cap, mixed, *others)]
    assert all(r.status_code == 200 for r in results), [r.text[:200] for r in results]
    # text to image: what `transfusion generate --prompt ... --num-images 2 --steps 6 --seed 5` draws
    gen = dec.settings(GenerationConfig(steps=6, force_image=True, stop_after_image=True, max_images=1))
    want = dec.generate([["a red circle"]] * 2, gen, [5, 6])
    served = results[0].json()["images"]
    assert len(served) == 2 and all(same_picture(im["png"], o[0], vae) for im, o in zip(served, want))
    # caption: what `transfusion caption --max-new-tokens 6 --seed 2` writes
    latent = encode_images(vae, [Image.open(io.BytesIO(picture()))])[0]
    words = caption(dec, [latent], GenerationConfig(max_new_tokens=6, temperature=0.0), seeds=[2])[0]
    assert results[1].json()["caption"] == words
    # interleaved: text and an image in, text and images out in order
    blue = encode_images(vae, [Image.open(io.BytesIO(picture(color=(0, 0, 200))))])[0]
    gen = dec.settings(GenerationConfig(max_new_tokens=8, max_images=1, steps=4))
    want = dec.generate([["look:", blue, "then"]] * 2, gen, [9, 10])
    got = results[2].json()["outputs"]
    for g, w in zip(got, want):
        assert [s["type"] for s in g] == ["text" if isinstance(s, str) else "image" for s in w]
        for a, b in zip(g, w):
            assert a["text"] == b if isinstance(b, str) else same_picture(a["png"], b, vae)
    assert any(s["type"] == "image" for g in got for s in g)  # the interleaved outputs drew


def test_a_stream_reports_queue_steps_previews_and_the_result(served):
    _, client = served
    with client.stream("POST", "/v1/images", json={"prompt": "a", "n": 1, "steps": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-2:] == ["image", "done"]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5] and all(e["steps"] == 5 for e in steps)
    assert [e["preview"] is not None for e in steps] == [True, False, True, False, True]  # every 2 steps
    assert events[-1]["images"][0]["png"] == events[-2]["png"]


def test_openai_images_route(served):
    _, client = served
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "response_format": "b64_json",
                                                     "num_inference_steps": 3, "guidance_scale": 2.0, "seed": 1})  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and isinstance(body["created"], int) and len(body["data"]) == 2
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (16, 16)
    assert (
        client.post("/v1/images/generations", json={"prompt": "a", "response_format": "url"}).status_code
        == 400
    )
    assert client.post("/v1/images/generations", json={"prompt": "a", "size": "1024x1024"}).status_code == 400
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/images", "/v1/caption", "/v1/generate"}


def test_relations_reach_a_reading_order_model_in_reading_order(checkpoint):
    """With ``reading_order`` (a model trained on relations stated only upper-or-left first), "X below Y"
    is drawn as "Y above X" is without it, and the answer says what the model was given; other texts
    pass unchanged."""
    below, above = "a red circle below a blue square", "a blue square above a red circle"
    loop, _ = start(checkpoint)
    try:
        with TestClient(make_app(loop, ServeLimits(), relation_wording="reading-order")) as client:
            body = {"prompt": below, "steps": 3, "seed": 4}
            rewritten = client.post("/v1/images", json=body).json()
            openai = client.post("/v1/images/generations", json={"prompt": below, "num_inference_steps": 3})
            plain = client.post("/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 3})
        with TestClient(make_app(loop, ServeLimits())) as client:
            given_above = client.post("/v1/images", json={**body, "prompt": above}).json()
            as_written = client.post("/v1/images", json=body).json()
    finally:
        loop.stop()
    assert rewritten["prompt_given"] == above and as_written["prompt_given"] == below
    assert rewritten["images"][0]["png"] == given_above["images"][0]["png"] != as_written["images"][0]["png"]
    assert openai.json()["data"][0]["revised_prompt"] == above
    assert plain.json()["data"][0]["revised_prompt"] is None


def test_bad_input_is_one_line_4xx_and_the_next_request_succeeds(checkpoint):
    loop, app = start(checkpoint, max_body_bytes=200_000, max_image_pixels=1_000_000)
    client = TestClient(app)
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144M pixels in a few kilobytes
    cases = {
        "huge body": (413, client.post("/v1/images", content=b"x" * 300_000, headers={"content-type": "application/json"})),
        "huge body, no length": (413, client.post("/v1/images", content=iter([b"x" * 150_000] * 3),
                                                   headers={"content-type": "application/json"})),
        "decompression bomb": (413, client.post("/v1/caption", files={"file": ("b.png", bomb.getvalue(), "image/png")})),
        "not an image": (400, client.post("/v1/caption", files={"file": ("a.png", b"GIF89a nonsense", "image/png")})),
        "empty upload": (400, client.post("/v1/caption", files={"file": ("e.png", b"", "image/png")})),
        "too long a prompt": (400, client.post("/v1/images", json={"prompt": "x" * 500, "steps": 2})),
        "steps 0": (422, client.post("/v1/images", json={"prompt": "a", "steps": 0})),
        "negative guidance": (422, client.post("/v1/images", json={"prompt": "a", "guidance": -1})),
        "too many images": (422, client.post("/v1/images", json={"prompt": "a", "n": 500})),
        "a sampler the model refuses": (400, client.post("/v1/images", json={"prompt": "a", "sampler": "flow"})),
        "malformed JSON": (400, client.post("/v1/images", content=b'{"prompt": ', headers={"content-type": "application/json"})),
        "a segment with both": (422, client.post("/v1/generate", json={"segments": [{"text": "a", "image": "AAAA"}]})),
        "not base64": (400, client.post("/v1/generate", json={"segments": [{"image": "***"}]})),
        "no prompt": (422, client.post("/v1/images", json={"n": 1})),
    }  # fmt: skip
    for name, (status, r) in cases.items():
        message = r.json()["error"]["message"]
        assert r.status_code == status, (name, r.status_code, message)
        assert message and "\n" not in message, name
    assert "12000x12000" in cases["decompression bomb"][1].json()["error"]["message"]
    wide = client.post(
        "/v1/caption", files={"file": ("w.png", picture((40, 24)), "image/png")}, data={"max_new_tokens": "2"}
    )
    assert wide.status_code == 200 and "40x24; resized" in wide.json()["notes"][0]
    assert client.post("/v1/images", json={"prompt": "a", "steps": 2}).status_code == 200  # still serving
    loop.stop()


def test_the_queue_limit_answers_503_with_retry_after(checkpoint):
    loop, app = start(checkpoint, max_batch=1, max_queue=1)
    client = TestClient(app)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(client.post, "/v1/images", json={"prompt": "a", "steps": 400})
        while not loop.engine.active or loop.load["queued_requests"]:  # the long one holds the only row
            time.sleep(0.01)
        waiting = pool.submit(client.post, "/v1/images", json={"prompt": "b", "steps": 2})
        while loop.load["queued_requests"] < 1:
            time.sleep(0.01)
        r = client.post("/v1/images", json={"prompt": "c", "steps": 2})
        assert (
            r.status_code == 503
            and int(r.headers["retry-after"]) >= 1
            and "busy" in r.json()["error"]["message"]
        )
        assert long.result().status_code == 200 and waiting.result().status_code == 200
    loop.stop()


def test_the_api_key_is_required_when_set(checkpoint, capsys):
    loop, app = start(checkpoint, api_key="s3cret")
    client = TestClient(app)
    assert client.get("/v1/info").status_code == 401
    assert client.post("/v1/images", json={"prompt": "a", "steps": 1}).status_code == 401
    assert client.get("/v1/info", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).json()["auth"] is True
    assert client.get("/").status_code == 200  # the page itself asks for the key
    loop.stop()
    assert cli.main(["serve", "--checkpoint", "x", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def on_socket(app):
    """``app`` behind uvicorn on a free localhost port, in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def real_server(checkpoint):
    """The app behind uvicorn on a free localhost port, in a thread."""
    loop, app = start(checkpoint, max_batch=4)
    with on_socket(app) as url:
        yield loop, url
    loop.stop()


def test_a_client_that_disconnects_frees_its_row(real_server):
    loop, url = real_server
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream(
            "POST", "/v1/images", json={"prompt": "a", "n": 2, "steps": 900, "stream": True}
        ) as r:
            for line in r.iter_lines():
                if '"event": "step"' in line:
                    break
            assert len(loop.engine.active) == 2
        deadline = time.time() + 10  # closed mid-way: the rows leave at the next tick
        while loop.engine.active and time.time() < deadline:
            time.sleep(0.02)
        assert not loop.engine.active
        # and a plain request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/images", json={"prompt": "b", "steps": 900}, timeout=0.5)
        deadline = time.time() + 10
        while loop.engine.active and time.time() < deadline:
            time.sleep(0.02)
        assert not loop.engine.active
        assert client.post("/v1/images", json={"prompt": "c", "steps": 2}).status_code == 200
