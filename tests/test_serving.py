"""The HTTP service (ferkit.serving): every endpoint, every bad-request case, the micro-batcher, `ferkit serve`.

Uses a freshly initialised ferkit_vgg_s saved to a temp file (the shipped weights may not exist): its
probabilities are meaningless but their schema, batching and error handling are what is tested here.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

with warnings.catch_warnings():  # starlette >= 1 prefers httpx2 for its test client; httpx works the same
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ferkit.cli import app as cli_app  # noqa: E402
from ferkit.data.labels import FER2013_NAMES  # noqa: E402
from ferkit.inference import Recognizer  # noqa: E402
from ferkit.inference.image_io import sample_image_path  # noqa: E402
from ferkit.serving import MicroBatcher, ServeSettings, create_app  # noqa: E402

CLASSES = list(FER2013_NAMES)
SAMPLE = sample_image_path()


def make_client(rec: Recognizer, **settings) -> TestClient:
    settings.setdefault("workers", 2)
    settings.setdefault("warmup", False)
    return TestClient(create_app(ServeSettings(**settings), recognizer=rec), base_url="http://localhost")


@pytest.fixture(scope="module")
def client(rec: Recognizer):
    with make_client(rec) as c:
        yield c


def png_bytes(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a tiny (invalid) data stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def dds_bytes(fourcc: bytes) -> bytes:
    """A 4x4 DDS whose pixel format is `fourcc` (an unknown one makes Pillow raise NotImplementedError)."""
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I", 32, 0x4) + fourcc + bytes(20)
    return b"DDS " + header + pixel_format + bytes(20) + bytes(64)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def crops(n: int, seed: int = 0) -> list[bytes]:
    """n different 48x48 gray 'faces' (distinct patterns, so mixed-up answers would show)."""
    rng = np.random.default_rng(seed)
    return [encode(rng.integers(0, 256, (48, 48), dtype=np.uint8)) for _ in range(n)]


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    for word in words:
        assert word in body["detail"], body


def assert_faces(faces: list[dict], detected: bool = True) -> None:
    for face in faces:
        assert set(face) >= {"emotions", "dominant"}
        assert list(face["emotions"]) == CLASSES
        assert sum(face["emotions"].values()) == pytest.approx(1.0, abs=1e-4)
        assert face["dominant"] == max(face["emotions"], key=face["emotions"].get)
        if detected:
            assert len(face["box"]) == 4 and all(isinstance(v, int) for v in face["box"])
            assert 0.0 <= face["face_score"] <= 1.0


# -- endpoints ---------------------------------------------------------------------------------------------


def test_healthz_and_models(client: TestClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model_loaded"]
    info = client.get("/v1/models").json()
    assert info["model"] == "ferkit_vgg_s" and info["classes"] == CLASSES and info["num_classes"] == 7
    assert info["detector"] == "retinaface" and info["weights"] == "vgg_s.safetensors"
    assert info["limits"] == ServeSettings().limits()
    assert info["batching"] == {"enabled": True, "max_batch": 32, "max_wait_ms": 5.0}
    assert {"batches", "requests", "items", "largest", "sizes"} <= set(info["batch_stats"])


def test_analyze_multipart_matches_the_python_api(client: TestClient, rec: Recognizer) -> None:
    r = client.post("/v1/analyze", files={"file": ("astronaut.jpg", SAMPLE.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["faces"]) == 1
    assert body["image"] == {"name": "astronaut.jpg", "width": 512, "height": 512}
    assert body["model"] == "ferkit_vgg_s" and body["classes"] == CLASSES
    assert set(body["timing_ms"]) == {"read", "decode", "detect", "classify", "total"}
    assert body["batch"]["size"] >= 1 and body["batch"]["requests"] >= 1
    assert_faces(body["faces"])
    expected = rec.detect_emotions(str(SAMPLE))
    assert [f["box"] for f in body["faces"]] == [f["box"] for f in expected]
    for got, want in zip(body["faces"], expected, strict=True):
        assert got["dominant"] == want["dominant"]
        assert got["face_score"] == pytest.approx(want["face_score"], abs=1e-6)
        assert got["emotions"] == pytest.approx(want["emotions"], abs=1e-5)


def test_analyze_raw_body_and_any_field_name(client: TestClient) -> None:
    raw = client.post("/v1/analyze", content=SAMPLE.read_bytes(), headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["image"]["name"] == "body" and raw.json()["count"] == 1
    # curl --data-binary sends application/x-www-form-urlencoded by default: still the raw image
    form_type = client.post("/v1/analyze", content=SAMPLE.read_bytes(),
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert form_type.status_code == 200 and form_type.json()["count"] == 1
    other = client.post("/v1/analyze", files={"image": ("a.jpg", SAMPLE.read_bytes(), "image/jpeg")})
    assert other.status_code == 200 and other.json()["count"] == 1


def test_analyze_photo_without_faces(client: TestClient) -> None:
    r = client.post("/v1/analyze", files={"file": ("gray.png", encode(np.full((64, 80), 128, np.uint8)))})
    assert r.status_code == 200, r.text
    assert r.json()["faces"] == [] and r.json()["count"] == 0 and r.json()["batch"] is None
    assert r.json()["image"]["width"] == 80 and r.json()["image"]["height"] == 64


def test_analyze_applies_exif_rotation(client: TestClient) -> None:
    im = Image.new("RGB", (60, 40), (200, 100, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: shown as 40 wide, 60 tall
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    r = client.post("/v1/analyze", files={"file": ("rot.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and (r.json()["image"]["width"], r.json()["image"]["height"]) == (40, 60)


def test_classify_batch_of_crops_matches_the_python_api(client: TestClient, rec: Recognizer) -> None:
    data = crops(3)
    r = client.post("/v1/classify", files=[("files", (f"f{i}.png", d, "image/png")) for i, d in enumerate(data)])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3 and [f["name"] for f in body["faces"]] == ["f0.png", "f1.png", "f2.png"]
    assert_faces(body["faces"], detected=False)
    expected = rec.classify_faces([np.asarray(Image.open(io.BytesIO(d))) for d in data])
    for got, want in zip(body["faces"], expected, strict=True):
        assert got["emotions"] == pytest.approx(want["emotions"], abs=1e-5)
    # one crop as the raw body; a color crop of another size is converted like classify_faces does
    face = np.asarray(Image.open(SAMPLE).convert("RGB").crop((150, 40, 330, 220)))
    single = client.post("/v1/classify", content=encode(face, "JPEG"), headers={"content-type": "image/jpeg"})
    assert single.status_code == 200 and single.json()["count"] == 1
    want = rec.classify_faces(np.asarray(Image.open(io.BytesIO(encode(face, "JPEG")))), color="rgb")
    assert single.json()["faces"][0]["emotions"] == pytest.approx(want["emotions"], abs=1e-5)


def test_web_page_and_its_assets_are_served_locally(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "/static/app.js" in html and "/static/style.css" in html and 'type="file"' in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    for asset, kind in [("/static/app.js", "javascript"), ("/static/style.css", "text/css")]:
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text
    assert client.get("/sample.jpg").content == SAMPLE.read_bytes()


def test_openapi_and_offline_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/analyze", "/v1/classify", "/v1/models", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body
    assert {"400", "413", "422"} <= set(spec["paths"]["/v1/analyze"]["post"]["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text.lower()
    assert "cdn" not in docs.text.lower()
    js = [part.split('"')[0] for part in docs.text.split('src="')[1:]]
    assert js and all(client.get(src).status_code == 200 for src in js)
    assert client.get("/redoc").status_code == 200


# -- bad requests: always a 4xx JSON answer --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/analyze", "/v1/classify"])
def test_no_file_and_empty_bodies(client: TestClient, path: str) -> None:
    assert_error(client.post(path), 400, "empty_body", "multipart")
    assert_error(client.post(path, content=b"", headers={"content-type": "image/jpeg"}), 400, "empty_body")
    # a browser form with no file chosen sends a part with an empty file name: no file
    assert_error(client.post(path, data={"note": "hello"}, files={"x": ("", b"")}), 400, "no_file", "note")
    # a multipart form with only text fields
    body = b'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--xyz--\r\n'
    r = client.post(path, content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(r, 400, "no_file", "note")
    assert_error(client.post(path, files={"file": ("a.png", b"", "image/png")}), 400, "empty_file", "a.png")


@pytest.mark.parametrize("path", ["/v1/analyze", "/v1/classify"])
def test_malformed_multipart(client: TestClient, path: str) -> None:
    r = client.post(path, content=b"--nope\r\n", headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "bad_request", "boundary")
    r = client.post(path, content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400 and r.json()["error"] in ("bad_request", "no_file")


@pytest.mark.parametrize("path", ["/v1/analyze", "/v1/classify"])
@pytest.mark.parametrize("name, content, status, code, word", [
    ("notes.txt", b"hello, this is not an image at all", 422, "not_an_image", "not an image"),
    ("zeros.bin", bytes(1000), 422, "not_an_image", "not an image"),
    ("truncated.jpg", SAMPLE.read_bytes()[:2000], 422, "corrupt_image", "truncated"),
    ("broken.png", encode(np.zeros((32, 32), np.uint8))[:-30], 422, "corrupt_image", "corrupt"),
    ("corrupt.dds", dds_bytes(b"XXXX"), 422, "corrupt_image", "corrupt"),  # Pillow: NotImplementedError
    ("bomb.png", png_bytes(20000, 20000), 413, "too_many_pixels", "pixel limit"),
    ("huge-bomb.png", png_bytes(60000, 60000), 413, "too_many_pixels", "pixel"),
])
def test_bad_images(client: TestClient, path: str, name: str, content: bytes, status: int, code: str,
                    word: str) -> None:
    assert_error(client.post(path, files={"file": (name, content, "application/octet-stream")}),
                 status, code, word)
    assert_error(client.post(path, content=content, headers={"content-type": "application/octet-stream"}),
                 status, code, word)


def test_pixel_limit_is_configurable(rec: Recognizer) -> None:
    with make_client(rec, max_pixels=100 * 100) as small:
        ok = small.post("/v1/analyze", files={"file": ("ok.png", encode(np.zeros((100, 100), np.uint8)))})
        assert ok.status_code == 200
        big = small.post("/v1/analyze", files={"file": ("big.png", encode(np.zeros((100, 101), np.uint8)))})
        assert_error(big, 413, "too_many_pixels", "101x100", "10,000-pixel limit")


def test_upload_size_limit_gives_413(rec: Recognizer) -> None:
    with make_client(rec, max_upload_bytes=50_000) as small:
        data = SAMPLE.read_bytes()
        assert len(data) > 50_000
        for path in ("/v1/analyze", "/v1/classify"):
            assert_error(small.post(path, files={"file": ("a.jpg", data, "image/jpeg")}), 413, "upload_too_large",
                         "50,000-byte limit")
            assert_error(small.post(path, content=data), 413, "upload_too_large")

        def chunked():  # no Content-Length: the limit applies while reading
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        assert_error(small.post("/v1/analyze", content=chunked()), 413, "upload_too_large")
        assert small.post("/v1/classify", content=crops(1)[0]).status_code == 200  # small ones still pass
        assert small.get("/healthz").status_code == 200


def test_too_many_files_and_faces(rec: Recognizer) -> None:
    with make_client(rec, max_files=3, max_faces=1) as c:
        files = [("files", (f"f{i}.png", d, "image/png")) for i, d in enumerate(crops(4))]
        assert_error(c.post("/v1/classify", files=files), 422, "too_many_files", "4 files", "limit is 3")
        assert c.post("/v1/classify", files=files[:3]).status_code == 200
        two = [("file", ("a.jpg", SAMPLE.read_bytes(), "image/jpeg"))] * 2
        assert_error(c.post("/v1/analyze", files=two), 422, "too_many_files", "limit is 1")
        # two copies of the sample photo side by side: two faces, over the limit of one
        photo = np.asarray(Image.open(SAMPLE).convert("RGB"))
        pair = encode(np.concatenate([photo, photo], axis=1), "JPEG")
        assert_error(c.post("/v1/analyze", files={"file": ("pair.jpg", pair, "image/jpeg")}), 422,
                     "too_many_faces", "2 faces", "limit is 1")
        # far over the limit: the form parser stops early, with the same answer and the real limit
        many = [("files", (f"f{i}.png", b"x", "image/png")) for i in range(2000)]
        assert_error(c.post("/v1/classify", files=many), 422, "too_many_files", "more than 4 files", "limit is 3")
        assert_error(c.post("/v1/analyze", files=two * 2), 422, "too_many_files", "limit is 1")


def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.get("/v1/analyze"), 405, "method_not_allowed")
    assert_error(client.post("/v1/analyze", content=b"x", headers={"content-length": "abc"}), 400, "bad_request")


# -- memory, concurrency, hosts and headers (issue #26) --------------------------------------------------------


def test_multipart_uploads_stay_in_memory(rec: Recognizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette spools file parts over 1 MB to a temporary file; ferkit keeps them in memory (the docs say the
    photo never leaves the server's memory)."""
    import tempfile

    created = []
    real = tempfile.TemporaryFile

    def recording_temporary_file(*args, **kwargs):  # what SpooledTemporaryFile rolls over to
        created.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording_temporary_file)
    noise = np.random.default_rng(0).integers(0, 256, (800, 1000, 3), dtype=np.uint8)
    big = encode(noise)
    assert 2_000_000 < len(big) < ServeSettings().max_upload_bytes
    with make_client(rec) as c:
        r = c.post("/v1/classify", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 200, r.text
    assert created == []


def test_host_header_must_be_an_allowed_host(rec: Recognizer) -> None:
    with make_client(rec) as c:
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("evil.example.com", "evil.example.com:8000", "127.0.0.1.evil.example.com"):
            r = c.get("/v1/models", headers={"host": host})
            assert r.status_code == 400 and "host" in r.text.lower(), host
            assert r.headers["x-frame-options"] == "DENY"
        assert c.post("/v1/analyze", content=SAMPLE.read_bytes(), headers={"host": "evil.example.com"}
                      ).status_code == 400
    with make_client(rec, allowed_hosts=("fer.example.org",)) as c:
        assert c.get("/healthz", headers={"host": "fer.example.org"}).status_code == 200
        assert c.get("/healthz", headers={"host": "localhost"}).status_code == 400
    with make_client(rec, allowed_hosts=("*",)) as c:
        assert c.get("/healthz", headers={"host": "anything.example"}).status_code == 200


def test_security_headers_on_every_answer(client: TestClient) -> None:
    for path in ("/", "/static/app.js", "/v1/models", "/healthz", "/openapi.json", "/v1/nope", "/sample.jpg"):
        r = client.get(path)
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["x-frame-options"] == "DENY", path
        assert r.headers["referrer-policy"] == "no-referrer", path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, path
    bad = client.post("/v1/analyze", files={"file": ("a.txt", b"text", "text/plain")})
    assert bad.status_code == 422 and bad.headers["x-frame-options"] == "DENY"
    # The page loads only its own script and style files, which the strict policy allows.
    page = client.get("/").text
    assert "<script>" not in page and "<style" not in page and " style=" not in page
    # Swagger UI and ReDoc start from an inline script: their pages (only) allow it, still nothing from elsewhere.
    for path in ("/docs", "/redoc"):
        r = client.get(path)
        assert r.status_code == 200
        csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
        assert csp["script-src"] == "'self' 'unsafe-inline'" and csp["default-src"] == "'self'"
        assert "http" not in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
        for src in [part.split('"')[0] for part in r.text.split('src="')[1:]]:
            assert src.startswith("/") and client.get(src).status_code == 200, src


class BlockingRecognizer:
    """`rec`, but detect_faces waits for `release` (and counts how many run at once)."""

    def __init__(self, rec: Recognizer, delay: float = 0.0) -> None:
        self._rec, self.delay = rec, delay
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = 0

    def __getattr__(self, name: str):
        return getattr(self._rec, name)

    def detect_faces(self, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(timeout=10)
            time.sleep(self.delay)
            return self._rec.detect_faces(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_busy_server_answers_503_with_retry_after(rec: Recognizer) -> None:
    slow = BlockingRecognizer(rec)
    photo = SAMPLE.read_bytes()
    with make_client(slow, max_concurrent_requests=1, max_queued_requests=1, workers=2) as c:
        slots = c.app.state.service.slots
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.post, "/v1/analyze", content=photo)
            wait_until(lambda: slow.running == 1)
            queued = pool.submit(c.post, "/v1/analyze", content=photo)
            wait_until(lambda: slots.waiting == 1)
            busy = c.post("/v1/analyze", content=photo)
            assert_error(busy, 503, "busy", "retry")
            assert busy.headers["retry-after"] == "1" and busy.headers["connection"] == "close"
            assert c.get("/healthz").status_code == 200  # the cheap endpoints are not queued
            slow.release.set()
            assert running.result(timeout=30).status_code == 200 and queued.result(timeout=30).status_code == 200
    assert slow.most == 1


def test_decode_memory_budget_bounds_concurrent_decodes(rec: Recognizer) -> None:
    from ferkit.serving.app import DECODE_BYTES_PER_PIXEL

    photo = SAMPLE.read_bytes()  # 512 x 512 RGB: 8 MB of decode budget at 32 bytes a pixel
    assert 512 * 512 * DECODE_BYTES_PER_PIXEL == 8 * 2**20
    slow = BlockingRecognizer(rec, delay=0.2)
    slow.release.set()
    with make_client(slow, decode_memory_mb=12, workers=4) as c:  # room for one such photo, not two
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: c.post("/v1/analyze", content=photo), range(4)))
        assert all(r.status_code == 200 for r in answers)
        assert slow.most == 1
        # an image that alone needs more than the whole budget is refused before decoding
        big = encode(np.zeros((700, 700, 3), np.uint8))  # 15 MB estimated
        assert_error(c.post("/v1/analyze", content=big), 413, "too_many_pixels", "decode budget")
        assert_error(c.post("/v1/classify", files={"f": ("big.png", big, "image/png")}), 413, "too_many_pixels")
    slow.most = 0
    with make_client(slow, decode_memory_mb=64, workers=4) as c:  # room for all four
        with ThreadPoolExecutor(4) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda _: c.post("/v1/analyze", content=photo),
                                                               range(4)))
    assert slow.most > 1


