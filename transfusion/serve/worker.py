"""The one owner of the model: a thread that runs the decoding engine and hands results back.

Requests become ``Job``s (one engine row per output: n images are n rows). ``submit`` puts a job in the
inbox (or refuses it with ``Busy`` when ``max_queue`` jobs already wait); the loop thread moves the
inbox into the engine before each tick, so a request joins the running batch at the next tick and
leaves when it is done, whatever mode the other rows are in. Each row's events (joined, text so far,
denoising step with a preview every few steps, image, done) are turned into JSON-ready dicts on the
loop thread (images decoded through the VAE into PNGs there, so that only this thread runs the model
and the VAE) and put on the job's asyncio queue with ``call_soon_threadsafe``. ``cancel`` (a client
that went away) frees the job's rows at the next tick.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from transfusion.decoding.modes import Row
from transfusion.pipeline import Pipeline


class Busy(Exception):
    """The queue is full; ``retry_after`` seconds is a fair guess of when there will be room."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request: its rows (one per output) and the queue its events go to."""

    kind: str
    loop: asyncio.AbstractEventLoop
    rows: list[Row] = field(default_factory=list)
    id: str = ""
    created: float = field(default_factory=time.time)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    outputs: list[list[dict[str, Any]] | None] = field(default_factory=list)
    left: int = 0
    cancelled: bool = False
    pngs: dict[int, str | None] = field(default_factory=dict)  # id(latent) -> its PNG, once decoded

    def push(self, event: dict[str, Any]) -> None:
        """From the loop thread: an event for the request's handler."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def pngs_b64(vae: Any, latents: list[torch.Tensor]) -> list[str | None]:
    """Latents (C, h, w) decoded through the VAE in one batch into base64 PNGs (None without a VAE)."""
    if vae is None or not latents:
        return [None] * len(latents)
    from transfusion.vae import decode_latents

    out = []
    for image in decode_latents(vae, torch.stack(latents)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


class EngineLoop:
    def __init__(self, pipe: Pipeline, max_batch: int = 16, max_queue: int = 64):
        self.pipe, self.decoder, self.vae, self.max_queue = pipe, pipe.decoder, pipe.vae, max_queue
        self.engine = self.decoder.engine(rows=max_batch, capacity=self.decoder.model.cfg.max_seq_len)
        self.inbox: deque[Job] = deque()
        self.waiting: set[Job] = set()  # jobs submitted whose rows do not hold a cache row yet
        self.cond = threading.Condition()
        self.stopping = False
        self.ticks = 0
        self.recent_ticks: deque[float] = deque(maxlen=20)  # seconds of the last ticks
        self._ids = itertools.count()
        self._tick_events: list[tuple[Job, int, str, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._run, name="decoder", daemon=True)

    def start(self) -> EngineLoop:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    # --- from the request handlers ------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                ticks = max(1.0, self.tick_seconds * 50)  # about the time a request takes to finish
                raise Busy(int(min(60, ticks)) or 1)
            job.id = f"{next(self._ids):06d}"
            job.left = len(job.rows)
            job.outputs = [None] * len(job.rows)
            for k, row in enumerate(job.rows):
                row.events = self._events(job, k)
            self.waiting.add(job)
            self.inbox.append(job)
            position = len(self.waiting)
            self.cond.notify_all()
        job.push({"event": "queued", "id": job.id, "position": position})
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the job's rows leave at the next tick."""
        with self.cond:
            job.cancelled = True
            self.waiting.discard(job)
            for row in job.rows:
                row.cancelled = True  # read by the engine between ticks (a flag: no lock needed there)
            self.cond.notify_all()

    @property
    def tick_seconds(self) -> float:
        """The median time of the last ticks (0 before the first)."""
        ticks = sorted(self.recent_ticks)
        return ticks[len(ticks) // 2] if ticks else 0.0

    @property
    def load(self) -> dict[str, Any]:
        return {"active_rows": len(self.engine.active), "queued_requests": len(self.waiting),
                "rows": len(self.engine.slots), "max_queue": self.max_queue,
                "tick_ms": round(self.tick_seconds * 1000, 2)}  # fmt: skip

    # --- the loop thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.inbox and self.engine.idle:
                    self.cond.wait()
                if self.stopping:
                    return
                while self.inbox:
                    for row in self.inbox.popleft().rows:
                        self.engine.add(row)
            t0 = time.perf_counter()
            with torch.no_grad():
                self.engine.tick()
                self._dispatch()
            self.ticks += 1
            self.recent_ticks.append(time.perf_counter() - t0)

    def _events(self, job: Job, k: int) -> Any:
        """Row k's event callback (the loop thread): kept until the end of the tick (``_dispatch``)."""

        def on(kind: str, payload: dict[str, Any]) -> None:
            if kind == "start":  # told at once, not at the end of the tick: the first progress a client sees
                with self.cond:
                    self.waiting.discard(job)
                job.push({"event": "started", "output": k})
                return
            self._tick_events.append((job, k, kind, payload))

        return on

    def _dispatch(self) -> None:
        """The tick's events as JSON-ready dicts on their jobs' queues; every image and preview of the
        tick decoded through the VAE in one batch."""
        events, self._tick_events = self._tick_events, []
        latents = [p["preview"] if kind == "step" else p["latent"] for _, _, kind, p in events
                   if kind == "image" or (kind == "step" and p["preview"] is not None)]  # fmt: skip
        decoded = dict(zip(map(id, latents), pngs_b64(self.vae, latents)))
        for job, k, kind, payload in events:
            if kind == "text":
                job.push({"event": "text", "output": k, "text": payload["text"]})
            elif kind == "step":
                preview = payload["preview"]
                job.push({"event": "step", "output": k, "step": payload["step"] + 1, "steps": payload["steps"],
                          "preview": None if preview is None else decoded[id(preview)]})  # fmt: skip
            elif kind == "image":
                job.pngs[id(payload["latent"])] = decoded[id(payload["latent"])]
                job.push({"event": "image", "output": k, "png": job.pngs[id(payload["latent"])]})
            elif kind == "done":
                job.outputs[k] = [{"type": "text", "text": s} if isinstance(s, str) else {"type": "image", "png": job.pngs[id(s)]}
                                  for s in payload["out"]]  # fmt: skip
                job.left -= 1
                if job.left == 0:
                    job.push({"event": "done", "outputs": job.outputs})
