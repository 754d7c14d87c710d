"""The ferkit HTTP service: a FastAPI app over `ferkit.Recognizer`, with a micro-batched classifier.

    from ferkit.serving import ServeSettings, create_app
    app = create_app(ServeSettings(weights="runs/<name>/best.safetensors", max_batch=32, max_wait_ms=5))
    # uvicorn.run(app, host="127.0.0.1", port=8000)   (what `ferkit serve` does)

Endpoints (docs/serving.md has examples):

* ``POST /v1/analyze``  one photo (multipart file field, or the raw image bytes as the body) -> its faces,
  each ``{"box", "emotions", "dominant", "face_score"}`` as `Recognizer.detect_emotions` gives them, plus timing.
* ``POST /v1/classify`` face crops (one or more multipart files, or one raw image) -> ``{"emotions", "dominant"}``
  per crop, as `Recognizer.classify_faces` gives them.
* ``GET /v1/models`` the model, its classes, the limits and the batching settings and counters.
* ``GET /healthz`` liveness / readiness.  ``GET /`` the web page.  ``GET /docs``, ``/redoc``, ``/openapi.json``.

Decoding and face detection run in a thread pool; classification goes through `MicroBatcher`, so face crops
from concurrent requests share one model call. Every bad request gets a 4xx JSON answer
``{"error": code, "detail": message}``: see `ApiError` uses below and docs/serving.md.

Memory is bounded per server, not only per request: an inference request reads its body only inside one of
`max_concurrent_requests` slots (`Service.admit`), uploads stay in memory, and decodes reserve their estimated
memory from `decode_memory_mb` (`Service.decoding`). Every answer carries CSP / X-Frame-Options / nosniff
headers, and Host headers other than `allowed_hosts` are refused. Connection-level limits (header timeout,
connection cap) are uvicorn's side: `ferkit.serving.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import FormData, MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ferkit.serving.batcher import MicroBatcher

STATIC_DIR = Path(__file__).resolve().parent / "static"
DOCS_URL, REDOC_URL = "/docs", "/redoc"
DOCS_PAGES = (DOCS_URL, f"{DOCS_URL}/oauth2-redirect", REDOC_URL)  # the generated pages with inline scripts
API_VERSION = "1"


@dataclass
class ServeSettings:
    """Everything `create_app` and `ferkit serve` can be told. Limits are per request."""

    model: str = "default"          # "default" (shipped weights), a .safetensors path, or a registry name + weights
    weights: str | None = None
    detector: str = "retinaface"    # retinaface | haar | none
    device: str = "auto"
    tta: str = "auto"               # auto (the view the weights were selected on) | none | flip | tencrop | center
    min_face_score: float = 0.0
    max_upload_bytes: int = 10 * 1024 * 1024   # whole request body; more -> 413
    max_pixels: int = 25_000_000                # per decoded image (header checked before decoding); more -> 413
    max_faces: int = 100                        # faces found in one /v1/analyze photo; more -> 422
    max_files: int = 64                         # face crops in one /v1/classify request; more -> 422
    batching: bool = True
    max_batch: int = 32                         # face crops per model call
    max_wait_ms: float = 5.0                    # how long a crop may wait for others to join its batch
    workers: int = 4                            # threads for decoding + detection (and unbatched classification)
    warmup: bool = True                         # run the models once at start-up so the first request is not slow
    # What one server may hold at once (docs/serving.md, "Memory, connections and timeouts", adds them up):
    max_concurrent_requests: int = 8           # /v1/analyze + /v1/classify requests reading or working at once
    max_queued_requests: int = 64               # more waiting for a slot -> 503 with Retry-After
    decode_memory_mb: int = 800                 # estimated memory of all image decodes in flight together
    body_timeout: float = 30.0                  # seconds for a request body to arrive once its turn came; -> 408
    # uvicorn's side (ferkit.serving.server): whole connections, not requests.
    max_connections: int = 128                  # open connections + running requests; more -> 503 (uvicorn)
    header_timeout: float = 10.0                # seconds for a request's headers to arrive; then the socket closes
    keep_alive_timeout: int = 5                 # seconds an idle kept-alive connection stays open
    # Host header values answered (DNS-rebinding guard); "*" answers any. `ferkit serve` adds its --host.
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")

    def validate(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_faces", "max_files", "max_batch", "workers",
                     "max_concurrent_requests", "decode_memory_mb", "max_connections", "keep_alive_timeout"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "max_queued_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("body_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 seconds, got {getattr(self, name)}")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: give the host names this server answers to, or '*'")

    def limits(self) -> dict[str, int | float]:
        return {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                "max_faces": self.max_faces, "max_files": self.max_files,
                "max_concurrent_requests": self.max_concurrent_requests,
                "max_queued_requests": self.max_queued_requests, "decode_memory_mb": self.decode_memory_mb,
                "body_timeout_s": self.body_timeout}


class ApiError(Exception):
    """A request the service refuses: HTTP `status`, a stable machine-readable `code`, a human `detail`.

    `close`: answer with ``Connection: close``, for refusals made before the body was read (or while it was
    being read), so a client cannot keep trickling an unwanted body into a kept-alive connection.
    """

    def __init__(self, status: int, code: str, detail: str, *, close: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = {**(headers or {}), **({"Connection": "close"} if close else {})}


def error_response(status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


# -- image decoding ----------------------------------------------------------------------------------------------


# HTTP status of each kind of undecodable upload (ferkit.data.pixels.ImageError.kind); any other kind is 422.
IMAGE_ERROR_STATUS = {"empty_file": 400, "too_many_pixels": 413}


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) from encoded bytes (`ferkit.data.pixels.decode_image`: the pixel count checked before
    any pixel is decoded, EXIF rotation, every mode converted as for files), or ApiError with the image error's
    kind as its code: empty_file 400, too_many_pixels 413, not_an_image / corrupt_image / invalid_image 422."""
    from ferkit.data.pixels import ImageError
    from ferkit.data.pixels import decode_image as decode

    try:
        return decode(data, name, max_pixels)
    except ImageError as e:
        raise ApiError(IMAGE_ERROR_STATUS.get(e.kind, 422), e.kind, f"{name}: {e.reason}") from None


