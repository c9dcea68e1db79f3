"""The HTTP API and the page, on FastAPI: every route hands its request to the one decoding loop
(``serve.worker``) and answers with JSON, or with server-sent events as the request advances.

Routes (``/docs`` and ``/openapi.json`` describe them):

- ``GET /``: the playground page (plain HTML/JS/CSS shipped in the package, no build, works offline);
- ``GET /v1/info``: the model (image size, context, sampling defaults), the limits and the load;
- ``POST /v1/images``: text to image (prompt, n, steps, guidance, guidance interval, seed, sampler);
- ``POST /v1/caption``: an uploaded image (multipart) to a caption;
- ``POST /v1/generate``: interleaved generation: text and images in (images as base64), text and
  images out, in order;
- ``POST /v1/images/generations``: OpenAI's images API (``prompt``, ``n``, ``response_format=b64_json``,
  plus ``seed``, ``num_inference_steps``, ``guidance_scale``), so existing clients work unchanged;
- ``POST /v1/images/edits``: OpenAI's image edits (multipart ``image``, ``prompt``, ``n``,
  ``response_format=b64_json``, ``seed``, ...): the image, the instruction, then an image drawn, as
  ``Pipeline.edit`` (guidance off unless ``guidance_scale`` is given).

With adapters loaded (``serve --adapter NAME=DIR``), a request picks one with ``model`` (the base:
``model`` left out, ``base`` or ``transfusion``); rows with different adapters decode in the same tick.

With ``"stream": true`` (or ``stream=true`` in the form) the answer is a stream of server-sent events:
``queued``, ``started``, ``step`` (denoising step i of T, a preview PNG every few steps), ``text`` (the
text so far), ``image``, then ``done`` with the outputs (or ``error``). A client that goes away frees
its rows at the next tick. Bad input is a 4xx with one line (``{"error": {"message": ...}}``); a full
queue is a 503 with ``Retry-After``; a body over the limit is refused from its ``Content-Length``
before it is read (or once it passes the limit, without one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from transfusion.generate import GenerationConfig
from transfusion.lora import adapter_names
from transfusion.serve.images import DEFAULT_MAX_PIXELS, BadImage, read_upload
from transfusion.serve.worker import Busy, EngineLoop, Job

STATIC = resources.files("transfusion.serve") / "static"


class ServeLimits(BaseModel):
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 16
    preview_every: int = 10
    api_key: str | None = None


# --- request bodies -----------------------------------------------------------------------------------
class Sampling(BaseModel):
    steps: int | None = Field(None, ge=1, le=1000, description="denoising steps (default: the checkpoint's)")
    guidance: float | None = Field(None, ge=0, le=50, description="classifier-free guidance weight (1 = off)")
    guidance_max_t: int | None = Field(
        -1, ge=-1, le=999, description="guide only at t <= this; null: every step; -1: the checkpoint's"
    )
    sampler: Literal["ddpm", "ddim", "flow"] | None = None
    seed: int = Field(0, ge=0, le=2**62, description="output i uses seed + i")
    stream: bool = Field(False, description="answer with server-sent events")


class ImagesRequest(Sampling):
    prompt: str = Field(..., max_length=20_000)
    model: str | None = Field(
        None, description="a LoRA adapter loaded with serve --adapter (default: the base)"
    )
    n: int = Field(1, ge=1, le=64, description="images, one batch row each")


class Segment(BaseModel):
    text: str | None = Field(None, max_length=20_000)
    image: str | None = Field(None, description="a base64 PNG/JPEG/WebP")


class GenerateRequest(Sampling):
    segments: list[Segment] = Field(..., min_length=1, max_length=64)
    model: str | None = Field(
        None, description="a LoRA adapter loaded with serve --adapter (default: the base)"
    )
    n: int = Field(1, ge=1, le=64)
    max_new_tokens: int = Field(64, ge=0, le=65_536)
    max_images: int = Field(1, ge=0, le=64)
    temperature: float = Field(1.0, ge=0, le=10)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class OpenAIImagesRequest(BaseModel):
    prompt: str = Field(..., max_length=20_000)
    n: int = Field(1, ge=1, le=64)
    response_format: str = "b64_json"
    size: str | None = None
    model: str | None = None
    user: str | None = None
    seed: int = Field(0, ge=0, le=2**62)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=50)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": " ".join(message.split()), "code": status}}, status, headers=headers
    )


def make_app(loop: EngineLoop, limits: ServeLimits, relation_wording: str = "auto") -> FastAPI:
    """The FastAPI app: the routes of ``Service`` behind the body limit and (with a key) the
    bearer-token check, the page and its files, one-line errors. ``relation_wording``: how prompt texts
    that state a shape-scene relation reach the model (``Pipeline.prompt_text``: 'auto' gives a model
    trained on relations stated only in reading order its own wording)."""
    service = Service(loop, limits, relation_wording)
    app = offline_docs_app(title="transfusion serve", version="1", description=__doc__.split("\n\n")[0])
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    install_error_handlers(app)
    api = [Depends(service.authorised)]
    app.add_api_route(
        "/", service.page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False
    )
    app.add_api_route("/v1/info", service.info, methods=["GET"], dependencies=api)
    app.add_api_route("/v1/images", service.images, methods=["POST"], dependencies=api)
    app.add_api_route("/v1/caption", service.caption, methods=["POST"], dependencies=api)
    app.add_api_route("/v1/generate", service.generate, methods=["POST"], dependencies=api)
    app.add_api_route("/v1/images/generations", service.openai_images, methods=["POST"], dependencies=api)
    app.add_api_route("/v1/images/edits", service.openai_edits, methods=["POST"], dependencies=api)
    return app


class Service:
    """The routes, on the one decoding loop."""

    def __init__(self, loop: EngineLoop, limits: ServeLimits, relation_wording: str = "auto"):
        self.loop, self.limits, self.pipe, self.decoder = loop, limits, loop.pipe, loop.decoder
        self.pipe.reads_in_reading_order(relation_wording)  # an unknown wording fails here, at start
        self.relation_wording = relation_wording
        self.cfg = self.decoder.model.cfg
        self.image_size = self.pipe.image_size if self.pipe.vae is not None else self.cfg.latent_size

    async def authorised(self, request: Request) -> None:
        if self.limits.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.limits.api_key}".encode()):
            raise HTTPException(401, "this server needs an API key: send 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    # --- routes -----------------------------------------------------------------------------------
    async def page(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    async def info(self) -> dict[str, Any]:
        """The model, the sampling defaults, the limits and the load."""
        d = self.decoder.settings()
        return {"image_size": self.image_size, "max_seq_len": self.cfg.max_seq_len, "discrete_images": self.cfg.discrete,
                "defaults": {"steps": d.steps, "guidance": d.cfg_scale, "sampler": d.sampler, "guidance_max_t": d.guidance_max_t},
                "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_image_pixels": self.limits.max_image_pixels},
                "auth": self.limits.api_key is not None, "load": self.loop.load,
                "adapters": adapter_names(self.decoder.model)}  # fmt: skip

    async def images(self, body: ImagesRequest, request: Request) -> Response:
        """Text to image: ``n`` images (output i seeded ``seed + i``), PNGs as base64."""
        if body.n > self.limits.max_images:
            raise HTTPException(422, f"n={body.n}: at most {self.limits.max_images} images a request")
        gen = self.settings(body, force_image=True, stop_after_image=True, max_images=1)
        prompt = self.worded(body.prompt)
        j = self.job("images", [[prompt]] * body.n, gen, body.seed, force=True, stream=body.stream,
                     adapter=self.adapter(body.model))  # fmt: skip
        return await self.answer(j, request, body.stream, lambda out: {
            "images": [{"png": first_image(o), "seed": body.seed + i} for i, o in enumerate(out)], "settings": public(gen),
            "prompt_given": prompt})  # fmt: skip

    async def caption(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description="the image (PNG, JPEG, WebP, ...)")],
        max_new_tokens: Annotated[int, Form(ge=1, le=4096)] = 64,
        temperature: Annotated[float, Form(ge=0, le=10)] = 0.0,
        seed: Annotated[int, Form(ge=0)] = 0,
        stream: Annotated[bool, Form()] = False,
    ) -> Response:
        """An uploaded image to a caption (greedy by default, as ``transfusion caption``)."""
        latent, notes = await self.encode(await file.read(), file.filename or "image")
        gen = self.decoder.settings(
            GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, max_images=0)
        )
        j = self.job("caption", [[latent]], gen, seed, force=False, stream=stream)
        return await self.answer(j, request, stream, lambda out: {
            "caption": "".join(s["text"] for s in out[0] if s["type"] == "text").strip(), "notes": notes})  # fmt: skip

    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        """Interleaved: text and images in, text and images out, in order."""
        prompt, notes = [], []
        for k, seg in enumerate(body.segments):
            if (seg.text is None) == (seg.image is None):
                raise HTTPException(422, f"segment {k}: give exactly one of 'text' and 'image'")
            if seg.text is not None:
                prompt.append(self.worded(seg.text))
                continue
            try:
                data = base64.b64decode(seg.image, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, f"segment {k}: 'image' is not base64") from None
            latent, note = await self.encode(data, f"segment {k}")
            prompt.append(latent)
            notes += note
        gen = self.settings(body, max_new_tokens=body.max_new_tokens, max_images=body.max_images,
                            temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)  # fmt: skip
        j = self.job("generate", [prompt] * body.n, gen, body.seed, force=False, stream=body.stream,
                     adapter=self.adapter(body.model))  # fmt: skip
        return await self.answer(
            j, request, body.stream, lambda out: {"outputs": out, "notes": notes, "settings": public(gen)}
        )

    async def openai_images(self, body: OpenAIImagesRequest, request: Request) -> Response:
        """OpenAI's ``images.generate``: ``{"created", "data": [{"b64_json"}]}``."""
        if body.response_format != "b64_json":
            raise HTTPException(
                400, f"response_format={body.response_format!r}: this server answers b64_json only"
            )
        if body.size is not None and body.size != f"{self.image_size}x{self.image_size}":
            raise HTTPException(
                400, f"size={body.size!r}: this model draws {self.image_size}x{self.image_size} images"
            )
        if body.n > self.limits.max_images:
            raise HTTPException(400, f"n={body.n}: at most {self.limits.max_images} images a request")
        sampling = Sampling(steps=body.num_inference_steps, guidance=body.guidance_scale, seed=body.seed)
        gen = self.settings(sampling, force_image=True, stop_after_image=True, max_images=1)
        prompt = self.worded(body.prompt)
        revised = prompt if prompt != body.prompt else None
        j = self.job("images", [[prompt]] * body.n, gen, body.seed, force=True, stream=False,
                     adapter=self.adapter(body.model))  # fmt: skip
        return await self.answer(j, request, False, lambda out: {
            "created": int(time.time()), "data": [{"b64_json": first_image(o), "revised_prompt": revised} for o in out]})  # fmt: skip

    async def openai_edits(
        self,
        request: Request,
        prompt: Annotated[str, Form(max_length=20_000, description="the instruction: what to change")],
        image: Annotated[
            UploadFile | None, File(description="the image to edit (PNG, JPEG, WebP, ...)")
        ] = None,
        images: Annotated[
            list[UploadFile] | None, File(alias="image[]", description="the image, as a list of one")
        ] = None,
        n: Annotated[int, Form(ge=1, le=64)] = 1,
        response_format: Annotated[str, Form()] = "b64_json",
        size: Annotated[str | None, Form()] = None,
        model: Annotated[str | None, Form()] = None,
        user: Annotated[str | None, Form()] = None,
        seed: Annotated[int, Form(ge=0, le=2**62)] = 0,
        num_inference_steps: Annotated[int | None, Form(ge=1, le=1000)] = None,
        guidance_scale: Annotated[float | None, Form(ge=0, le=50)] = None,
        guidance_max_t: Annotated[int | None, Form(ge=-1, le=999)] = -1,
        sampler: Annotated[Literal["ddpm", "ddim", "flow"] | None, Form()] = None,
        stream: Annotated[bool, Form()] = False,
    ) -> Response:
        """OpenAI's ``images.edit``: the uploaded image, the instruction, and an image drawn after them
        (the paper's editing sequence), ``{"created", "data": [{"b64_json"}]}`` (edit i seeded ``seed + i``).
        Guidance is off unless ``guidance_scale`` says otherwise (``pipeline.EDIT_GUIDANCE``). With
        ``stream=true``: server-sent events, previews while it denoises."""
        from transfusion.pipeline import EDIT_GUIDANCE

        uploads = [image] if image is not None else list(images or [])
        if len(uploads) != 1:
            raise HTTPException(400, f"give one image to edit ({len(uploads)} given)")
        if response_format != "b64_json":
            raise HTTPException(
                400, f"response_format={response_format!r}: this server answers b64_json only"
            )
        if size is not None and size != f"{self.image_size}x{self.image_size}":
            raise HTTPException(
                400, f"size={size!r}: this model draws {self.image_size}x{self.image_size} images"
            )
        if n > self.limits.max_images:
            raise HTTPException(400, f"n={n}: at most {self.limits.max_images} images a request")
        if not prompt.strip():
            raise HTTPException(422, "prompt: an edit needs an instruction")
        adapter = self.adapter(model)
        latent, notes = await self.encode(await uploads[0].read(), uploads[0].filename or "image")
        sampling = Sampling(steps=num_inference_steps, seed=seed, sampler=sampler, guidance_max_t=guidance_max_t,
                            guidance=EDIT_GUIDANCE if guidance_scale is None else guidance_scale)  # fmt: skip
        gen = self.settings(sampling, force_image=True, stop_after_image=True, max_images=1)
        j = self.job("edits", [[latent, prompt]] * n, gen, seed, force=True, stream=stream, adapter=adapter)
        return await self.answer(j, request, stream, lambda out: {
            "created": int(time.time()), "data": [{"b64_json": first_image(o)} for o in out], "notes": notes,
            "settings": public(gen)})  # fmt: skip

    # --- shared --------------------------------------------------------------------------------------
    def worded(self, text: str) -> str:
        """The text the model is given (``Pipeline.prompt_text``)."""
        return self.pipe.prompt_text(text, self.relation_wording)

    def settings(self, s: Sampling, **kw: Any) -> GenerationConfig:
        try:
            gen = GenerationConfig(steps=s.steps, cfg_scale=s.guidance, guidance_max_t=s.guidance_max_t,
                                   sampler=s.sampler, **kw)  # fmt: skip
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return self.decoder.settings(gen)

    def adapter(self, model: str | None) -> str | None:
        """The adapter a request's ``model`` names: None for the base (left out, 'base', 'transfusion',
        or any name when the server holds no adapters, as before adapters existed)."""
        loaded = adapter_names(self.decoder.model)
        if model in loaded:
            return model
        if model in (None, "", "base", "transfusion") or not loaded:
            return None
        raise HTTPException(
            400, f"model={model!r}: this server has 'base' and the adapters {', '.join(map(repr, loaded))}"
        )

    def job(
        self,
        kind: str,
        prompts: list[list[Any]],
        gen: GenerationConfig,
        seed: int,
        force: bool,
        stream: bool,
        adapter: str | None = None,
    ) -> Job:
        j = Job(kind, asyncio.get_running_loop())
        previews = self.limits.preview_every if stream else 0  # nobody sees them otherwise
        try:
            j.rows = [
                self.decoder.row(p, gen, seed + i, force, preview_every=previews, adapter=adapter)
                for i, p in enumerate(prompts)
            ]
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return j

    async def encode(self, data: bytes, name: str) -> tuple[Any, list[str]]:
        """An uploaded image, read safely and resized when needed, through the VAE (in a worker thread)."""
        if self.loop.vae is None:
            raise HTTPException(400, "this checkpoint has no VAE, so it cannot read images")
        from starlette.concurrency import run_in_threadpool

        image, note = read_upload(data, self.image_size, self.limits.max_image_pixels, name)
        latent = (await run_in_threadpool(encode_beside_decoding, self.pipe, image))[0]
        return latent, [note] if note else []

    async def answer(self, j: Job, request: Request, stream: bool, shape: Any) -> Response:
        """Submit the job; answer with its events as they come, or with JSON once it is done (the job
        cancelled if the client goes away meanwhile)."""
        self.loop.submit(j)
        if stream:
            return StreamingResponse(self.events(j, request, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        while True:
            try:
                event = await asyncio.wait_for(j.queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.loop.cancel(j)
                    return Response(status_code=499)
                continue
            if event["event"] == "done":
                return JSONResponse({"id": j.id, **shape(event["outputs"])})

    async def events(self, j: Job, request: Request, shape: Any) -> Any:
        try:
            while True:
                try:
                    event = await asyncio.wait_for(j.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event["event"] == "done":
                    event = {"event": "done", "id": j.id, **shape(event["outputs"])}
                yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                if event["event"] == "done":
                    return
        finally:
            if any(not row.done for row in j.rows):
                self.loop.cancel(j)  # the client went away (or the stream was closed) before the end


def offline_docs_app(**kw: Any) -> FastAPI:
    """A FastAPI app whose ``/docs`` (Swagger UI) and ``/redoc`` load their scripts and styles from the
    ``fastapi-offline`` package of the ``serve`` extra: FastAPI's own pages fetch them from a CDN and
    are blank without a network."""
    try:
        from fastapi_offline import FastAPIOffline
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "transfusion serve needs: pip install 'transfusion[serve]' (fastapi-offline is missing)"
        ) from None
    return FastAPIOffline(**kw)


def encode_beside_decoding(pipe: Any, image: Any) -> Any:
    """An upload through the pipeline's VAE on a worker thread, never while the decoder's thread
    captures a CUDA graph (a capture forbids other threads' allocations: the upload would fail, and the
    decoder would turn graphs off for the server's life)."""
    from transfusion.decoding.graphs import capture_lock

    with capture_lock():
        return pipe.encode([image])


def first_image(output: list[dict[str, Any]]) -> str | None:
    return next((s["png"] for s in output if s["type"] == "image"), None)


def public(gen: GenerationConfig) -> dict[str, Any]:
    return {
        "steps": gen.steps,
        "guidance": gen.cfg_scale,
        "guidance_max_t": gen.guidance_max_t,
        "sampler": gen.sampler,
    }


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        what = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON ({what})")
        return error(422, f"{where}: {what}" if where else what)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return error(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage) -> JSONResponse:
        return error(exc.status, str(exc))


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413: from its ``Content-Length`` before reading
    it; without one (chunked), by reading it up to the limit before the route sees any of it."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await too_large(self.limit, send)
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_large(self.limit, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def too_large(limit: int, send: Any) -> None:
    body = json.dumps(
        {"error": {"message": f"the request body is over the {limit:,}-byte limit", "code": 413}}
    ).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
