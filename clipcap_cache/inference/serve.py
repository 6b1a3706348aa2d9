"""`clipcap serve`: a captioning HTTP API with dynamic batching, and a web page.

    clipcap serve --checkpoint runs/coco --host 127.0.0.1 --port 8000

Endpoints (FastAPI; the OpenAPI UI is at /docs):

- `POST /caption`: multipart uploads in the repeatable field `images`, and decoding options as
  form fields named like the command line's (`beams`, `greedy`, `sample`, `num_captions`,
  `max_tokens`, `top_p`, `temperature`, `seed`). Answers
  `{"results": [{"filename", "captions": [{"caption", "score"}], "error"}]}` in the order sent
  (with `"retrieved": [...]`, the captions of the prompt, for a retrieval-augmented model):
  200 when at least one image was captioned (a bad image gets its `error`), 400 when none was,
  413 for an upload over `max_upload_mb`, 422 for no images, bad options or options over the
  server's limits, 408 for a body slower than `body_timeout_s`, and 503 with Retry-After when
  the queue is full. On a loopback bind, a foreign Host gets 400 and a foreign Origin 403.
- `GET /health`: the models, the device and the queue depth.
- `GET /`: the web page (`static/index.html`).

Dynamic batching: images are decoded in a pool of `decode_threads` threads (an image whose
header declares more than `max_image_pixels` is refused undecoded), then queued. One batching task waits
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
import ipaddress
import itertools
import logging
import re
import socket
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from importlib import resources

import torch

from clipcap_cache.checks import at_least, at_most, check_types, positive
from clipcap_cache.data.images import MAX_IMAGE_PIXELS, ImageLoadError
from clipcap_cache.devices import DEVICE
from clipcap_cache.errors import ClipcapError
from clipcap_cache.inference.captioner import Captioner, ImageCaptions
from clipcap_cache.inference.generate import (
    MAX_BEAMS,
    MAX_NUM_CAPTIONS,
    DecodeConfig,
    StrategyFlags,
    decode_config,
)
from clipcap_cache.options import check_choices, option

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Settings of `clipcap serve`."""

    checkpoint: str = option(help="Checkpoint folder, run directory or hub id (USER/NAME).")
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
    datastore: str | None = option(
        None,
        help="Retrieve from this text file instead of the one the checkpoint was trained with.",
    )
    max_image_pixels: int = option(
        40_000_000, help="Largest image, in pixels (width x height), read from its header."
    )
    decode_threads: int = option(4, help="Images decoded at once, across all requests.")
    max_beams: int = option(16, help="Largest beams a request may ask for.")
    max_num_captions: int = option(16, help="Largest num_captions a request may ask for.")
    max_caption_tokens: int = option(100, help="Largest max_tokens a request may ask for.")
    body_timeout_s: float = option(
        30.0, help="Seconds a request's body may take to arrive; a slower upload gets 408."
    )
    allowed_hosts: str | None = option(
        None,
        help="Comma-separated names the Host and Origin headers may carry, or '*' for any.",
        default_text="the loopback names on a loopback --host, else any",
    )

    def __post_init__(self):
        check_types(self)
        check_choices(self)
        at_least(self, 1, "max_batch", "max_queue", "max_images", "max_image_pixels")
        at_least(self, 1, "decode_threads", "max_beams", "max_num_captions", "max_caption_tokens")
        at_least(self, 0, "batch_window_ms")
        positive(self, "max_upload_mb", "body_timeout_s")
        at_most(self, MAX_UPLOAD_MB, "max_upload_mb")
        at_most(self, MAX_WINDOW_MS, "batch_window_ms")
        at_most(self, MAX_BODY_TIMEOUT_S, "body_timeout_s")
        at_most(self, MAX_DECODE_THREADS, "decode_threads")
        at_most(self, MAX_IMAGE_PIXELS, "max_image_pixels")
        at_most(self, MAX_BEAMS, "max_beams")
        at_most(self, MAX_NUM_CAPTIONS, "max_num_captions")
        if not 0 < self.port < 65536:
            raise ClipcapError(f"--port must be between 1 and 65535, not {self.port}")
        if self.max_images > self.max_queue:
            raise ClipcapError(
                f"--max-images {self.max_images} is more than --max-queue {self.max_queue}: "
                "such a request could never be queued"
            )
        if self.allowed_hosts is not None and not self.allowed_hosts.replace(",", "").strip():
            raise ClipcapError("--allowed-hosts names no host: give names, or '*' for any")

    def limits(self, decode: DecodeConfig) -> None:
        """Refuse decoding options beyond this server's limits (a request's 422)."""
        for name, limit in (
            ("beams", self.max_beams),
            ("num_captions", self.max_num_captions),
            ("max_tokens", self.max_caption_tokens),
        ):
            if getattr(decode, name) > limit:
                flag = "--" + _LIMIT_OPTION[name].replace("_", "-")
                raise ClipcapError(
                    f"{name} {getattr(decode, name)} is over this server's limit of {limit} "
                    f"(serve {flag})"
                )


