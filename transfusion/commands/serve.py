"""`transfusion serve`: a playground page and an HTTP API on a trained checkpoint, every request
continuously batched into one running mixed-modal decoder.

Open http://127.0.0.1:8000 for the page; the API is described at /docs (OpenAPI at /openapi.json).
It listens on localhost by default; on any other address it needs --api-key KEY (clients send
``Authorization: Bearer KEY``) or an explicit --no-auth. Needs the extra: pip install 'transfusion[serve]'.
"""

from __future__ import annotations

import argparse
import ipaddress

from transfusion.commands.generate import add_relation_wording_option
from transfusion.commands.options import add_checkpoint_option, add_device_option, note, pick_device
from transfusion.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_option(p)
    p.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR",
        help="load a LoRA adapter directory under NAME (repeatable); a request picks it with \"model\": "
        "NAME, and rows with different adapters (and none) decode in the same batch",
    )  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_device_option(p)
    p.add_argument(
        "--max-batch", type=int, default=16, help="rows decoded together, one per output (default 16)"
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a row before 503 (default 64)"
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every API route")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="serve another address without a key (anyone who reaches it may use it)",
    )
    p.add_argument("--max-body-mb", type=float, default=20, help="largest request body in MB (default 20)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=16_000_000,
        help="largest uploaded image in pixels (default 16M)",
    )
    p.add_argument("--max-images", type=int, default=16, help="images per request at most (default 16)")
    p.add_argument(
        "--preview-every", type=int, default=10, help="denoising steps between previews (default 10; 0: none)"
    )
    add_relation_wording_option(p)


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    if args.max_batch < 1 or args.max_queue < 0 or args.max_images < 1 or args.preview_every < 0:
        raise UserError("--max-batch and --max-images must be >= 1, --max-queue and --preview-every >= 0")
    if not is_local(args.host) and not args.api_key and not args.no_auth:
        raise UserError(
            f"--host {args.host} is reachable from other machines: give --api-key KEY, or --no-auth to serve it open"
        )
    try:
        import uvicorn

        from transfusion.serve.app import ServeLimits, make_app
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"transfusion serve needs: pip install 'transfusion[serve]' ({e.name} is missing)"
        ) from None
    from transfusion.pipeline import Pipeline
    from transfusion.serve.worker import EngineLoop

    adapters = {}
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise UserError(f"--adapter {item!r}: give NAME=DIR")
        if name in adapters or name in ("base", "transfusion"):
            raise UserError(f"--adapter {item!r}: the name {name!r} is taken")
        adapters[name] = directory
    pipe = Pipeline.from_pretrained(args.checkpoint, pick_device(args.device), adapters=adapters)
    loop = EngineLoop(pipe, args.max_batch, args.max_queue).start()
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                         max_images=args.max_images, preview_every=args.preview_every, api_key=args.api_key)  # fmt: skip
    auth = (
        "API key required"
        if args.api_key
        else "no authentication" + (" (--no-auth)" if args.no_auth else ", localhost only")
    )
    note(f"serving {pipe.path} on http://{args.host}:{args.port} ({auth}); "
         f"{args.max_batch} rows, queue {args.max_queue}; API at /docs")  # fmt: skip
    try:
        app = make_app(loop, limits, args.relation_wording)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        loop.stop()
    return 0
