"""`clipcap serve`: the HTTP API, its limits and its batching, and the web page in a real browser."""

import contextlib
import io
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import assert_one_line_error, run_cli
from fastapi.testclient import TestClient
from PIL import Image

from clipcap_cache.inference.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def pictures(shapes):
    """Eight different shapes images as PNG bytes."""
    _, root = shapes
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())[:8]}


def client_for(captioner, trained_run, **settings):
    app = create_app(captioner, ServeConfig(str(trained_run), **settings))
    return TestClient(app, base_url="http://127.0.0.1")  # a loopback Host, as browsers send


def uploads(pictures: dict):
    return [("images", (name, data, "image/png")) for name, data in pictures.items()]


def test_health_page_and_docs(captioner, trained_run):
    with client_for(captioner, trained_run) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["device"] == "cpu"
        assert health["clip_model"] == captioner.config["clip_model"]
        assert health["queue_depth"] == 0
        page = client.get("/")
        assert page.status_code == 200 and "<title>clipcap" in page.text
        assert client.get("/docs").status_code == 200
        assert "/caption" in client.get("/openapi.json").json()["paths"]


def test_captions_match_the_captioner_in_order_with_errors_per_image(
    captioner, trained_run, pictures
):
    names = list(pictures)[:2]
    files = uploads(
        {names[0]: pictures[names[0]], "notes.txt": b"hello", names[1]: pictures[names[1]]}
    )
    with client_for(captioner, trained_run) as client:
        reply = client.post("/caption", files=files, data={"beams": "3", "num_captions": "2"})
    assert reply.status_code == 200
    results = reply.json()["results"]
    assert [r["filename"] for r in results] == [names[0], "notes.txt", names[1]]
    assert results[1] == {"filename": "notes.txt", "captions": [], "error": "not an image"}
    direct = captioner([pictures[n] for n in names], beams=3, num_captions=2)
    for result, expected in zip([results[0], results[2]], direct, strict=True):
        assert result["error"] is None
        assert [c["caption"] for c in result["captions"]] == [c["caption"] for c in expected]
        assert [c["score"] for c in result["captions"]] == pytest.approx(
            [c["score"] for c in expected], abs=1e-5
        )


def test_a_prompt_field_starts_every_caption(captioner, trained_run, pictures):
    names = list(pictures)[:2]
    with client_for(captioner, trained_run) as client:
        reply = client.post(
            "/caption",
            files=uploads({n: pictures[n] for n in names}),
            data={"beams": "3", "num_captions": "2", "prompt": "a circle in"},
        )
    assert reply.status_code == 200, reply.text
    direct = captioner([pictures[n] for n in names], beams=3, num_captions=2, prompt="a circle in")
    for result, expected in zip(reply.json()["results"], direct, strict=True):
        texts = [c["caption"] for c in result["captions"]]
        assert texts == [c["caption"] for c in expected]
        assert all(t.startswith("a circle in ") for t in texts), texts


def cut_png(pictures) -> bytes:
    data = next(iter(pictures.values()))
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (12000, 8000)).save(buffer, format="PNG")  # 96 megapixels of black
    return buffer.getvalue()


@pytest.mark.bad_input("message")
@pytest.mark.parametrize(
    "case, status, expected",
    [
        ("no images", 422, "images"),
        ("a url instead of a file", 422, "images"),
        ("only bad images", 400, "no image could be read (a.txt: not an image)"),
        ("a truncated image", 400, "truncated"),
        ("a decompression bomb", 400, "decompression bomb"),
        ("an oversized upload", 413, "over 0.002 MB"),
        ("zero beams", 422, "beams must be at least 1"),
        ("greedy and sample", 422, "greedy and sample contradict each other"),
        ("more captions than beams", 422, "num_captions 6 is more than beams 5"),
        ("beams not a number", 422, "beams: Input should be a valid integer"),
        ("too many images", 422, "at most 3 images per request"),
        ("an empty prompt", 422, "prompt is empty"),
        ("a prompt too long", 422, "prompt is too long"),
    ],
)
def test_bad_requests_get_their_status_and_reason(
    captioner, trained_run, pictures, case, status, expected
):
    png = next(iter(pictures.values()))
    request = {
        "no images": dict(data={"beams": "2"}),
        "a url instead of a file": dict(data={"images": "http://169.254.169.254/latest"}),
        "only bad images": dict(files=[("images", ("a.txt", b"text", "text/plain"))]),
        "a truncated image": dict(files=[("images", ("cut.png", cut_png(pictures), "image/png"))]),
        "a decompression bomb": dict(files=[("images", ("bomb.png", bomb_png(), "image/png"))]),
        "an oversized upload": dict(files=[("images", ("big.png", b"x" * 4096, "image/png"))]),
        "zero beams": dict(files=uploads({"a.png": png}), data={"beams": "0"}),
        "greedy and sample": dict(
            files=uploads({"a.png": png}), data={"greedy": "true", "sample": "true"}
        ),
        "more captions than beams": dict(files=uploads({"a.png": png}), data={"num_captions": "6"}),
        "beams not a number": dict(files=uploads({"a.png": png}), data={"beams": "many"}),
        "too many images": dict(files=uploads({f"{i}.png": png for i in range(4)})),
        "an empty prompt": dict(files=uploads({"a.png": png}), data={"prompt": " "}),
        "a prompt too long": dict(
            files=uploads({"a.png": png}), data={"prompt": "a red circle " * 60}
        ),
    }[case]
    limits = {"max_images": 3}
    if case == "an oversized upload":
        limits["max_upload_mb"] = 0.002
    with client_for(captioner, trained_run, **limits) as client:
        reply = client.post("/caption", **request)
    assert reply.status_code == status, reply.text
    assert expected in reply.text