# Peak memory of `decode_image` per pixel, measured (2026-12-06, Pillow + NumPy on x86-64, ru_maxrss) on 9 to 25
# megapixel images: RGB, CMYK, palette, 16-bit and gray 7 to 26 bytes, with alpha (RGBA, LA: composited on white
# in float32) 52 to 62 bytes. Rounded up, these bound what a decode may use.
DECODE_BYTES_PER_PIXEL = 32
DECODE_BYTES_PER_PIXEL_ALPHA = 64


def decode_cost(data: bytes, max_pixels: int) -> int:
    """Bytes that decoding `data` may take at its peak, from the image header alone (no pixel is decoded).

    0 when the header cannot be read or declares more than `max_pixels`: `decode_image` then refuses the image
    before decoding, so it needs no budget."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                alpha = "A" in im.mode or "a" in im.mode or "transparency" in im.info
    except Exception:
        return 0
    if width * height > max_pixels:
        return 0
    return width * height * (DECODE_BYTES_PER_PIXEL_ALPHA if alpha else DECODE_BYTES_PER_PIXEL)


# -- request reading -----------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole request body, refusing (413) before reading when Content-Length says it is too big, while
    reading when a chunked body grows past the limit, and (408) when it has not all come within `timeout` s."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", f"invalid Content-Length header {declared!r}", close=True) from None
        if size > limit:
            raise ApiError(413, "upload_too_large", f"the request body is {size:,} bytes, more than the "
                                                    f"{limit:,}-byte limit", close=True)
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, "upload_too_large", f"the request body is more than the {limit:,}-byte "
                                                            "limit", close=True)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout:g} s "
                                            f"({total:,} bytes came)", close=True) from None
    return b"".join(chunks)


async def parse_multipart(request: Request, body: bytes, max_files: int) -> FormData:
    """The multipart form in `body`, its files kept in memory.

    Starlette's parser spools each file part to a temporary file past 1 MB (`MultiPartParser.spool_max_size`);
    this parser's threshold is the body itself, which is at most `max_upload_bytes`, so no part reaches the disk.
    """

    async def whole() -> AsyncIterator[bytes]:
        yield body

    # One file over the limit is still parsed, so the answer can say how many came; the parser stops at more.
    parser = MultiPartParser(request.headers, whole(), max_files=max_files + 1, max_fields=32,
                             max_part_size=64 * 1024)
    parser.spool_max_size = max(len(body), 1)
    try:
        return await parser.parse()
    except MultiPartException as e:
        if "too many files" in e.message.lower():
            raise ApiError(422, "too_many_files", f"more than {max_files + 1} files in one request; the limit is "
                                                  f"{max_files}") from None
        raise ApiError(400, "bad_request", e.message) from None


async def read_images(request: Request, settings: ServeSettings, max_files: int, what: str,
                      example: str = "file=@photo.jpg") -> list[tuple[str, bytes]]:
    """[(name, bytes)] of the uploaded images: the file fields of a multipart form, or the raw body as one."""
    body = await read_body(request, settings.max_upload_bytes, settings.body_timeout)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        if not body:
            raw = example.split("@", 1)[1]
            raise ApiError(400, "empty_body", f"no image: send {what} as multipart file fields (-F {example}) or "
                                              f"one image as the raw request body (--data-binary @{raw})")
        return [("body", body)]
    form = await parse_multipart(request, body, max_files)
    del body  # the parts hold their own copies: keep one copy of the upload, not two
    try:
        files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            fields = ", ".join(sorted({k for k, _ in form.multi_items()})) or "none"
            raise ApiError(400, "no_file", f"the form has no file; send {what} as a file field, e.g. "
                                           f"-F {example} (form fields received: {fields})")
        if len(files) > max_files:
            raise ApiError(422, "too_many_files", f"{len(files)} files in one request; the limit is {max_files}")
        out = []
        for i, (key, upload) in enumerate(files):
            name = upload.filename or f"{key}[{i}]"
            data = await upload.read()
            if not data:
                raise ApiError(400, "empty_file", f"{name}: the uploaded file is empty (0 bytes)")
            out.append((name, data))
        return out
    finally:
        await form.close()


# -- the service --------------------------------------------------------------------------------------------


class Budget:
    """A first-come-first-served weighted semaphore: holders together use at most `capacity` units.

    Used twice: request slots (1 unit per request) and decode memory (a decode's estimated bytes). First come,
    first served, so a large image is not overtaken forever by a stream of small ones.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        return bool(self._waiters) or self.used >= self.capacity

    @asynccontextmanager
    async def hold(self, units: int = 1) -> AsyncIterator[None]:
        units = min(max(int(units), 1), self.capacity)
        if self._waiters or self.used + units > self.capacity:
            entry = (units, asyncio.get_running_loop().create_future())
            self._waiters.append(entry)
            try:
                await entry[1]
            except BaseException:
                if entry[1].done() and not entry[1].cancelled():
                    self._release(units)  # granted just as the waiter was cancelled: hand the units on
                else:
                    self._waiters.remove(entry)
                    self._wake()  # a large waiter leaving may let the smaller ones behind it through
                raise
        else:
            self.used += units
        try:
            yield
        finally:
            self._release(units)

    def _release(self, units: int) -> None:
        self.used -= units
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            units, future = self._waiters.popleft()
            if not future.done():
                self.used += units
                future.set_result(None)


def default_recognizer_factory(settings: ServeSettings) -> Callable[[], Any]:
    def make() -> Any:
        from ferkit.inference import Recognizer

        return Recognizer(model=settings.model, weights=settings.weights, detector=settings.detector,
                          device=settings.device, tta=settings.tta, min_face_score=settings.min_face_score)

    return make


class Service:
    """The recognizer, thread pool and batcher behind the routes (one per app)."""

    def __init__(self, settings: ServeSettings, factory: Callable[[], Any]) -> None:
        self.settings = settings
        self.factory = factory
        self.rec: Any = None
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="ferkit-serve")
        self.batcher = MicroBatcher(self._classify, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                                    enabled=settings.batching, executor=None if settings.batching else self.pool)
        self.started = time.time()
        self._load_lock = asyncio.Lock()
        self.load_error: str | None = None
        self.detect_lock: Any = contextlib.nullcontext()
        self.slots = Budget(settings.max_concurrent_requests)
        self.decode_memory = Budget(settings.decode_memory_mb * 1024 * 1024)

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """A slot for one inference request, from reading its body to its answer. Bodies are read only inside a
        slot, so at most `max_concurrent_requests` uploads are in memory; past `max_queued_requests` waiting,
        503 at once (the waiting ones hold no body: uvicorn stops reading a socket whose body is not read)."""
        if self.slots.full and self.slots.waiting >= self.settings.max_queued_requests:
            raise ApiError(503, "busy", f"the server is busy ({self.settings.max_concurrent_requests} requests "
                                        f"running, {self.slots.waiting} waiting); retry shortly",
                           close=True, headers={"Retry-After": "1"})
        async with self.slots.hold():
            yield

    @asynccontextmanager
    async def decoding(self, images: list[tuple[str, bytes]], one_at_a_time: bool) -> AsyncIterator[None]:
        """Decode-memory budget for `images` (all at once, or the largest when they are decoded one by one)."""
        costs = await self.run(lambda: [decode_cost(data, self.settings.max_pixels) for _, data in images])
        budget = self.decode_memory.capacity
        for (name, _), cost in zip(images, costs, strict=True):
            if cost > budget:
                raise ApiError(413, "too_many_pixels", f"{name}: decoding this image would take about "
                               f"{cost / 2**20:,.0f} MB, more than the server's {budget / 2**20:,.0f} MB decode "
                               "budget; send a smaller image")
        async with self.decode_memory.hold(max(costs) if one_at_a_time else sum(costs)):
            yield

    def _classify(self, faces: np.ndarray) -> np.ndarray:
        return self.rec.predict_proba(faces)

    def _load(self) -> None:
        rec = self.factory()
        if self.settings.warmup:
            blank = np.full((96, 96, 3), 128, np.uint8)
            rec.detect_faces(blank, color="rgb")
            rec.predict_proba(np.zeros((1, 48, 48), np.uint8))
        # RetinaFace (a torch module in eval mode) is safe to call from several threads at once; OpenCV's
        # cascade classifier and custom detectors are not known to be, so those detect one image at a time.
        name = getattr(rec.detector, "name", None)
        self.detect_lock = contextlib.nullcontext() if name in ("retinaface", "none") else threading.Lock()
        self.rec = rec

    async def ready(self) -> Any:
        if self.rec is None:
            async with self._load_lock:
                if self.rec is None:
                    try:
                        await asyncio.get_running_loop().run_in_executor(self.pool, self._load)
                        self.load_error = None
                    except Exception as e:
                        self.load_error = f"{type(e).__name__}: {e}"
                        raise ApiError(503, "unavailable", f"the model could not be loaded: {e}") from e
        return self.rec

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def close(self) -> None:
        await self.batcher.aclose()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def model_info(self) -> dict[str, Any]:
        rec = self.rec
        meta = rec.meta
        detector = getattr(rec.detector, "name", type(rec.detector).__name__)
        return {"model": meta.get("model"), "classes": list(rec.classes), "num_classes": len(rec.classes),
                "input_size": rec.input_size, "label_set": meta.get("label_set"),
                "weights": Path(str(rec.weights_path)).name, "detector": detector, "tta": rec.tta,
                "device": str(rec.device)}

    def faces_json(self, probs: np.ndarray) -> list[dict[str, Any]]:
        classes = self.rec.classes
        return [{"emotions": {c: float(p) for c, p in zip(classes, row, strict=True)},
                 "dominant": classes[int(np.argmax(row))]} for row in probs]


