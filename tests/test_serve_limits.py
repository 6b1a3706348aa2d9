"""The server's memory is bounded: bodies limited as they stream, decoding under the queue limit,
a dead batcher reported, pending requests failed on shutdown."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from test_serve import free_port, running_server, uploads

from clipcap_cache.errors import ClipcapError
from clipcap_cache.inference.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def pictures(shapes):
    """Six different shapes images as PNG bytes."""
    _, root = shapes
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())[:6]}


def client_for(captioner, trained_run, **settings):
    app = create_app(captioner, ServeConfig(str(trained_run), **settings))
    return TestClient(app, base_url="http://127.0.0.1")  # a loopback Host, as browsers send


@pytest.fixture(scope="module")
def small_limit_server(captioner, trained_run):
    """A real uvicorn server that takes one image of at most 10 kB per request."""

    port = free_port()
    config = ServeConfig(str(trained_run), port=port, max_upload_mb=0.01, max_images=1)
    app = create_app(captioner, config)
    with running_server(app, port):
        yield port


def _chunked_upload(port: int, chunk: bytes, most: int) -> tuple[bytes, int]:
    """Send a chunked multipart body until the server answers; returns (reply, bytes sent)."""
    boundary = "xyz"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
        )
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        sock.settimeout(0.05)
        reply = b""
        while sent < most:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except OSError:  # the server closed the connection after answering
                break
            try:
                reply += sock.recv(65536)
            except TimeoutError:
                continue
            if reply:
                break
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except OSError:
            pass
    return reply, sent


@pytest.mark.bad_input("data loss")
def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams(small_limit_server):
    # No Content-Length: the limit (10 kB image + 1 MB of form room) is counted as bytes arrive.
    reply, sent = _chunked_upload(small_limit_server, b"x" * 65536, most=64 * 2**20)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 8 * 2**20, f"the server read {sent} bytes before refusing"


@pytest.mark.bad_input("data loss")
def test_a_declared_length_over_the_limit_is_refused_before_reading(small_limit_server):
    with socket.create_connection(("127.0.0.1", small_limit_server), timeout=10) as sock:
        sock.sendall(
            b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")


def test_decoding_happens_within_the_queue_limit(captioner, trained_run, pictures):
    # Twelve one-image requests at once against room for 3 images: decoded images never exceed
    # 3 at a time, the rest are told to come back, and every answer is its own image's.
    active, peak, lock = 0, 0, threading.Lock()
    preprocess = captioner.preprocess

    def counted(data, **options):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.05)  # a slow decode, so that requests overlap
            return preprocess(data, **options)
        finally:
            with lock:
                active -= 1

    names = list(pictures) * 2
    captioner.preprocess = counted
    try:
        with client_for(captioner, trained_run, max_queue=3, max_images=1) as client:
            with ThreadPoolExecutor(len(names)) as pool:
                replies = list(
                    pool.map(
                        lambda n: client.post("/caption", files=uploads({n: pictures[n]})), names
                    )
                )
            health = client.get("/health").json()
    finally:
        del captioner.preprocess
    assert 1 <= peak <= 3, peak
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for name, reply in zip(names, replies, strict=True):
        if reply.status_code == 200:
            expected = captioner([pictures[name]], beams=5)[0]
            found = reply.json()["results"][0]["captions"]
            # Batched with others or alone: the same captions, scores equal up to float rounding.
            assert [c["caption"] for c in found] == [c["caption"] for c in expected]
            assert [c["score"] for c in found] == pytest.approx(
                [c["score"] for c in expected], abs=1e-5
            )
    assert health["queue_depth"] == 0


def test_a_dead_batcher_is_reported_by_health_and_requests(captioner, trained_run, pictures):
    with client_for(captioner, trained_run) as client:
        assert client.get("/health").status_code == 200
        assert client.head("/health").status_code == 200
        batcher = client.app.state.batcher
        client.portal.call(lambda: batcher.task.cancel())
        deadline = time.monotonic() + 5
        while batcher.alive:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        health = client.get("/health")
        assert health.status_code == 503 and "not running" in health.json()["detail"]
        name = next(iter(pictures))
        reply = client.post("/caption", files=uploads({name: pictures[name]}))
        assert reply.status_code == 503


def test_stopping_fails_waiting_requests_with_503(captioner, trained_run, pictures):
    name = next(iter(pictures))
    with client_for(captioner, trained_run, batch_window_ms=400) as client:
        batcher = client.app.state.batcher
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/caption", files=uploads({name: pictures[name]}))
            deadline = time.monotonic() + 10
            while batcher.depth == 0:
                assert time.monotonic() < deadline, "the request never queued"
                time.sleep(0.005)
            client.portal.call(batcher.stop)
            reply = waiting.result(timeout=30)
    assert reply.status_code == 503, reply.text
    assert "shutting down" in reply.json()["detail"]


@pytest.mark.bad_input("message")
def test_option_errors_name_form_fields_and_keep_negative_numbers(captioner, trained_run, pictures):
    name = next(iter(pictures))
    with client_for(captioner, trained_run) as client:
        reply = client.post("/caption", files=uploads({name: pictures[name]}), data={"seed": "-1"})
        assert reply.status_code == 422
        assert "-1" in reply.json()["detail"] and "_1" not in reply.json()["detail"]
        reply = client.post("/caption", files=uploads({name: pictures[name]}), data={"top_p": "2"})
        assert reply.status_code == 422 and "top_p" in reply.json()["detail"], reply.text


@pytest.mark.bad_input("bad option")
def test_more_images_per_request_than_the_queue_holds_is_refused(trained_run):
    with pytest.raises(ClipcapError, match="--max-images 9 is more than --max-queue 8"):
        ServeConfig(str(trained_run), max_images=9, max_queue=8)


@pytest.mark.slow
def test_a_short_soak_keeps_the_server_healthy_and_its_memory_flat(trained_run):
    # The benchmark's soak, bounded: 8 clients post 2 MB images for 6 s against room for 2.
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve_soak import noise_png, rss_bytes, soak, start_server

    image = noise_png(2)
    process, url = start_server(trained_run, max_queue=2, max_upload_mb=3)
    try:
        with httpx.Client(timeout=60) as http:  # warm up: the model's first run, the threads
            for _ in range(3):
                http.post(url + "/caption", files={"images": ("a.png", image, "image/png")})
        before = rss_bytes(process.pid)
        result = soak(url, process.pid, clients=8, seconds=6, image=image, window=2)
        time.sleep(1)  # idle: the requests' buffers are freed
        kept = rss_bytes(process.pid) - before
        healthy = httpx.get(url + "/health").status_code
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result["other"] == {}, result  # every answer is a caption or a 503, nothing else
    assert result["served"] >= 3 and result["busy_503"] >= 1, result
    assert healthy == 200
    assert result["rss_growth"] < 0.10, result
    # What the soak leaves behind once idle: the freed uploads and decoded images go back to the
    # system rather than staying in the C heaps of the threads that made them. Measured: about 6
    # images' worth (12 MB); 25 to 30 when glibc adjusts its mmap threshold (50-59 MB).
    assert kept < 15 * len(image), f"the server kept {kept / 2**20:.0f} MB after the soak: {result}"


def test_the_operators_own_mmap_threshold_is_left_alone(monkeypatch):
    from clipcap_cache.inference.serve import keep_large_buffers_out_of_the_heap

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert not keep_large_buffers_out_of_the_heap()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=33554432")
    assert not keep_large_buffers_out_of_the_heap()


@pytest.mark.bad_input("message")
def test_a_port_in_use_is_one_line_before_the_models_load(tmp_path):
    from conftest import assert_one_line_error, run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The checkpoint does not exist: the port is checked first, before anything loads.
        result = run_cli("serve", "--checkpoint", tmp_path / "nothing", "--port", port)
    assert "cannot listen on 127.0.0.1" in assert_one_line_error(result)
