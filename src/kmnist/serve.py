"""The HTTP service: POST /predict for image uploads, a drawing page at /, health and OpenAPI docs.

Every bad request gets a 4xx JSON answer {"detail": message, "code": kind}; nothing a client sends
can produce a 500. Request bodies are read with a byte limit and images are refused by their header
before decoding, so neither large uploads nor decompression bombs reach memory.
"""

from __future__ import annotations

import functools
import io
import logging
import random
import re
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kmnist import __version__
from kmnist.errors import ImageError, KmnistError
from kmnist.imageprep import Limits, prepare_bytes
from kmnist.predict import Classifier

IMAGE_FIELD = "file"  # the multipart form field holding the upload
RAW_TYPES = ("image/", "application/octet-stream")  # a bare image as the request body
STATUS_FOR_IMAGE_ERROR = {"empty": 400, "too_large": 413, "too_many_pixels": 413, "not_an_image": 415,
                          "blank_image": 422}
# The page loads nothing from elsewhere; the browser is told so, which also blocks injected content.
PAGE_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'")


@dataclass(frozen=True)
class ServeOptions:
    data_dir: Path | None = None  # where the dataset's test split may be found, for "random test image"
    check_md5: bool = True
    top_k: int = 5  # classes per answer when a request does not ask
    # Tighter than predict's limits for local files (20 MB, 50 MP): uploads come from anyone who can reach
    # the port, several at once, and a drawing or photo of one character needs far less.
    max_upload_bytes: int = 5 * 2**20  # request body limit
    max_pixels: int = 16_000_000  # width * height, checked before decoding