ANALYZE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": "the photo (JPEG, PNG, WebP, ...)"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
CLASSIFY_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "face crops, each framed forehead to chin (any size; made 48x48 gray)"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "No file, empty body or malformed request", 408: "The request body did not arrive in time",
            413: "Upload over the size limit, or image over the pixel limit or the decode memory budget",
            422: "Not an image, corrupt image, too many files or faces",
            503: "Model not loaded, or the server is busy (see Retry-After)"}
    return {c: {"description": text[c], "content": {"application/json": {"schema": ERROR_SCHEMA}}} for c in codes}


def create_app(settings: ServeSettings | Callable[[], Any] | None = None,
               recognizer_factory: Callable[[], Any] | None = None, *, recognizer: Any = None) -> FastAPI:
    """The FastAPI app. `settings` (or a recognizer factory in its place) says what to load and the limits;
    `recognizer_factory()` or a ready `recognizer` overrides how the Recognizer is made (tests, custom set-ups).
    The recognizer is loaded at start-up (or on the first request when the app runs without lifespan)."""
    if callable(settings) and not isinstance(settings, ServeSettings):
        settings, recognizer_factory = None, settings
    settings = settings or ServeSettings()
    settings.validate()
    if recognizer is not None:
        def recognizer_factory() -> Any:
            return recognizer
    service = Service(settings, recognizer_factory or default_recognizer_factory(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.ready()
        yield
        await service.close()

    app = _make_fastapi(lifespan)
    app.state.service = service
    _install_error_handlers(app)
    # Added last = runs first: every answer, the Host refusal included, carries the security headers.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts), www_redirect=False)
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=DOCS_PAGES)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/sample.jpg", include_in_schema=False)
    async def sample() -> FileResponse:
        from ferkit.inference.image_io import sample_image_path

        return FileResponse(sample_image_path(), media_type="image/jpeg")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", tags=["service"], summary="Liveness and readiness",
             responses={200: {"description": "Ready"}, **_errors(503)})
    async def healthz() -> JSONResponse:
        ok = service.rec is not None
        body = {"status": "ok" if ok else "unavailable", "model_loaded": ok,
                "uptime_s": round(time.time() - service.started, 3)}
        if service.load_error:
            body["detail"] = service.load_error
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", tags=["service"], summary="The loaded model, limits and batching")
    async def models() -> dict[str, Any]:
        await service.ready()
        return {**service.model_info(), "api_version": API_VERSION, "limits": settings.limits(),
                "batching": service.batcher.config(), "batch_stats": service.batcher.stats.to_json()}

    @app.post("/v1/analyze", tags=["inference"], summary="Find the faces in a photo and read their emotions",
              openapi_extra={"requestBody": ANALYZE_BODY}, responses=_errors(400, 408, 413, 422, 503))
    async def analyze(request: Request) -> dict[str, Any]:
        """One photo, as a multipart file field (`-F file=@photo.jpg`) or as the raw body
        (`--data-binary @photo.jpg`). Returns `faces` (left to right), each with `box` [x, y, w, h] in the
        photo's pixels (after EXIF rotation), `emotions` (probability per class), `dominant` and `face_score`
        (detector confidence), plus `image` (size), `timing_ms` and `batch` (how the crops were batched)."""
        t0 = time.perf_counter()
        rec = await service.ready()
        async with service.admit():
            return await analyze_admitted(request, rec, t0)

    async def analyze_admitted(request: Request, rec: Any, t0: float) -> dict[str, Any]:
        [(name, data)] = await read_images(request, settings, max_files=1, what="one photo")
        t_read = time.perf_counter()

        def decode_and_detect() -> tuple[tuple[int, int], list, np.ndarray, float]:
            from ferkit.inference import ImageError

            rgb = decode_image(data, name, settings.max_pixels)
            t = time.perf_counter()
            try:
                with service.detect_lock:
                    _, dets, faces = rec.detect_faces(rgb, color="rgb")
            except ImageError as e:
                raise ApiError(422, "invalid_image", f"{name}: {e.reason}") from None
            return rgb.shape[:2], dets, faces, t

        async with service.decoding([(name, data)], one_at_a_time=True):
            (height, width), dets, faces, t_decoded = await service.run(decode_and_detect)
        t_detected = time.perf_counter()
        if len(dets) > settings.max_faces:
            raise ApiError(422, "too_many_faces", f"{name}: {len(dets)} faces found; the limit is "
                                                  f"{settings.max_faces} per photo")
        batch = None
        probs = np.zeros((0, len(rec.classes)), np.float32)
        if len(faces):
            probs, info = await service.batcher.submit(faces)
            batch = info.to_json()
        t_done = time.perf_counter()
        out = []
        for det, face in zip(dets, service.faces_json(probs), strict=True):
            out.append({"box": [int(v) for v in det.box], "emotions": face["emotions"], "dominant": face["dominant"],
                        "face_score": float(det.score)})
        return {"faces": out, "count": len(out), "image": {"name": name, "width": int(width), "height": int(height)},
                "model": rec.meta.get("model"), "classes": list(rec.classes),
                "timing_ms": _timing(read=t_read - t0, decode=t_decoded - t_read, detect=t_detected - t_decoded,
                                     classify=t_done - t_detected, total=t_done - t0),
                "batch": batch}

    @app.post("/v1/classify", tags=["inference"], summary="Read the emotions of already-cropped faces",
              openapi_extra={"requestBody": CLASSIFY_BODY}, responses=_errors(400, 408, 413, 422, 503))
    async def classify(request: Request) -> dict[str, Any]:
        """Face crops (no detection), as one or more multipart file fields (`-F files=@a.png -F files=@b.png`)
        or one crop as the raw body. Each crop is made gray and resized to the model's 48x48, so frame it like
        FER2013 (forehead to chin, cheek to cheek). Returns `faces` in upload order, each with `name`,
        `emotions` and `dominant`."""
        t0 = time.perf_counter()
        rec = await service.ready()
        async with service.admit():
            return await classify_admitted(request, rec, t0)

    async def classify_admitted(request: Request, rec: Any, t0: float) -> dict[str, Any]:
        from ferkit.inference.faces import to_face_array

        files = await read_images(request, settings, max_files=settings.max_files, what="face crops",
                                  example="files=@face.png")
        t_read = time.perf_counter()

        def decode_all() -> np.ndarray:
            return np.stack([to_face_array(decode_image(data, name, settings.max_pixels)) for name, data in files])

        async with service.decoding(files, one_at_a_time=True):  # each crop is shrunk to 48x48 before the next
            faces = await service.run(decode_all)
        t_decoded = time.perf_counter()
        probs, info = await service.batcher.submit(faces)
        t_done = time.perf_counter()
        out = [{"name": name, **face} for (name, _), face in zip(files, service.faces_json(probs), strict=True)]
        return {"faces": out, "count": len(out), "model": rec.meta.get("model"), "classes": list(rec.classes),
                "timing_ms": _timing(read=t_read - t0, decode=t_decoded - t_read, classify=t_done - t_decoded,
                                     total=t_done - t0),
                "batch": info.to_json()}

    return app


