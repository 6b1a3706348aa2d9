"""`clipcap serve`: a captioning HTTP API with dynamic batching, and a web page.

    clipcap serve --checkpoint runs/coco --host 127.0.0.1 --port 8000

Endpoints (FastAPI; the OpenAPI UI is at /docs):

- `POST /caption`: multipart uploads in the repeatable field `images`, and decoding options as
  form fields named like the command line's (`beams`, `greedy`, `sample`, `num_captions`,
  `max_tokens`, `top_p`, `temperature`, `seed`). Answers
  `{"results": [{"filename", "captions": [{"caption", "score"}], "error"}]}` in the order sent:
  200 when at least one image was captioned (a bad image gets its `error`), 400 when none was,
  413 for an upload over `max_upload_mb`, 422 for no images or bad options, and 503 with
  Retry-After when the queue is full.
- `GET /health`: the models, the device and the queue depth.
- `GET /`: the web page (`static/index.html`).

Dynamic batching: images are decoded in a thread pool, then queued. One batching task waits
`batch_window_ms` after the first waiting request, and another window whenever the last one
brought more or a request is still decoding its images (up to 100 windows). It then takes the
oldest request and the waiting ones with the same decoding options, up to `max_batch` images, and
runs them as one CLIP forward and one `generate()` call in a thread of its own, so the event loop
(and /health) stays responsive. Sampling requests are never merged with others: a request's seed
then gives the same captions however busy the server is. The server never fetches a URL: images
arrive as uploads only.
"""

import asyncio
import functools
import itertools
import logging
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from importlib import resources

import torch

