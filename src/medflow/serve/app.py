"""`medflow serve`: FastAPI app with a JSON API (/predict, /health, /model) and a plain HTML page."""

from __future__ import annotations

import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medflow.config import DataConfig, IngestConfig
from medflow.data.images import BadImage
from medflow.serve.predictor import Predictor

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
NOTICE = "Decision support only: this tool supports, and does not replace, a clinician's judgement."
# BadImage reason -> HTTP status (everything else a client sends that cannot be used: 422).
REASON_STATUS = {"not_an_image": 415, "unsupported_channels": 415, "multi_frame": 415, "unsupported_bit_depth": 415,
                 "decompression_bomb": 413, "too_large": 413}
# reason -> what the person who sent the file can do about it (the "hint" of every error body; "detail" stays technical)
_REEXPORT = "Copy or export the image again from the microscope or imaging software, then upload that file."
_TOO_MANY_PIXELS = ("The image has too many pixels to analyse. Crop it to the cell or region of interest, or scale it "
                    "down, and upload it again.")
_SEND_ONE_FILE = "Send one image as the multipart form field 'file', e.g. `curl -F file=@cell.png http://HOST:PORT/predict`."
HINTS = {
    "empty_file": "The file is empty (0 bytes): it may not have finished copying or downloading. "
                  "Choose the file again from where it was saved.",
    "not_an_image": "This file is not an image this service can read. Choose a PNG, JPEG, BMP, TIFF or DICOM image "
                    "(a renamed document, PDF or text file will not work).",
    "corrupt": f"The image file is damaged. {_REEXPORT}",
    "truncated": f"The image file is incomplete (cut off before its end). {_REEXPORT}",
    "unreadable": f"The image could not be read. {_REEXPORT}",
    "unsupported_bit_depth": "This kind of image is not supported (see the details). Export it as an ordinary 8-bit "
                             "colour or greyscale PNG or JPEG and upload that.",
    "unsupported_channels": "This kind of image is not supported (see the details). Export it as an ordinary colour "
                            "or greyscale PNG or JPEG and upload that.",
    "multi_frame": "The file holds several images (frames). Upload one image per file.",
    "no_pixel_data": "The DICOM file holds no image, only its description. Export the image itself.",
    "not_dicom": "Upload a PNG, JPEG, BMP, TIFF or DICOM image.",
    "too_small": "The image is too small to analyse. Upload the original image, not a thumbnail.",
    "too_large": _TOO_MANY_PIXELS,
    "decompression_bomb": _TOO_MANY_PIXELS,
    "invalid_request": _SEND_ONE_FILE,
    "bad_request": _SEND_ONE_FILE,
    "internal_error": "The server failed while handling the request. Try again; if it keeps happening, tell whoever "
                      "runs this service (the server log has the details).",
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Rejected(HTTPException):
    """An upload the service cannot use: answered with its status and ``{"detail", "reason"}``.

    An HTTPException, so FastAPI passes it through unchanged when raised while reading the body.
    """

    def __init__(self, status: int, reason: str, detail: str, hint: str | None = None) -> None:
        super().__init__(status, detail)
        self.reason = reason
        self.hint = hint


def _error_response(exc: StarletteHTTPException) -> JSONResponse:
    """Every error as ``{"detail": technical text, "reason": code, "hint": what to do, or null}``."""
    reason = getattr(exc, "reason", HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_"))
    hint = getattr(exc, "hint", None) or HINTS.get(reason)
    return JSONResponse({"detail": exc.detail, "reason": reason, "hint": hint}, status_code=exc.status_code,
                        headers=exc.headers)


class InputInfo(BaseModel):
    format: str
    width: int
    height: int
    channels: int
    bit_depth: int


class Prediction(BaseModel):
    classes: list[str]
    probabilities: list[float]
    predicted: str
    confidence: float
    image_png_base64: str
    gradcam_png_base64: str
    model_version: str
    input: InputInfo
    warnings: list[str] = Field(default_factory=list, description=(
        "How the image differs from the model's training images (format, colour, bit depth, brightness, "
        "contrast, sharpness); empty when it matches, or when the model's record has no input profile. "
        "When not empty the prediction may be meaningless."))
    notice: str = NOTICE


class ModelInfo(BaseModel):
    model: str
    version: str
    classes: list[str]
    image_size: int
    channels: int
    ordered: bool | None = None
    metric: str | None = None
    metrics: dict[str, Any] = {}
    created: str | None = None
    data_hash: str | None = None
    params_hash: str | None = None


class Health(BaseModel):
    status: str
    model_version: str


class Error(BaseModel):
    detail: str = Field(description="What is wrong, in technical terms")
    reason: str = Field(description="Machine-readable code, e.g. not_an_image, empty_file, upload_too_large")
    hint: str | None = Field(None, description="What the sender can do about it, in plain words")


class UploadLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> Rejected:
        mb = f"{self.max_bytes / 2**20:.3g}"
        return Rejected(413, "upload_too_large", f"upload exceeds the limit of {self.max_bytes} bytes",
                        f"The file is larger than the {mb} MB upload limit. Crop the image to the region of interest "
                        "or save it as PNG or JPEG, and upload it again.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error_response(self._too_large())(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked upload without Content-Length
                raise self._too_large()
            return message

        await self.app(scope, limited, send)


def create_app(
    champion_json: str | Path,
    data_cfg: DataConfig,
    ingest_cfg: IngestConfig,
    *,
    max_upload_bytes: int = 20 * 1024 * 1024,
    workers: int = 2,
) -> FastAPI:
    """Build the app; the champion model loads once, here.

    ``workers`` bounds how many uploads are read, decoded and predicted at once (threads off the
    event loop); the model itself runs one call at a time.
    """
    predictor = Predictor(champion_json, data_cfg, ingest_cfg)
    if predictor.profile is None:
        log.warning("%s has no input_profile (written before `medflow compare` recorded one): uploads are not "
                    "checked against the training images", champion_json)
    limiter = anyio.CapacityLimiter(workers)
    app = FastAPI(
        title="medflow",
        version=predictor.version,
        description=f"Image classification with Grad-CAM explanations. {NOTICE}",
        docs_url=None,  # Swagger UI / ReDoc pages load from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _crashed(_: Request, exc: Exception) -> JSONResponse:
        """A bug, not the client's fault: the same JSON shape as every other error (logged by the server)."""
        return _error_response(Rejected(500, "internal_error", f"internal server error ({type(exc).__name__})"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """Name what is wrong without echoing the (possibly large, binary) input back."""
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error_response(Rejected(422, "invalid_request", detail))

    def run(upload: BinaryIO) -> dict[str, Any]:
        data = upload.read()
        try:
            decoded = predictor.decode(data)
        except BadImage as e:
            raise Rejected(REASON_STATUS.get(e.reason, 422), e.reason, e.detail) from None
        except Exception as e:  # noqa: BLE001 - whatever the client sent, it is not a usable image
            log.warning("upload could not be decoded: %r", e)
            raise Rejected(422, "unreadable", f"the file could not be read as an image ({type(e).__name__})") from None
        return predictor.predict(decoded)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> Health:
        """Liveness: the model is loaded."""
        return Health(status="ok", model_version=predictor.version)

    @app.get("/model")
    async def model() -> ModelInfo:
        """The champion model: name, version, classes and its test metrics."""
        return ModelInfo(**predictor.info())

    responses = {400: {"model": Error, "description": "Malformed request body"},
                 500: {"model": Error, "description": "Server failure (a bug; see the server log)"},
                 413: {"model": Error, "description": "Upload or image dimensions too large"},
                 415: {"model": Error, "description": "Not a supported image"},
                 422: {"model": Error, "description": "Corrupt, truncated or unusable image"}}

    @app.post("/predict", responses=responses)  # type: ignore[arg-type]
    async def predict(
        request: Request,
        file: UploadFile = File(description="PNG, JPEG, BMP, TIFF or DICOM; the type is sniffed from the bytes"),
    ) -> Prediction:
        """Classify one image (content is sniffed; the file name is ignored); probabilities + Grad-CAM, and
        ``warnings`` when the image does not look like the training data. One ``file`` part per request."""
        if (parts := len((await request.form()).getlist("file"))) > 1:  # the form FastAPI already parsed
            raise Rejected(422, "invalid_request", f"the request has {parts} 'file' parts: send one image per "
                           "request (`medflow predict` classifies many files)")
        return Prediction(**await anyio.to_thread.run_sync(run, file.file, limiter=limiter))

    return app