def captions_and_scores(captions: list[dict]) -> list[tuple[str, float]]:
    return [(c["caption"], round(c["score"], 4)) for c in captions]


def test_concurrent_requests_are_batched_and_each_gets_its_own_captions(
    captioner, trained_run, pictures
):
    # Twelve clients at once, with two sets of options: each answer must be its own image's.
    beam = {"beams": "3", "num_captions": "2"}
    jobs = [(name, beam if i % 2 else {"greedy": "true"}) for i, name in enumerate(pictures)]
    jobs += jobs[:4]
    expected = {
        (name, "greedy" in options): captions_and_scores(
            captioner(
                [pictures[name]],
                beams=3,
                greedy="greedy" in options,
                num_captions=int(options.get("num_captions", 1)),
            )[0]
        )
        for name, options in jobs
    }
    # The tiny model gives several images the same best caption, but no two the same captions
    # with the same scores: a reply that went to the wrong image cannot pass for the right one.
    assert len(set(map(tuple, expected.values()))) == len(expected)
    with client_for(captioner, trained_run, batch_window_ms=100) as client:

        def send(job):
            name, options = job
            reply = client.post("/caption", files=uploads({name: pictures[name]}), data=options)
            return reply.status_code, reply.json()["results"][0]

        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(send, jobs))
        health = client.get("/health").json()
    for (name, options), (status, result) in zip(jobs, replies, strict=True):
        assert status == 200 and result["filename"] == name
        found = captions_and_scores(result["captions"])
        want = expected[name, "greedy" in options]
        assert [c for c, _ in found] == [c for c, _ in want], name
        assert [s for _, s in found] == pytest.approx([s for _, s in want], abs=2e-4), name
    assert health["images"] == 12
    # Requests of different options never share a batch, and the burst is merged into few: one
    # batch per option set, or a few more when a request arrives after its set's batch began.
    assert 2 <= health["batches"] <= 4, health


def test_a_full_queue_answers_503_with_retry_after(captioner, trained_run, pictures):
    png = next(iter(pictures.values()))
    # The two queued requests wait for company for a window or two (0.5 s each) before they are
    # captioned: time enough for a third to find the queue full.
    settings = dict(max_queue=2, max_images=2, batch_window_ms=500)
    with client_for(captioner, trained_run, **settings) as client, ThreadPoolExecutor(2) as pool:
        waiting = [
            pool.submit(client.post, "/caption", files=uploads({f"{i}.png": png})) for i in range(2)
        ]
        deadline = time.monotonic() + 10
        while client.get("/health").json()["queue_depth"] < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.01)
        # /health answered while two images waited; a third finds no room.
        refused = client.post("/caption", files=uploads({"third.png": png}))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert all(f.result().status_code == 200 for f in waiting)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, port: int):
    """Serve `app` with uvicorn on 127.0.0.1:`port` in a thread, until the block ends."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(captioner, trained_run):
    """A real uvicorn server on a free port, in a thread."""
    import uvicorn

    port = free_port()
    app = create_app(captioner, ServeConfig(str(trained_run), port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CLIPCAP_REQUIRE_BROWSER"),
    reason="needs Chromium: apt-get install chromium (.ci/run installs it in CI)",
)
def test_the_web_page_captions_an_uploaded_image_in_a_real_browser(
    live_server, captioner, shapes, tmp_path, pictures
):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM is not None, "CLIPCAP_REQUIRE_BROWSER is set, but Chromium is not installed"

    name = next(iter(pictures))
    path = tmp_path / name
    path.write_bytes(pictures[name])
    expected = captioner([path], beams=5)[0][0]["caption"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(live_server + "/")
        # The file picker is reached by keyboard: a labelled input inside the drop zone.
        page.get_by_label("Drop images here").set_input_files(str(path))
        expect(page.locator(".card img")).to_have_attribute(
            "alt", f"Uploaded image {name}, not captioned yet"
        )
        page.get_by_role("button", name="Caption").press("Enter")
        caption = page.locator(".card .caption").first
        expect(caption).to_have_text(expected, timeout=30_000)
        expect(page.locator(".card img")).to_have_attribute("alt", expected)
        expect(page.get_by_role("status")).to_have_text("Done.")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        # A prompt typed on the page starts the caption.
        prompted = captioner([path], beams=5, prompt="a circle in")[0][0]["caption"]
        page.get_by_label("Prompt").fill("a circle in")
        page.get_by_role("button", name="Caption").click()
        expect(caption).to_have_text(prompted, timeout=30_000)
        page.get_by_label("Prompt").fill("")
        # A file that is not an image is shown inline as such.
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not really a png")
        page.get_by_label("Drop images here").set_input_files(str(bad))
        page.get_by_role("button", name="Caption").click()
        expect(page.locator(".card .error")).to_have_text("Error: not an image")
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 5000


@pytest.mark.bad_input("message")
@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "0"], "--port must be between 1 and 65535"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--max-upload-mb", "-1"], "--max-upload-mb must be greater than 0"),
        (["--device", "tpu"], "--device must be one of"),
    ],
)
def test_serve_refuses_bad_options_before_loading(checkpoint_run, args, message):
    result = run_cli("serve", "--checkpoint", checkpoint_run, *args)
    assert message in assert_one_line_error(result)


@pytest.mark.bad_input("message")
def test_serve_names_a_missing_checkpoint(tmp_path):
    result = run_cli("serve", "--checkpoint", tmp_path / "nothing")
    assert "checkpoint not found" in assert_one_line_error(result)