from clipcap_cache.checks import at_least, check_types, positive
from clipcap_cache.data.images import ImageLoadError
from clipcap_cache.devices import DEVICE
from clipcap_cache.errors import ClipcapError
from clipcap_cache.inference.captioner import Captioner
from clipcap_cache.inference.generate import DecodeConfig, StrategyFlags, decode_config
from clipcap_cache.options import check_choices, option

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Settings of `clipcap serve`."""

    checkpoint: str = option(help="Checkpoint folder or run directory.")
    host: str = option(
        "127.0.0.1", help="Interface to bind; 0.0.0.0 exposes the server to the network."
    )
    port: int = option(8000, help="TCP port.")
    device: str = DEVICE.field()
    max_batch: int = option(16, help="Images per batched CLIP forward and generate() call.")
    batch_window_ms: float = option(
        5.0, help="How long the first request of a batch waits for others to join it."
    )
    max_queue: int = option(64, help="Images waiting at most; beyond that, 503.")
    max_upload_mb: float = option(20.0, help="Largest image upload, in MB.")
    max_images: int = option(16, help="Images per request at most.")

    def __post_init__(self):
        check_types(self)
        check_choices(self)
        at_least(self, 1, "max_batch", "max_queue", "max_images")
        at_least(self, 0, "batch_window_ms")
        positive(self, "max_upload_mb")
        if not 0 < self.port < 65536:
            raise ClipcapError(f"--port must be between 1 and 65535, not {self.port}")
        if self.max_images > self.max_queue:
            raise ClipcapError(
                f"--max-images {self.max_images} is more than --max-queue {self.max_queue}: "
                "such a request could never be queued"
            )


_DECODE, _FLAGS = DecodeConfig(), StrategyFlags()  # the form's defaults are the CLI's
MAX_WINDOWS = 100  # the longest a request waits for company, in batch windows


class QueueFull(Exception):
    """The batcher holds `max_queue` images already."""


class Stopped(Exception):
    """The server is shutting down, or its batching task has died."""


@dataclass(eq=False)  # jobs are told apart by identity: their tensors have no single truth value
class _Job:
    pixels: torch.Tensor  # (n, 3, S, S)
    decode: DecodeConfig
    future: asyncio.Future
    key: tuple  # jobs with equal keys may share a batch


class Batcher:
    """Merges concurrent requests into batches and runs them off the event loop."""

    def __init__(self, captioner: Captioner, max_batch: int, window_ms: float, max_queue: int):
        self.captioner = captioner
        self.max_batch = max_batch
        self.window = window_ms / 1000
        self.max_queue = max_queue
        self.waiting: list[_Job] = []
        self.queued_images = 0
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption")
        self.unique = itertools.count()
        self.task: asyncio.Task | None = None
        self.incoming = 0  # requests still decoding their images, soon to be queued
        self.reserved = 0  # images held: decoding, waiting or being captioned (<= max_queue)
        self.batches = 0  # model calls so far
        self.images = 0  # images captioned so far

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop batching; every request still waiting fails with `Stopped` (a 503)."""
        if self.task is not None:
            self.task.cancel()
        for job in self.waiting:
            if not job.future.done():
                job.future.set_exception(Stopped("the server is shutting down"))
        self.waiting.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        """Whether the batching task is running (it ends only by `stop` or a bug)."""
        return self.task is not None and not self.task.done()

    @property
    def depth(self) -> int:
        return self.queued_images

    def reserve(self, images: int) -> None:
        """Hold room for a request's images before they are decoded; `QueueFull` when none.

        Decoded images are counted from the moment their decoding starts until their captions are
        back, so `max_queue` bounds the decoded images in memory, not only those queued.
        """
        if not self.alive:
            raise Stopped("the batcher is not running")
        if self.reserved + images > self.max_queue:
            raise QueueFull
        self.reserved += images

    def release(self, images: int) -> None:
        self.reserved -= images

    async def submit(self, pixels: torch.Tensor, decode: DecodeConfig) -> list[list[dict]]:
        """Caption preprocessed images, whose room `reserve` holds."""
        if not self.alive:
            raise Stopped("the batcher is not running")
        # Sampling draws from one random stream per generate() call: never merge it.
        key = astuple(decode) + ((next(self.unique),) if decode.strategy == "sample" else ())
        job = _Job(pixels, decode, asyncio.get_running_loop().create_future(), key)
        self.waiting.append(job)
        self.queued_images += len(pixels)
        self.arrived.set()
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            await self._gather_company(loop)
            batch, size = self._take()
            if not self.waiting:
                self.arrived.clear()
            try:
                results = await loop.run_in_executor(self.executor, self._caption, batch)
            except Exception as e:  # a failure of the model, not of the client's input
                log.exception("captioning a batch failed")
                results = [e] * len(batch)  # those requests fail; the loop serves the next
            self.queued_images -= size
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue  # the client went away
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _gather_company(self, loop) -> None:
        """Wait a window for other requests to join, longer while more are on their way.

        Requests of a burst reach the queue spread out by their image decoding. The wait goes on
        while a window brings one more or a request is still decoding its images, up to
        `MAX_WINDOWS` windows or a full batch.
        """
        deadline = loop.time() + self.window * MAX_WINDOWS
        seen = -1
        while loop.time() < deadline:
            if sum(len(job.pixels) for job in self.waiting) >= self.max_batch:
                return
            if len(self.waiting) == seen and self.incoming == 0:
                return
            seen = len(self.waiting)
            await asyncio.sleep(self.window)

    def _take(self) -> tuple[list[_Job], int]:
        """The oldest job and every waiting job of its key, up to `max_batch` images."""
        first = self.waiting[0]
        batch, size = [], 0
        for job in list(self.waiting):
            if job.key != first.key:
                continue
            if batch and size + len(job.pixels) > self.max_batch:
                break
            batch.append(job)
            size += len(job.pixels)
            self.waiting.remove(job)
        return batch, size

    def _caption(self, batch: list[_Job]) -> list[list[list[dict]]]:
        """One CLIP forward and one generate() for all the images of the batch."""
        pixels = torch.cat([job.pixels for job in batch])
        captions = self.captioner.caption_pixels(pixels, batch[0].decode)
        self.batches += 1
        self.images += len(pixels)
        results, start = [], 0
        for job in batch:
            results.append(captions[start : start + len(job.pixels)])
            start += len(job.pixels)
        return results


