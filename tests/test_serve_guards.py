"""The server's guards: decoding options within bounds, a pixel budget and bounded decoding,
Host and Origin checks, a body-read timeout, and one-line validation messages."""

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve import free_port, running_server, uploads

from clipcap_cache.errors import ClipcapError
from clipcap_cache.inference.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def png(shapes) -> bytes:
    _, root = shapes
    return sorted((root / "images").iterdir())[0].read_bytes()


def client_for(captioner, trained_run, host="127.0.0.1", **settings):
    """A client of a server bound (in its config) to `host`, whose requests name that host."""
    app = create_app(captioner, ServeConfig(str(trained_run), host=host, **settings))
    return TestClient(app, base_url=f"http://{host}")


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"sample": "true", "seed": str(2**64)}, "seed must be at most 9223372036854775807"),
        ({"sample": "true", "temperature": "1e-300"}, "temperature must be between 0.01 and 100"),
        ({"sample": "true", "temperature": "1e300"}, "temperature must be between 0.01 and 100"),
        ({"sample": "true", "top_p": "nan"}, "top_p must be a finite number"),
        # The tiny GPT-2 has 128 positions and the prefix takes 4: 124 new tokens at most.
        ({"sample": "true", "max_tokens": "300"}, "max_tokens 300 is more than this model can"),
    ],
)
def test_decoding_options_that_crashed_the_model_are_422(
    captioner, trained_run, png, fields, expected
):
    with client_for(captioner, trained_run, max_caption_tokens=1000) as client:
        reply = client.post("/caption", files=uploads({"a.png": png}), data=fields)
        assert reply.status_code == 422, reply.text
        assert expected in reply.json()["detail"]
        # The server is unharmed and the largest allowed value works.
        allowed = {"sample": "true", "max_tokens": "124", "seed": str(2**63 - 1)}
        assert client.post("/caption", files=uploads({"a.png": png}), data=allowed).is_success


@pytest.mark.bad_input("numbers")
@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"beams": "10000", "num_captions": "10000"}, "beams must be at most 100, not 10000"),
        ({"beams": "9"}, "beams 9 is over this server's limit of 8 (serve --max-beams)"),
        (
            {"sample": "true", "num_captions": "5"},
            "num_captions 5 is over this server's limit of 4",
        ),
        ({"max_tokens": "41"}, "max_tokens 41 is over this server's limit of 40"),
    ],
)
def test_decoding_work_per_request_is_bounded(captioner, trained_run, png, fields, expected):
    limits = dict(max_beams=8, max_num_captions=4, max_caption_tokens=40)
    with client_for(captioner, trained_run, **limits) as client:
        started = time.monotonic()
        reply = client.post("/caption", files=uploads({"a.png": png}), data=fields)
        assert reply.status_code == 422 and expected in reply.json()["detail"], reply.text
        assert time.monotonic() - started < 5  # refused, not computed
        at_limit = {"beams": "8", "num_captions": "4", "max_tokens": "40"}
        reply = client.post("/caption", files=uploads({"a.png": png}), data=at_limit)
        assert reply.status_code == 200 and len(reply.json()["results"][0]["captions"]) == 4


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_upload_mb=1e308), "--max-upload-mb must be at most 1024"),
        (dict(batch_window_ms=1e300), "--batch-window-ms must be at most 10000"),
        (dict(max_beams=1000), "--max-beams must be at most 100"),
        (dict(body_timeout_s=0), "--body-timeout-s must be greater than 0"),
        (dict(decode_threads=0), "--decode-threads must be at least 1"),
        (dict(allowed_hosts=" , "), "--allowed-hosts names no host"),
    ],
)
def test_server_settings_are_bounded(trained_run, settings, message):
    with pytest.raises(ClipcapError, match=message):
        ServeConfig(str(trained_run), **settings)