def test_budget_is_first_come_first_served() -> None:
    from ferkit.serving.app import Budget

    async def main() -> list[str]:
        budget, order = Budget(10), []

        async def job(name: str, units: int, hold: float) -> None:
            async with budget.hold(units):
                order.append(name)
                assert budget.used <= budget.capacity
                await asyncio.sleep(hold)

        first = asyncio.create_task(job("a", 6, 0.05))
        await asyncio.sleep(0)
        big = asyncio.create_task(job("big", 10, 0))
        await asyncio.sleep(0)
        small = asyncio.create_task(job("small", 1, 0))  # would fit now, but must not overtake "big"
        cancelled = asyncio.create_task(job("gone", 5, 0))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(first, big, small, return_exceptions=True)
        assert budget.used == 0 and budget.waiting == 0
        return order

    assert run_async(main()) == ["a", "big", "small"]


# -- micro-batching --------------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_get_their_own_answers(rec: Recognizer) -> None:
    n = 6
    data = crops(n, seed=1)
    expected = rec.classify_faces([np.asarray(Image.open(io.BytesIO(d))) for d in data])
    with make_client(rec, max_batch=8, max_wait_ms=300) as c:
        barrier = threading.Barrier(n)

        def post(i: int):
            barrier.wait()
            return c.post("/v1/classify", files={"file": (f"f{i}.png", data[i], "image/png")})

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(post, range(n)))
        stats = c.get("/v1/models").json()["batch_stats"]
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        face = r.json()["faces"][0]
        assert face["name"] == f"f{i}.png"
        assert face["emotions"] == pytest.approx(expected[i]["emotions"], abs=1e-5)
    assert max(r.json()["batch"]["size"] for r in responses) > 1
    assert stats["largest"] > 1 and stats["items"] == n and stats["batches"] < n