class ApiError(Exception):
    """A request the service refuses: answered as {"detail", "code"} with a 4xx status."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def load_examples(dataset: str, options: ServeOptions) -> tuple[Any, str]:
    """The test split for the random-image button, or None and why it is unavailable."""
    if options.data_dir is None:
        return None, "no data folder given"
    from kmnist.data import load_dataset

    try:
        return load_dataset(dataset, options.data_dir, check_md5=options.check_md5, download=False,
                            progress=False, test_only=True).test, ""
    except KmnistError as error:
        return None, str(error)


async def read_upload(request: Request, limit: int) -> bytes:
    """The image bytes of a multipart upload (field "file") or of a raw image/* body, at most `limit` bytes."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media_type == "multipart/form-data"
    if not multipart and not media_type.startswith(RAW_TYPES):
        raise ApiError(415, "unsupported_content_type",
                       f"content type {media_type or '(none)'} not accepted; send multipart/form-data with a "
                       f"'{IMAGE_FIELD}' field, or the image itself as image/*")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body of {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # a body without Content-Length (chunked) is cut off here
            raise ApiError(413, "too_large", f"request body over the limit of {limit} bytes")
    if not body:
        raise ApiError(400, "empty", "empty request body")
    if not multipart:
        return bytes(body)

    boundary = re.search(r'boundary="?([^";]+)"?', request.headers.get("content-type", ""))
    if boundary and f"--{boundary.group(1)}--".encode() not in body:  # a parser takes what it has: a part cut short
        raise ApiError(400, "bad_request", "malformed multipart body: no closing boundary (cut short?)")

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=16)  # malformed: 400 from Starlette
    try:
        upload = form.get(IMAGE_FIELD)
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_file", f"multipart body has no file field '{IMAGE_FIELD}'")
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise ApiError(400, "empty", "the uploaded file is empty")
    return data


@functools.cache
def class_font(characters: str) -> bytes | None:
    """IPAexGothic (shipped by matplotlib-fontja) cut down to `characters`, so the page shows kana on
    machines without a Japanese font; a few kilobytes instead of six megabytes. None if unavailable."""
    try:
        import matplotlib_fontja
        from fontTools import subset
    except ImportError:
        return None
    path = Path(matplotlib_fontja.__file__).parent / "fonts" / "ipaexg.ttf"
    if not path.is_file():
        return None
    options = subset.Options()
    font = subset.load_font(str(path), options)
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=characters)
    subsetter.subset(font)
    buffer = io.BytesIO()
    subset.save_font(font, buffer, options)
    return buffer.getvalue()


def create_app(checkpoint: str | Path, options: ServeOptions = ServeOptions()) -> FastAPI:
    """The FastAPI application serving one checkpoint (tests drive it without a socket)."""
    # A malformed multipart body is answered 400 (below); python-multipart's own log line about it is noise.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    classifier = Classifier.from_file(checkpoint)
    limits = Limits(max_bytes=options.max_upload_bytes, max_pixels=options.max_pixels)
    examples, examples_reason = load_examples(classifier.dataset, options)
    page = resources.files("kmnist").joinpath("static/index.html").read_text(encoding="utf-8")
    picker = random.Random()
    if not 1 <= options.top_k <= classifier.num_classes:
        raise KmnistError(f"--top-k must be between 1 and {classifier.num_classes}, got {options.top_k}")

    app = FastAPIOffline(title="kmnist", version=__version__,
                         description=f"Classify single handwritten characters with a {classifier.model_name} "
                                     f"trained on {classifier.dataset}.")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.code, error.detail)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _error(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'][1:])}: {e['msg']}" for e in error.errors())
        return _error(422, "invalid_parameter", problems)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:  # a bug, never the client's input
        return _error(500, "internal_error", "internal error")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/font/classes.ttf", include_in_schema=False)
    async def font() -> Response:
        data = await run_in_threadpool(class_font, "".join(sorted(set("".join(classifier.class_names)))))
        if data is None:
            raise ApiError(404, "not_found", "no font available")
        return Response(data, media_type="font/ttf", headers={"Cache-Control": "max-age=86400"})

    @app.get("/health", summary="Liveness: the model is loaded")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": classifier.model_name, "dataset": classifier.dataset,
                "num_classes": classifier.num_classes}

    @app.get("/info", summary="Classes, limits and whether random test images are available")
    async def info() -> dict[str, Any]:
        return {
            "model": classifier.model_name, "dataset": classifier.dataset, "top_k": options.top_k,
            "classes": [{"class_index": i, "character": c, "codepoint": f"U+{ord(c[0]):04X}"}
                        for i, c in enumerate(classifier.class_names)],
            "examples": examples is not None, "examples_reason": examples_reason,
            "max_upload_bytes": options.max_upload_bytes, "max_pixels": options.max_pixels,
        }

    def classify(data: bytes, top_k: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        image = prepare_bytes(data, limits)
        return image, classifier.top_k(classifier.probabilities(image[None])[0], top_k)

    upload_schema = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": [IMAGE_FIELD], "properties": {
                    IMAGE_FIELD: {"type": "string", "format": "binary"}}}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    }
    error_responses = {status: {"description": description} for status, description in (
        (400, "empty body, missing file field or malformed multipart"), (413, "body or image over the limits"),
        (415, "wrong content type, or not an image"), (422, "blank image or invalid parameter"))}

    @app.post("/predict", summary="Top classes for one image of a character", openapi_extra=upload_schema,
              responses=error_responses)
    async def predict(request: Request,
                      top_k: int | None = Query(None, ge=1, le=classifier.num_classes,
                                                description=f"classes to return (default {options.top_k})"),
                      include_input: bool = Query(False, description="also return the 28x28 image the model saw")
                      ) -> dict[str, Any]:
        """Send an image (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM) of one character, any size, either as
        multipart/form-data field `file` or as the raw body with an image/* content type. It is converted
        to KMNIST style (see docs/serving.md) and classified."""
        data = await read_upload(request, options.max_upload_bytes)
        try:
            image, top = await run_in_threadpool(classify, data, top_k or options.top_k)
        except ImageError as error:
            raise ApiError(STATUS_FOR_IMAGE_ERROR.get(error.kind, 400), error.kind, str(error)) from None
        answer: dict[str, Any] = {"top": top, "model": classifier.model_name, "dataset": classifier.dataset}
        if include_input:
            answer["input"] = image.tolist()
        return answer

    @app.get("/examples/random", summary="A random image from the test split (for the drawing page)",
             responses={404: {"description": "no test split available"}})
    async def random_example() -> dict[str, Any]:
        if examples is None:
            raise ApiError(404, "no_examples", f"no test images available: {examples_reason}")
        index = picker.randrange(len(examples))
        label = int(examples.labels[index])
        return {"index": index, "class_index": label, "character": classifier.class_names[label],
                "pixels": examples.images[index].tolist()}

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket, so a busy port is a one-line error and port 0 can be reported.

    It listens before uvicorn starts, so the address printed is connectable at once: a connection made
    while the server is still starting waits in the backlog instead of being refused.
    """
    if not 0 <= port <= 65535:  # getaddrinfo would take 99999 as 99999 - 65536 and listen there
        raise KmnistError(f"port must be between 0 and 65535 (0 picks a free one), got {port}")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, protocol)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError as error:  # address in use or not available, unknown host name
        raise KmnistError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def run_server(checkpoint: str | Path, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
               threads: int = 1, access_log: bool = False, colors: bool | None = None) -> int:
    """Serve until interrupted (uvicorn); returns an exit status. colors: of the log lines (None: where the
    output is a terminal)."""
    import sys

    import torch
    import uvicorn

    if threads < 1:
        raise KmnistError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)  # parallelism comes from concurrent requests, not from one tiny forward pass
    app = create_app(checkpoint, options)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"kmnist serve: warning: listening on {host}; the service has no authentication", file=sys.stderr)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"kmnist serve: http://{shown}:{bound_port}/ (drawing page; API docs at /docs; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, access_log=access_log, log_level="info" if access_log else "warning",
                            use_colors=colors)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