def tiny_header_huge_image(side: int) -> bytes:
    """A PNG of side x side black pixels: a few kB that decode to side**2 bytes or more."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


class CountingCaptioner:
    """The real captioner, counting how many images it decodes at once."""

    def __init__(self, captioner):
        self.captioner, self.active, self.most = captioner, 0, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.captioner, name)

    def preprocess(self, image, **options):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.05)  # long enough for the decodes of concurrent requests to overlap
            return self.captioner.preprocess(image, **options)
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.bad_input("data loss")
def test_a_pixel_bomb_is_refused_from_its_header_and_decodes_are_bounded(
    captioner, trained_run, png
):
    bomb = tiny_header_huge_image(3000)  # 9 MP in a few kB
    assert len(bomb) < 100_000
    counting = CountingCaptioner(captioner)
    app = create_app(
        counting, ServeConfig(str(trained_run), max_image_pixels=4_000_000, decode_threads=2)
    )
    with TestClient(app, base_url="http://127.0.0.1") as client:
        reply = client.post("/caption", files=uploads({"bomb.png": bomb}))
        assert reply.status_code == 400, reply.text
        assert "3000x3000 pixels, limit 4000000" in reply.json()["detail"]
        # Eight requests of two images at once: never more than two decodes run together.
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda i: client.post(
                        "/caption", files=uploads({f"{i}a.png": png, f"{i}b.png": png})
                    ),
                    range(8),
                )
            )
    assert all(r.status_code == 200 for r in replies)
    assert counting.most == 2


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize(
    "host, headers, status",
    [
        ("127.0.0.1", {"host": "evil.example:8000"}, 400),  # DNS rebinding: the page's own name
        ("127.0.0.1", {"origin": "http://evil.example"}, 403),  # a foreign page's form
        ("127.0.0.1", {"origin": "null"}, 403),  # a sandboxed or file:// page
        ("localhost", {"host": "localhost.evil.example"}, 400),
        ("0.0.0.0", {"host": "evil.example", "origin": "http://evil.example"}, 200),  # any name
    ],
)
def test_a_loopback_server_answers_only_loopback_names(
    captioner, trained_run, png, host, headers, status
):
    with client_for(captioner, trained_run, host=host) as client:
        # TestClient's own Host is the base URL's; a header given here replaces it.
        reply = client.get("/health", headers=headers)
        assert reply.status_code == status, reply.text
        posted = client.post("/caption", files=uploads({"a.png": png}), headers=headers)
        assert posted.status_code == status
        if status != 200:
            assert "--allowed-hosts" in reply.json()["detail"]
            assert "checkpoint" not in reply.json()  # nothing of /health leaks
        # The page's own requests carry the loopback origin and pass.
        assert client.get("/health", headers={"origin": "http://127.0.0.1:8000"}).is_success


def test_allowed_hosts_names_the_hosts_of_a_network_server(captioner, trained_run):
    settings = dict(host="0.0.0.0", allowed_hosts="captions.example, 10.0.0.5")
    with client_for(captioner, trained_run, **settings) as client:
        assert client.get("/health", headers={"host": "captions.example:8000"}).is_success
        assert client.get("/health", headers={"host": "10.0.0.5"}).is_success
        assert client.get("/health", headers={"host": "evil.example"}).status_code == 400
    # Behind a reverse proxy on the same machine: the proxy's Host is loopback, the page's Origin
    # is the public name.
    settings = dict(allowed_hosts="captions.example")
    with client_for(captioner, trained_run, **settings) as client:
        origin = {"origin": "https://captions.example"}
        assert client.get("/health", headers=origin).is_success
        assert client.get("/health", headers={"origin": "https://evil.example"}).status_code == 403


@pytest.fixture(scope="module")
def quick_timeout_server(captioner, trained_run):
    """A real uvicorn server whose bodies must arrive within 1 s."""

    port = free_port()
    app = create_app(captioner, ServeConfig(str(trained_run), port=port, body_timeout_s=1))
    with running_server(app, port):
        yield port


def read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What the server sends within `seconds`, and whether it closed the connection."""
    sock.settimeout(0.1)
    reply, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            return reply, True
        reply += data
    return reply, False


@pytest.mark.bad_input("data loss")
def test_a_stalled_upload_gets_408_and_its_connection_closed(quick_timeout_server, png):
    port = quick_timeout_server
    stalled = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n\r\n--B\r\n"
        )
        stalled.append(sock)
    started = time.monotonic()
    try:
        for sock in stalled:
            reply, closed = read_until_closed(sock, 10)
            assert reply.startswith(b"HTTP/1.1 408"), reply
            assert b"did not arrive within 1 s" in reply and closed
    finally:
        for sock in stalled:
            sock.close()
    assert time.monotonic() - started < 8
    # A whole upload within the time is captioned as ever.
    files = uploads({"a.png": png})
    assert httpx.post(f"http://127.0.0.1:{port}/caption", files=files).status_code == 200


@pytest.mark.bad_input("message")
@pytest.mark.parametrize(
    "request_args, expected",
    [
        (dict(files=[("image", ("a.png", b"png", "image/png"))]), "send at least one image"),
        (dict(data={"images": "not a file"}), "'images' must hold files"),
        (dict(data={"beams": "many"}, files=[("images", ("a.png", b"x", "image/png"))]), "beams"),
    ],
)
def test_a_wrong_field_is_one_line_detail(captioner, trained_run, request_args, expected):
    with client_for(captioner, trained_run) as client:
        reply = client.post("/caption", **request_args)
    assert reply.status_code == 422
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and expected in detail, detail
    assert "not a file" not in detail  # the input is never echoed back