def test_batching_can_be_turned_off(rec: Recognizer) -> None:
    with make_client(rec, batching=False) as c:
        assert c.get("/v1/models").json()["batching"]["enabled"] is False
        files = [("files", (f"f{i}.png", d, "image/png")) for i, d in enumerate(crops(3))]
        r = c.post("/v1/classify", files=files)
        assert r.status_code == 200 and r.json()["batch"] == {**r.json()["batch"], "size": 3, "requests": 1}
        assert c.post("/v1/analyze", content=SAMPLE.read_bytes()).json()["batch"]["requests"] == 1


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_micro_batcher_groups_concurrent_submits() -> None:
    seen: list[int] = []

    def fn(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        time.sleep(0.01)
        return x * 2

    async def main():
        b = MicroBatcher(fn, max_batch=5, max_wait_ms=200)
        results = await asyncio.gather(*(b.submit(np.full((1 + i % 2, 2), i)) for i in range(8)))
        await b.aclose()
        return b, results

    b, results = run_async(main())
    for i, (out, info) in enumerate(results):
        assert out.shape == (1 + i % 2, 2) and (out == 2 * i).all()  # each caller gets its own rows
        assert 1 <= info.size <= 5 and info.requests >= 1
    assert sum(seen) == 12 and max(seen) <= 5 and len(seen) < 8
    assert b.stats.items == 12 and b.stats.requests == 8 and b.stats.batches == len(seen)


def test_micro_batcher_oversized_request_wait_and_disabled_mode() -> None:
    async def main():
        b = MicroBatcher(lambda x: x + 1, max_batch=2, max_wait_ms=0)
        big, info = await b.submit(np.zeros((5, 1)))  # more than max_batch: runs alone, not split
        assert (big == 1).all() and info.size == 5 and info.requests == 1
        t = time.perf_counter()
        b2 = MicroBatcher(lambda x: x, max_batch=64, max_wait_ms=50)
        _, info2 = await b2.submit(np.zeros((1, 1)))  # a lone request waits at most max_wait_ms
        assert info2.size == 1 and time.perf_counter() - t < 5
        off = MicroBatcher(lambda x: x, max_batch=64, max_wait_ms=1000, enabled=False)
        outs = await asyncio.gather(*(off.submit(np.full((1, 1), i)) for i in range(4)))
        assert [int(o[0][0, 0]) for o in outs] == [0, 1, 2, 3] and all(o[1].size == 1 for o in outs)
        assert off.stats.batches == 4
        for x in (b, b2, off):
            await x.aclose()

    run_async(main())


def test_micro_batcher_errors_reach_every_caller_and_it_recovers() -> None:
    calls = {"n": 0}

    def fn(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model exploded")
        return x

    async def main():
        b = MicroBatcher(fn, max_batch=8, max_wait_ms=100)
        first = await asyncio.gather(*(b.submit(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in first)
        out, _ = await b.submit(np.ones((2, 1)))
        assert (out == 1).all()
        await b.aclose()

    run_async(main())
    with pytest.raises(ValueError):
        MicroBatcher(lambda x: x, max_batch=0)
    with pytest.raises(ValueError):
        ServeSettings(max_upload_bytes=0).validate()


# -- `ferkit serve` --------------------------------------------------------------------------------------------


def test_serve_cli_help_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: Path) -> None:
    runner = CliRunner()
    helped = runner.invoke(cli_app, ["serve", "--help"])
    assert helped.exit_code == 0
    for flag in ("--host", "--port", "--model", "--weights", "--max-batch", "--max-wait-ms", "--no-batching",
                 "--max-connections", "--max-concurrent-requests", "--max-queued-requests", "--decode-memory-mb",
                 "--header-timeout", "--body-timeout", "--keep-alive-timeout", "--allowed-hosts", "curl"):
        assert flag in helped.output
    missing = runner.invoke(cli_app, ["serve", "--weights", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 2 and "not found" in missing.output
    bad = runner.invoke(cli_app, ["serve", "--weights", str(weights), "--max-batch", "0"])
    assert bad.exit_code == 2 and "max_batch" in bad.output

    captured = {}

    def fake_run(app, **kwargs):
        captured["app"], captured["kwargs"] = app, kwargs

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    ok = runner.invoke(cli_app, ["serve", "--weights", str(weights), "--port", "0", "--max-batch", "4",
                                 "--max-wait-ms", "2", "--no-batching", "--detector", "haar"])
    assert ok.exit_code == 0, ok.output
    assert captured["kwargs"]["host"] == "127.0.0.1" and captured["kwargs"]["port"] == 0
    with TestClient(captured["app"], base_url="http://127.0.0.1") as c:
        info = c.get("/v1/models").json()
    assert info["batching"] == {"enabled": False, "max_batch": 4, "max_wait_ms": 2.0}
    assert info["detector"] == "haar" and info["model"] == "ferkit_vgg_s"
    # the connection limits reach uvicorn; the Host check answers the bound address and loopback names only
    kwargs = captured["kwargs"]
    assert kwargs["limit_concurrency"] == 128 and kwargs["timeout_keep_alive"] == 5
    assert kwargs["http"].header_timeout == 10.0
    ok = runner.invoke(cli_app, ["serve", "--weights", str(weights), "--host", "10.1.2.3", "--max-connections", "9",
                                 "--header-timeout", "2.5", "--body-timeout", "7", "--max-concurrent-requests", "3"])
    assert ok.exit_code == 0, ok.output
    assert captured["kwargs"]["limit_concurrency"] == 9 and captured["kwargs"]["http"].header_timeout == 2.5
    with TestClient(captured["app"], base_url="http://10.1.2.3:8000") as c:
        limits = c.get("/v1/models").json()["limits"]
        assert limits["body_timeout_s"] == 7 and limits["max_concurrent_requests"] == 3
        assert c.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "evil.example.com"}).status_code == 400
    ok = runner.invoke(cli_app, ["serve", "--weights", str(weights), "--allowed-hosts", "::1, Fer.Example.org"])
    with TestClient(captured["app"], base_url="http://fer.example.org") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "localhost"}).status_code == 400
    bad = runner.invoke(cli_app, ["serve", "--weights", str(weights), "--body-timeout", "0"])
    assert bad.exit_code == 2 and "body_timeout" in bad.output