def _timing(**seconds: float) -> dict[str, float]:
    return {k: round(v * 1000, 3) for k, v in seconds.items()}


def _make_fastapi(lifespan: Any) -> FastAPI:
    """FastAPI with /docs and /redoc served from bundled files (fastapi-offline), never from a CDN."""
    kwargs = dict(title="ferkit", version=_version(), lifespan=lifespan,
                  description="Facial emotion recognition: find faces in photos and read their 7 FER2013 emotions. "
                              "Errors are JSON `{\"error\": code, \"detail\": message}`.")
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:  # pragma: no cover - the serve extra installs it; without it, no docs pages
        return FastAPI(docs_url=None, redoc_url=None, **kwargs)
    return FastAPIOffline(docs_url=DOCS_URL, redoc_url=REDOC_URL, **kwargs)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ferkit")
    except Exception:  # pragma: no cover
        return "0"


HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
              413: "upload_too_large", 415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}


# The page and the API load nothing from elsewhere and are never framed. Blob and data URLs are the page's photo,
# face crops and webcam snapshot.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
# Swagger UI and ReDoc (bundled by fastapi-offline) start from an inline script, style themselves inline and
# ReDoc runs a blob: worker; still nothing from another origin.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"}


class SecurityHeadersMiddleware:
    """Adds Content-Security-Policy, X-Frame-Options, X-Content-Type-Options, Referrer-Policy to every answer."""

    def __init__(self, app: ASGIApp, docs_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.docs_paths = set(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = DOCS_CSP if scope["path"] in self.docs_paths else PAGE_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in {"Content-Security-Policy": csp, **SECURITY_HEADERS}.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


log = logging.getLogger("ferkit.serving")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail, exc.headers or None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client closed the connection mid-upload: nothing to answer and nothing wrong with the server.
        log.info("%s %s: the client disconnected before sending the whole body", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"error": code, "detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server failed on this request")


__all__ = ["ApiError", "ServeSettings", "create_app", "decode_image"]