# Upper bounds of the server's own settings: beyond them a value is a typo, not a choice.
MAX_UPLOAD_MB = 1024.0
MAX_WINDOW_MS = 10_000.0
MAX_BODY_TIMEOUT_S = 3600.0
MAX_DECODE_THREADS = 256
_LIMIT_OPTION = {
    "beams": "max_beams",
    "num_captions": "max_num_captions",
    "max_tokens": "max_caption_tokens",
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether `host` (a --host value) is a loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(config: ServeConfig) -> frozenset[str] | None:
    """The names the Host and Origin headers may carry; None: any.

    A server bound to a loopback interface answers to the loopback names, so a web page that
    rebinds its own DNS name to 127.0.0.1 cannot read it; `--allowed-hosts` adds names (the
    public name of a reverse proxy in front of it). A server bound to another interface answers
    to any name unless `--allowed-hosts` lists them. `*` in the list allows any.
    """
    loopback = (
        {*LOOPBACK_NAMES, config.host.strip("[]").lower()} if is_loopback(config.host) else set()
    )
    if config.allowed_hosts is None:
        return frozenset(loopback) if loopback else None
    names = {n.strip().lower().strip("[]") for n in config.allowed_hosts.split(",")} - {""}
    if "*" in names:
        return None
    return frozenset(names | loopback)


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

    async def submit(self, pixels: torch.Tensor, decode: DecodeConfig) -> list[ImageCaptions]:
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

    def _caption(self, batch: list[_Job]) -> list[list[ImageCaptions]]:
        """One CLIP forward and one generate() for all the images of the batch."""
        pixels = torch.cat([job.pixels for job in batch])
        captions = self.captioner.caption_batch(pixels, batch[0].decode)
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
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    batcher = Batcher(captioner, config.max_batch, config.batch_window_ms, config.max_queue)
    max_bytes = int(config.max_upload_mb * 2**20)
    # Decoding is bounded twice: by the pixels an image's header declares (checked before it is
    # decoded) and by the images decoded at once, so its memory is at most about
    # decode_threads x max_image_pixels x 4 bytes, whatever the number of requests.
    decoders = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

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
        timeout=config.body_timeout_s,
    )
    # Added last, so it runs first: a foreign Host or Origin is refused before any body is read.
    app.add_middleware(HostCheck, hosts=trusted_hosts(config))

    @app.exception_handler(RequestValidationError)
    async def one_line_detail(request, error: RequestValidationError):
        """FastAPI's list of validation errors as the one-line `detail` every other error has."""
        return _error(422, validation_message(error.errors()))

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
            decode.check_positions(captioner.model)
            captioner.check_decode(decode)
        except ClipcapError as e:
            return _error(422, _field_names(str(e)))
        try:
            config.limits(decode)  # names the server's own option, which keeps its dashes
        except ClipcapError as e:
            return _error(422, str(e))
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

    async def _caption_reserved(images: list[UploadFile], options: DecodeConfig):
        """Decode and caption the uploads of a request whose room in the queue is held."""
        results, good, pixels = [], [], []
        loop = asyncio.get_running_loop()
        decode = functools.partial(captioner.preprocess, max_pixels=config.max_image_pixels)
        batcher.incoming += 1  # the batcher waits for this request's images
        try:
            for i, upload in enumerate(images):
                results.append({"filename": upload.filename, "captions": [], "error": None})
                data = await upload.read()
                try:
                    pixels.append(await loop.run_in_executor(decoders, decode, data))
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
            captions = await batcher.submit(torch.stack(pixels), options)
        except Stopped as e:
            return _error(503, str(e))
        for i, found in zip(good, captions, strict=True):
            results[i]["captions"] = found.captions
            if found.retrieved is not None:
                results[i]["retrieved"] = found.retrieved
        log.info("captioned %d image(s) in %.3f s", len(good), time.perf_counter() - started)
        return {"results": results}

    return app


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes, or slower than `timeout` s.

    A declared Content-Length over the limit is refused before anything is read. A chunked body,
    which declares none, is counted as it arrives, and refused with 413 as soon as it passes the
    limit, without reading or buffering the rest. A body that has not arrived in full `timeout`
    seconds after the request began (a stalled or trickling upload) gets 408, and the connection
    is closed, so a stalled client holds nothing for longer than that.
    """

    def __init__(self, app, limit: int, message: str, timeout: float | None = None):
        self.app, self.limit, self.message, self.timeout = app, limit, message, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            return await _error(413, self.message, _CLOSE)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        received = 0
        body_done = False
        started = False
        refused = _refusal_type()

        async def counted_receive():
            nonlocal received, body_done
            if body_done or deadline is None:
                message = await receive()  # after the body: only a disconnect can come
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    # An HTTPException, so that the form parser lets it through as it is.
                    raise refused(
                        408, f"the request body did not arrive within {self.timeout:g} s", _CLOSE
                    ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:
                    raise refused(413, self.message, _CLOSE)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except refused as e:
            if not started:
                await _error(e.status_code, e.detail, _CLOSE)(scope, receive, send)


_CLOSE = {"Connection": "close"}  # the rest of a refused body is never read: end the connection


@functools.cache
def _refusal_type() -> type:
    """The exception for a refused body: an HTTPException, made once (starlette is lazy)."""
    from starlette.exceptions import HTTPException

    return type("BodyRefused", (HTTPException,), {})


class HostCheck:
    """ASGI middleware: answer only requests whose Host and Origin name a trusted host.

    `hosts` None trusts every name. A request whose Host header names another host gets 400 (a
    DNS-rebinding page sends its own name), and one whose Origin header names another (a foreign
    page submitting a form, or the `null` origin of a sandboxed one) gets 403. A request without
    those headers (curl, a script) is not a browser's and passes.
    """

    def __init__(self, app, hosts: frozenset[str] | None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.hosts is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if host and _host_name(host) not in self.hosts:
            detail = f"this server does not answer to the host {host!r} (serve --allowed-hosts)"
            return await _error(400, detail, _CLOSE)(scope, receive, send)
        origin = headers.get(b"origin")
        if origin is not None:
            origin = origin.decode("latin-1")
            name = urllib.parse.urlsplit(origin).hostname if "://" in origin else None
            if name not in self.hosts:
                detail = f"requests from the origin {origin!r} are refused (serve --allowed-hosts)"
                return await _error(403, detail, _CLOSE)(scope, receive, send)
        return await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name of a Host header, without its port: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def validation_message(errors) -> str:
    """FastAPI's validation errors (a list of dicts) as one line naming each field and problem.

    The offending input is left out: it may be a whole file sent in the wrong kind of field.
    """
    parts = []
    for error in errors:
        field = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
        if field == "images" and error.get("type") == "missing":
            return "send at least one image file in the field 'images'"
        if field.startswith("images"):
            parts.append("'images' must hold files (parts with a filename)")
            continue
        parts.append(f"{field or 'request'}: {error.get('msg', 'invalid')}".rstrip("."))
    return "; ".join(dict.fromkeys(parts)) or "the request is not valid"


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
    captioner = Captioner.from_checkpoint(
        config.checkpoint, config.device, datastore=config.datastore
    )
    app = create_app(captioner, config)
    log.info("serving %s on http://%s:%d", captioner.name, config.host, config.port)
    keep_large_buffers_out_of_the_heap()  # before the first request, once nothing can fail
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


# glibc's mallopt() parameter, and the size from which every allocation gets its own mapping.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2**20


def keep_large_buffers_out_of_the_heap(threshold: int = MMAP_THRESHOLD) -> bool:
    """Give every allocation of `threshold` bytes or more its own mapping (glibc only).

    Returns whether the setting was made: not where the C library is not glibc, nor where the
    operator set the threshold (`MALLOC_MMAP_THRESHOLD_`, or `glibc.malloc.mmap_threshold` in
    `GLIBC_TUNABLES`): theirs wins. It is a setting of the whole process, made once by `serve`
    before it takes requests, not by `create_app`, which may be embedded in another program.

    glibc maps a large block on its own and unmaps it when freed, but each time such a block is
    freed it raises the size from which it does so to that block's (up to 32 MiB). After the
    first large upload, every later upload, decoded image and preprocessing array of that size
    is carved from the heap of the thread that made it, and the server makes them in many
    threads (the form parser's, the decoders', the model's), each with a heap of its own. Freed,
    they stay in those heaps, split by the small allocations made between them, so the resident
    memory grows with traffic though little of it is in use: in 180 s of
    `benchmarks/serve_soak.py` the heaps grew from 490 to 720 MB, of which 230 and then 405 MB
    were free, and the resident memory by 37%. A fixed threshold stops the adjustment, so every
    buffer whose size a client chooses goes back to the system when its request is done. The
    cost is a fresh mapping (and its page faults) for each large tensor of a model run on the
    CPU: beam search of GPT-2 124M over 16 images took about 1.35 times as long (21.5 and 23.4 s
    against 15.2 and 17.9 s, one thread, an idle machine). On a GPU the model's tensors are not
    the C heap's (not measured there). An operator who prefers the CPU speed sets
    `MALLOC_MMAP_THRESHOLD_=33554432` (32 MiB).
    """
    import os

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "malloc.mmap_threshold" in tunables:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def _glibc():
    """The process's C library when it is glibc (which has mallopt), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl, macOS and Windows do not)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


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