def create_app(captioner: Captioner, config: ServeConfig):
    """The FastAPI application around a loaded `Captioner`."""
    from contextlib import asynccontextmanager
    from typing import Annotated

    from fastapi import FastAPI, File, Form, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse

    batcher = Batcher(captioner, config.max_batch, config.batch_window_ms, config.max_queue)
    max_bytes = int(config.max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="clipcap",
        summary="Image captions from a CLIP prefix and GPT-2.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    app.add_middleware(
        BodyLimit,
        limit=max_bytes * config.max_images + 2**20,  # the images, and room for the form fields
        message=f"the request is over {config.max_images} x {config.max_upload_mb} MB",
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("clipcap_cache.inference").joinpath("static/index.html").read_text()

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health():
        """The loaded models, the device and how many images wait in the queue; 503 if stopped."""
        if not batcher.alive:
            return _error(503, "the batching task is not running: restart the server")
        return {
            "status": "ok",
            "checkpoint": captioner.name,
            "clip_model": captioner.config.get("clip_model"),
            "gpt2_model": captioner.config.get("model", {}).get("gpt2_model"),
            "device": str(captioner.device),
            "queue_depth": batcher.depth,
            "max_batch": config.max_batch,
            "batches": batcher.batches,
            "images": batcher.images,
        }

    @app.post("/caption")
    async def caption(
        images: Annotated[list[UploadFile], File(description="One or more image files.")],
        beams: Annotated[int, Form()] = _DECODE.beams,
        greedy: Annotated[bool, Form()] = _FLAGS.greedy,
        sample: Annotated[bool, Form()] = _FLAGS.sample,
        num_captions: Annotated[int, Form()] = _DECODE.num_captions,
        max_tokens: Annotated[int, Form()] = _DECODE.max_tokens,
        top_p: Annotated[float, Form()] = _DECODE.top_p,
        temperature: Annotated[float, Form()] = _DECODE.temperature,
        seed: Annotated[int, Form()] = _DECODE.seed,
        prompt: Annotated[str | None, Form()] = _DECODE.prompt,
    ):
        """Caption uploaded images; the results keep the order of the uploads."""
        if not images:
            return _error(422, "send at least one image in the field 'images'")
        if len(images) > config.max_images:
            return _error(422, f"at most {config.max_images} images per request")
        try:
            decode = decode_config(
                greedy=greedy,
                sample=sample,
                beams=beams,
                num_captions=num_captions,
                max_tokens=max_tokens,
                top_p=top_p,
                temperature=temperature,
                seed=seed,
                prompt=prompt,
            )
            captioner.check_decode(decode)
        except ClipcapError as e:
            return _error(422, _field_names(str(e)))
        for upload in images:
            if upload.size is not None and upload.size > max_bytes:
                return _error(413, f"{upload.filename} is over {config.max_upload_mb} MB")
        try:
            batcher.reserve(len(images))
        except QueueFull:
            return _error(503, "the server is busy: try again shortly", {"Retry-After": "1"})
        except Stopped as e:
            return _error(503, str(e))
        try:
            return await _caption_reserved(images, decode)
        finally:
            batcher.release(len(images))

    async def _caption_reserved(images: list[UploadFile], decode: DecodeConfig):
        """Decode and caption the uploads of a request whose room in the queue is held."""
        results, good, pixels = [], [], []
        batcher.incoming += 1  # the batcher waits for this request's images
        try:
            for i, upload in enumerate(images):
                results.append({"filename": upload.filename, "captions": [], "error": None})
                data = await upload.read()
                try:
                    pixels.append(await run_in_threadpool(captioner.preprocess, data))
                    good.append(i)
                except ImageLoadError as e:
                    results[i]["error"] = str(e)
        finally:
            batcher.incoming -= 1
        if not good:
            first = results[0]
            return JSONResponse(
                {
                    "detail": f"no image could be read ({first['filename']}: {first['error']})",
                    "results": results,
                },
                status_code=400,
            )
        started = time.perf_counter()
        try:
            captions = await batcher.submit(torch.stack(pixels), decode)
        except Stopped as e:
            return _error(503, str(e))
        for i, found in zip(good, captions, strict=True):
            results[i]["captions"] = found
        log.info("captioned %d image(s) in %.3f s", len(good), time.perf_counter() - started)
        return {"results": results}

    return app


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes while it streams in.

    A declared Content-Length over the limit is refused before anything is read. A chunked body,
    which declares none, is counted as it arrives, and refused with 413 as soon as it passes the
    limit, without reading or buffering the rest.
    """

    def __init__(self, app, limit: int, message: str):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            return await _error(413, self.message)(scope, receive, send)
        received = 0
        started = False
        too_large = _body_too_large_type()

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # An HTTPException, so that the form parser lets it through as the 413 it is.
                    raise too_large(413, self.message)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except too_large:
            if not started:
                await _error(413, self.message)(scope, receive, send)


@functools.cache
def _body_too_large_type() -> type:
    """The exception for an oversized body: an HTTPException, made once (starlette is lazy)."""
    from starlette.exceptions import HTTPException

    return type("BodyTooLarge", (HTTPException,), {})


def _field_names(message: str) -> str:
    """A command-line message in the server's terms: `--top-p` becomes the form field `top_p`."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


def _error(status: int, detail: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def serve(config: ServeConfig) -> None:
    """Load the checkpoint once and serve until interrupted."""
    import uvicorn

    _check_port_free(config.host, config.port)  # before the models load, not after
    captioner = Captioner.from_checkpoint(config.checkpoint, config.device)
    app = create_app(captioner, config)
    log.info("serving %s on http://%s:%d", captioner.name, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port that another process holds, with one line, before anything is loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ClipcapError(f"--host {host}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ClipcapError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (is another server running "
                "there? pass --port)"
            ) from None
