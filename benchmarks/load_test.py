"""Load test for `ferkit serve`: N concurrent clients post real face photos (or face crops) for T seconds.

Starts the server as a subprocess on 127.0.0.1 (a free port; loopback only), once with micro-batching on and
once with it off, and reports for each: requests/s, latency p50 / p95 / p99, error count, and the mean number
of face crops per model call. Everything is bounded: the run time, a cap on requests, per-request timeouts,
and the server is stopped at the end.

    python benchmarks/load_test.py                                   # 8 clients, 10 s, analyze + classify
    python benchmarks/load_test.py --clients 32 --duration 30 --endpoint classify --json results/load.json
    python benchmarks/load_test.py --clients 4 --duration 3          # a quick check
    python benchmarks/load_test.py --payload big-png --clients 16 --duration 10 --endpoint analyze --batching on

Payloads: --endpoint analyze posts whole photos (the bundled astronaut photo, mirrored and rescaled copies of
it, plus any --images); --endpoint classify posts --crops-per-request face crops cut from them. --payload big-png
posts a 5000x5000 PNG (25 megapixels, the default pixel limit) and --payload 10mb a noise PNG just under the 10 MB
upload limit instead of the photos (memory under the largest accepted requests). The server's resident memory
(RSS, from /proc) is sampled throughout: the report gives it at the start and at its peak. Without the
shipped weights (or --weights) an untrained model of the same architecture is used: the speed is the same,
the predictions are meaningless. Needs the serve + dev extras (fastapi, uvicorn, httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # never anything else: this script only ever talks to its own server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def weights_path(given: str | None, tmp: Path) -> tuple[str, str]:
    """(weights file, description): --weights, else the shipped model, else untrained ferkit_vgg_s weights."""
    from ferkit.models.weights import default_weights_path

    if given:
        return given, given
    if default_weights_path().is_file():
        return str(default_weights_path()), "shipped default model"
    from ferkit.data.labels import FER2013_NAMES
    from ferkit.models.registry import create_model
    from ferkit.models.weights import save_weights

    path = tmp / "untrained_vgg_s.safetensors"
    meta = {"model": "ferkit_vgg_s", "num_classes": 7, "classes": list(FER2013_NAMES), "label_set": "fer7",
            "input_size": 48, "normalize": "dataset", "model_kwargs": {}}
    save_weights(create_model("ferkit_vgg_s"), path, meta)
    return str(path), "untrained ferkit_vgg_s (shipped weights not installed; same speed)"


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def payloads(extra: list[str], crops_per_request: int) -> tuple[list[bytes], list[list[bytes]]]:
    """Photos for /v1/analyze and lists of face crops for /v1/classify, all from real face photos."""
    from PIL import Image, ImageOps

    from ferkit.inference import get_detector, load_image
    from ferkit.inference.image_io import sample_image_path

    sources = [Image.open(p).convert("RGB") for p in [sample_image_path(), *extra]]
    photos = []
    for im in sources:
        photos += [im, ImageOps.mirror(im), im.resize((im.width * 3 // 4, im.height * 3 // 4)),
                   im.resize((im.width * 5 // 4, im.height * 5 // 4))]
    detector = get_detector("retinaface")
    faces = []
    for im in photos:
        for det in detector.detect(load_image(im)):
            x, y, w, h = det.box
            side = int(max(w, h) * 1.1)
            cx, cy = x + w // 2, y + h // 2
            faces.append(im.crop((cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)))
    if not faces:
        raise SystemExit("no face found in the photos")
    crop_bytes = [jpeg(f) for f in faces] + [jpeg(ImageOps.mirror(f)) for f in faces]
    groups = [[crop_bytes[(i + k) % len(crop_bytes)] for k in range(crops_per_request)]
              for i in range(len(crop_bytes))]
    return [jpeg(p) for p in photos], groups


def large_payload(kind: str) -> bytes:
    """The largest requests the default limits accept: a 5000x5000 PNG (25 megapixels: a smooth gradient, so it
    stays far under 10 MB) or a noise PNG of about 9.5 MB (1780x1780: every byte of the upload limit used)."""
    from PIL import Image

    if kind == "big-png":
        ramp = np.linspace(0, 255, 5000, dtype=np.float32)
        rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
                        np.broadcast_to(ramp, (5000, 5000))], axis=-1).astype(np.uint8)
    else:
        rgb = np.random.default_rng(0).integers(0, 256, (1780, 1780, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """`ferkit serve` in a subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, weights: str, batching: bool, args: argparse.Namespace) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "ferkit", "serve", "--host", HOST, "--port", str(self.port),
               "--weights", weights, "--device", args.device, "--detector", args.detector,
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--workers", str(args.workers), "--log-level", "warning"]
        if args.server_threads:
            cmd += ["--threads", str(args.server_threads)]
        if not batching:
            cmd.append("--no-batching")
        self.cmd = cmd + shlex.split(args.server_args)
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit("the server did not become ready within 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


class RssSampler:
    """The resident memory of process `pid` (Linux /proc), sampled every 20 ms in a thread: start and peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_mb = self.peak_mb = self.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def run_clients(url: str, endpoint: str, bodies: list, clients: int, duration: float, warmup: float,
                      max_requests: int, timeout: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def post(i: int) -> httpx.Response:
            body = bodies[i % len(bodies)]
            if endpoint == "analyze":
                return await http.post("/v1/analyze", files={"file": ("photo.jpg", body, "image/jpeg")})
            return await http.post("/v1/classify",
                                   files=[("files", (f"face{k}.jpg", b, "image/jpeg")) for k, b in enumerate(body)])

        # warm-up (not measured): every client once, then until `warmup` seconds have passed
        end_warm = time.perf_counter() + warmup
        while True:
            await asyncio.gather(*(post(i) for i in range(clients)))
            if time.perf_counter() >= end_warm:
                break
        before = (await http.get("/v1/models")).json()["batch_stats"]

        start = time.perf_counter()
        stop = start + duration

        async def client(cid: int) -> None:
            nonlocal sent
            i = cid
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await post(i)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        key = f"http_{r.status_code}"
                        errors[key] = errors.get(key, 0) + 1
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
        after = (await http.get("/v1/models")).json()["batch_stats"]
    batches = after["batches"] - before["batches"]
    items = after["items"] - before["items"]
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
            "seconds": round(elapsed, 3), "rps": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "mean_ms": round(float(lat.mean()), 1),
            "model_calls": batches, "crops_per_call": round(items / batches, 2) if batches else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up seconds per run (default 1)")
    p.add_argument("--endpoint", choices=["analyze", "classify", "both"], default="both")
    p.add_argument("--batching", choices=["on", "off", "both"], default="both")
    p.add_argument("--crops-per-request", type=int, default=1, help="face crops per /v1/classify request")
    p.add_argument("--images", nargs="*", default=[], help="more face photos to post (default: the sample)")
    p.add_argument("--weights", help="weights file (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--detector", default="retinaface")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=4, help="server threads for decoding + detection")
    p.add_argument("--server-threads", type=int, default=0, help="torch threads in the server (0: torch's choice)")
    p.add_argument("--max-requests", type=int, default=200_000, help="hard cap on requests per run")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    p.add_argument("--payload", choices=["photos", "big-png", "10mb"], default="photos",
                   help="photos (default): face photos / crops; big-png: a 5000x5000 PNG; 10mb: a ~9.5 MB noise PNG")
    p.add_argument("--server-args", default="", help="more `ferkit serve` options, e.g. '--max-concurrent-requests 4'")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.crops_per_request < 1:
        p.error("--clients, --duration and --crops-per-request must be positive")

    endpoints = ["analyze", "classify"] if args.endpoint == "both" else [args.endpoint]
    modes = [True, False] if args.batching == "both" else [args.batching == "on"]
    with tempfile.TemporaryDirectory() as tmp:
        weights, described = weights_path(args.weights, Path(tmp))
        photos, crop_groups = payloads(args.images, args.crops_per_request)
        if args.payload != "photos":
            photos, crop_groups = [large_payload(args.payload)], [[large_payload(args.payload)]]
        print(f"model: {described}; {len(photos)} photos, {len(crop_groups)} crop sets of "
              f"{args.crops_per_request}; {args.clients} clients x {args.duration:g} s per run; "
              f"max_batch={args.max_batch}, max_wait_ms={args.max_wait_ms:g}; {os.cpu_count()} CPUs", flush=True)
        rows = []
        for batching in modes:
            with Server(weights, batching, args) as server:
                for endpoint in endpoints:
                    bodies = photos if endpoint == "analyze" else crop_groups
                    with RssSampler(server.proc.pid) as rss:
                        result = asyncio.run(run_clients(server.url, endpoint, bodies, args.clients, args.duration,
                                                         args.warmup, args.max_requests, args.timeout))
                    rows.append({"endpoint": endpoint, "batching": "on" if batching else "off", **result,
                                 "rss_start_mb": round(rss.start_mb, 1), "rss_peak_mb": round(rss.peak_mb, 1)})
                    r = rows[-1]
                    print(f"  {endpoint:8s} batching {r['batching']:3s}: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f}"
                          f"  p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms"
                          f"  errors {r['errors']} {r['error_kinds'] or ''}  crops/model call {r['crops_per_call']}"
                          f"  RSS {r['rss_start_mb']:.0f} -> peak "
                          f"{r['rss_peak_mb']:.0f} MB", flush=True)

    print("\n| endpoint | batching | clients | req/s | p50 ms | p95 ms | p99 ms | errors | crops per model call "
          "| RSS start / peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['endpoint']} | {r['batching']} | {args.clients} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['crops_per_call']} | "
              f"{r['rss_start_mb']:.0f} / {r['rss_peak_mb']:.0f} |")
    if args.json_out:
        import torch

        from ferkit.training.report import git_commit

        info = {"clients": args.clients, "duration_s": args.duration, "crops_per_request": args.crops_per_request,
                "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "workers": args.workers,
                "model": described, "cpus": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "machine": platform.machine(), "git_commit": git_commit()}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"settings": info, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
