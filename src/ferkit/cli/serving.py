"""`ferkit export`, `ferkit serve`: the model outside this process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ferkit.cli._app import BACKEND_HELP, PRIOR_HELP, THREADS_HELP, TTA_HELP, WEIGHTS_HELP, _fail, app, literal
from ferkit.cli.inference import _recognizer, check_threads_option
from ferkit.models.weights import SHIPPED_MODELS

EXPORT_EPILOG = """
Examples:

  ferkit export --format onnx                                   (shipped model -> ferkit.onnx)

  ferkit export --format onnx --weights runs/x/best.safetensors --out vgg_s.onnx

  ferkit export --format onnx --weights ensemble.safetensors --out ensemble.onnx

The ONNX graph is the classifier: input "input" float32 (B, 1, S, S) preprocessed faces (dynamic
batch), output "probabilities" (B, C). The file's metadata_props hold ferkit's metadata (classes,
input_size, normalize, ...). Needs `pip install 'ferkit[onnx]'`. After writing, the file is checked
against PyTorch on random faces and the largest probability difference is printed.
"""


@app.command(epilog=literal(EXPORT_EPILOG))
def export(
    fmt: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    weights: Annotated[Path | None, typer.Option(
        help=WEIGHTS_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: <weights name>.onnx here).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
    exporter: Annotated[str, typer.Option(
        help="auto (dynamo when onnxscript is installed, else legacy) | dynamo | legacy.")] = "auto",
    check: Annotated[bool, typer.Option(help="Compare with PyTorch on random faces after exporting.")] = True,
) -> None:
    """Export a model or a saved ensemble for other runtimes (ONNX), with its metadata inside."""
    from ferkit.export import EXPORTERS, check_parity, export_onnx, onnx_available
    from ferkit.models.weights import load_model, resolve_weights

    if fmt.lower() != "onnx":
        _fail(f"unknown --format {fmt!r}; supported: onnx")
    if exporter not in EXPORTERS:
        _fail(f"unknown --exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not onnx_available():
        _fail("ONNX export needs the onnx and onnxruntime packages: pip install 'ferkit[onnx]'")
    path = resolve_weights(weights)
    if not path.is_file():
        _fail(f"weights file {str(path)!r} not found" if weights is not None else
              f"no --weights given and the shipped default weights {path} do not exist yet; pass --weights")
    target = out if out is not None else Path((path.stem if weights is not None else "ferkit") + ".onnx")
    try:
        model, meta = load_model(path, "cpu")
    except Exception as e:  # corrupt or foreign file: safetensors raises its own error type
        _fail(f"cannot load weights {str(path)!r}: {e}")
    try:
        written = export_onnx(path, target, opset=opset, exporter=exporter)
    except (ValueError, ImportError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write output: {e}")
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB): {meta.get('model')}, "
               f"{len(meta.get('classes') or [])} classes, input (B, 1, {meta.get('input_size', 48)}, "
               f"{meta.get('input_size', 48)}), normalize={meta.get('normalize', 'dataset')}")
    if check:
        diff = check_parity(model, written, int(meta.get("input_size", 48)))
        typer.echo(f"ONNX Runtime vs PyTorch fp32 on 16 random faces: max |probability difference| = {diff:.2e}")
        if diff > 1e-4:
            _fail(f"the export differs from PyTorch by {diff:.2e} (> 1e-4)", code=1)


SERVE_EPILOG = """
Examples:

  ferkit serve                                     (http://127.0.0.1:8000: web page at /, API docs at /docs)

  ferkit serve --port 9000 --weights runs/ferkit_vgg_s-20261123-101500/best.safetensors

  ferkit serve --max-batch 64 --max-wait-ms 10     (bigger batches under heavy load)

  ferkit serve --no-batching                       (classify each request on its own)

  curl -F file=@photo.jpg http://127.0.0.1:8000/v1/analyze

  curl --data-binary @photo.jpg http://127.0.0.1:8000/v1/analyze

  curl -F files=@face1.png -F files=@face2.png http://127.0.0.1:8000/v1/classify

Needs fastapi and uvicorn: the "serve" extra of ferkit. Binds to 127.0.0.1 (this machine only) unless
--host says otherwise; put a TLS proxy in front before exposing it, and name the host names clients use
with --allowed-hosts (other Host headers get 400). Concurrent requests' face crops
are micro-batched: a crop waits at most --max-wait-ms for others, and one model call takes at most
--max-batch crops. Bad requests get a 4xx JSON answer {"error", "detail"}. See docs/serving.md.
"""


@app.command(epilog=SERVE_EPILOG)
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model: Annotated[str, typer.Option(
        help=f"A shipped model ({' | '.join(SHIPPED_MODELS)}), a .safetensors or exported .onnx file, or a "
             "registry name with --weights.")] = "default",
    weights: Annotated[Path | None, typer.Option(
        help=WEIGHTS_HELP)] = None,
    detector: Annotated[str, typer.Option(help="Face detector: retinaface | haar | none.")] = "retinaface",
    tta: Annotated[str, typer.Option(help=TTA_HELP)] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    min_face_score: Annotated[float, typer.Option(help="Ignore faces the detector is less sure of.")] = 0.0,
    max_batch: Annotated[int, typer.Option(help="Most face crops in one model call.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a crop may wait for others to batch with.")] = 5.0,
    no_batching: Annotated[bool, typer.Option("--no-batching", help="Classify each request on its own.")] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MB (more: 413).")] = 10.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image in pixels (more: 413).")] = 25_000_000,
    max_faces: Annotated[int, typer.Option(help="Most faces in one analysed photo (more: 422).")] = 100,
    max_files: Annotated[int, typer.Option(help="Most face crops in one /v1/classify request.")] = 64,
    workers: Annotated[int, typer.Option(help="Threads for decoding and face detection.")] = 4,
    max_concurrent_requests: Annotated[int, typer.Option(
        help="Analyze/classify requests read and worked on at once; the rest wait.")] = 8,
    max_queued_requests: Annotated[int, typer.Option(
        help="Requests waiting for a slot; more get 503 with Retry-After.")] = 64,
    decode_memory_mb: Annotated[int, typer.Option(
        help="Memory all image decodes in flight may use together (estimated from each image's header; an "
             "image that alone needs more: 413).")] = 800,
    max_connections: Annotated[int, typer.Option(
        help="Open connections + running requests; past it uvicorn answers 503.")] = 128,
    header_timeout: Annotated[float, typer.Option(
        help="Seconds for a request's headers to arrive before the connection is closed.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        help="Seconds for a request body to arrive once its turn came (more: 408).")] = 30.0,
    keep_alive_timeout: Annotated[int, typer.Option(help="Seconds an idle kept-alive connection stays open.")] = 5,
    allowed_hosts: Annotated[str | None, typer.Option(
        help="Comma-separated Host header values to answer (DNS-rebinding guard), e.g. 'fer.example.org,"
             "10.0.0.5'; '*' answers any (default: localhost, 127.0.0.1, ::1 and --host).")] = None,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, show_default=False)] = None,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level: critical | error | warning | info | debug.")
                         ] = "info",
    prior: Annotated[str, typer.Option(help=PRIOR_HELP)] = "none",
) -> None:
    """Serve the recognizer over HTTP: a JSON API (/v1/analyze, /v1/classify) and a web page at /."""
    try:
        import uvicorn

        from ferkit.serving import ServeSettings, create_app
    except ImportError as e:
        _fail(f"the serving dependencies are not installed ({e.name}): pip install \"ferkit[serve]\"")
    from ferkit.serving.server import release_large_frees, uvicorn_options

    settings = ServeSettings(model=model, weights=str(weights) if weights else None, detector=detector, device=device,
                             tta=tta, min_face_score=min_face_score, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                             max_pixels=max_pixels, max_faces=max_faces, max_files=max_files,
                             batching=not no_batching, max_batch=max_batch, max_wait_ms=max_wait_ms, workers=workers,
                             max_concurrent_requests=max_concurrent_requests, max_queued_requests=max_queued_requests,
                             decode_memory_mb=decode_memory_mb, max_connections=max_connections,
                             header_timeout=header_timeout, body_timeout=body_timeout,
                             keep_alive_timeout=keep_alive_timeout, allowed_hosts=_allowed_hosts(allowed_hosts, host))
    try:
        settings.validate()
    except ValueError as e:
        _fail(str(e))
    check_threads_option(threads)
    from ferkit.models.weights import SHIPPED_MODELS

    if model in SHIPPED_MODELS or model.endswith((".safetensors", ".onnx")) or Path(model).is_file():
        if model != "default" and weights is not None:
            _fail("give the weights file either as --model PATH or as --weights PATH, not both")
        rec = _recognizer(weights if model == "default" else Path(model), detector, tta, device, min_face_score,
                          backend, threads, prior)
    else:
        from ferkit.inference import Recognizer

        try:
            rec = Recognizer(model=model, weights=weights, detector=detector, device=device, tta=tta,
                             min_face_score=min_face_score, backend=backend, threads=threads, prior=prior)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            _fail(str(e))
    typer.echo(f"ferkit serve: {rec!r}; web page and API on http://{host}:{port}/ (API docs at /docs)", err=True)
    release_large_frees()  # freed image memory goes back to the OS: the memory bound in docs/serving.md holds
    uvicorn.run(create_app(settings, recognizer=rec), host=host, port=port, log_level=log_level,
                **uvicorn_options(settings))


def _allowed_hosts(given: str | None, bound: str) -> tuple[str, ...]:
    """--allowed-hosts as Host header values (IPv6 literals in brackets, as browsers send them); by default
    this machine's loopback names plus the address the server binds to, unless that is a wildcard."""
    from ferkit.serving import ServeSettings

    if given is not None:
        hosts = [h.strip() for h in given.split(",") if h.strip()]
    else:
        hosts = [*ServeSettings.allowed_hosts, *([bound] if bound not in ("0.0.0.0", "::", "") else [])]
    return tuple(dict.fromkeys(f"[{h}]" if ":" in h and not h.startswith("[") else h.lower() for h in hosts))
