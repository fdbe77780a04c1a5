"""The HTTP service: ``POST /predict``, ``POST /feedback``, ``GET /health``, ``GET /metrics``.

:class:`Service` owns the served model, the micro-batcher, the traffic store and the registry
poller; :func:`create_app` wraps it in a FastAPI app. The model is loaded *before* the app is
built (:meth:`Service.start`), so a registry that cannot be reached stops start-up with a clear
message instead of a server that answers 503 forever.

Selective answering (:mod:`pcee.selective`): the batcher decides per sample (answered / abstained /
deferred) from the model's answer rule ρ and ``answer_mode``. Deferred samples are forwarded here,
in the request handler (async, never in the batch worker), to ``fallback_url``'s ``/predict`` in
this service's own JSON format; its answer replaces the prediction (``local_prediction`` keeps ours).
A fallback that is down, slow (``fallback_timeout_s``) or answers non-200 costs the request nothing
but the wait: it gets our best guess with ``deferral_failed: true``. The row was committed before
the forward; the outcome is written to it afterwards (:meth:`TrafficStore.record_deferrals`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcee.inference.device import resolve_device
from pcee.selective import DEFAULT_ANSWER_MODE, check_answer_mode
from pcee.serving.batcher import MicroBatcher
from pcee.serving.inputs import InputError, array_from_image, arrays_from_json, parse_json_body
from pcee.serving.metrics import ServiceMetrics
from pcee.serving.model_source import ModelSource, RegistryUnavailableError, ServedModel, load_served_model
from pcee.serving.schemas import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    PredictAnswer,
    PredictBatchResponse,
    PredictRequest,
)
from pcee.traffic.store import TrafficStore, UnknownRequestError

log = logging.getLogger("pcee.serving")

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")


@dataclass(frozen=True)
class ServeConfig:
    """Service settings (validated by :meth:`validate`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64  # samples per runner call
    max_wait_ms: float = 2.0  # wait for more requests after the first of a batch
    max_body_bytes: int = 1_000_000  # larger bodies get 413 without being read
    max_samples_per_request: int = 256
    store_fraction: float = 0.1  # fraction of inputs stored for recalibration
    poll_interval_s: float = 10.0  # registry alias poll; <= 0 disables hot reload
    log_requests: bool = True  # False only to measure the cost of logging
    runner_batch_size: int = 256
    input_shape: tuple[int, int, int] | None = None  # override the bundle's meta
    seed: int | None = None
    answer_mode: str = DEFAULT_ANSWER_MODE  # answer | abstain | defer (pcee.selective)
    fallback_url: str | None = None  # base URL of the service deferred requests go to (mode defer)
    fallback_timeout_s: float = 2.0  # longest wait for the fallback's answer
    shadow_fraction: float = 0.02  # fraction of requests also run to the final exit
    device: str = "cpu"  # where the model runs: cpu, cuda, cuda:<index>
    graphs: bool = False  # CUDA graphs per segment and batch bucket (CUDA only)

    def validate(self) -> ServeConfig:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_samples_per_request < 1:
            raise ValueError(f"max_samples_per_request must be >= 1, got {self.max_samples_per_request}")
        if not 0.0 <= self.store_fraction <= 1.0:
            raise ValueError(f"store_fraction must be in [0, 1], got {self.store_fraction}")
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        check_answer_mode(self.answer_mode)
        if self.fallback_url is not None:
            parts = urlsplit(self.fallback_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError(
                    f"fallback URL must be an absolute http(s) URL of a pcee service, e.g. http://127.0.0.1:8001, got {self.fallback_url!r}"
                )
        if self.answer_mode == "defer" and not self.fallback_url:
            raise ValueError(
                "answer mode 'defer' needs a fallback URL (--fallback-url / PCEE_SERVE_FALLBACK_URL) to defer to"
            )
        if not self.fallback_timeout_s > 0:
            raise ValueError(f"fallback_timeout_s must be > 0, got {self.fallback_timeout_s}")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {self.shadow_fraction}")
        if resolve_device(self.device).type != "cuda" and self.graphs:
            raise ValueError("graphs (CUDA graphs) need a CUDA device: serve with --device cuda")
        return self


class Service:
    """Model + batcher + store + registry poller; thread-safe model swap on alias moves."""

    def __init__(self, config: ServeConfig, source: ModelSource, store: TrafficStore | None) -> None:
        self.config = config.validate()
        self.source = source
        self.store = store if config.log_requests else None
        self.feedback_store = store  # feedback works even when request logging is off
        self.metrics = ServiceMetrics()
        self.model: ServedModel | None = None
        self.started_at = time.time()
        self.registry_ok = False
        self.registry_error: str | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.batcher = MicroBatcher(
            lambda: self.served,
            self.store,
            self.metrics,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            store_fraction=config.store_fraction,
            seed=config.seed,
            answer_mode=config.answer_mode,
            shadow_fraction=config.shadow_fraction,
        )
        self._http: httpx.AsyncClient | None = None  # created on the event loop at the first deferral

    @property
    def served(self) -> ServedModel:
        """The model in service; :meth:`start` loads it before a request can arrive."""
        if self.model is None:
            raise RuntimeError("the service has not been started")
        return self.model

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the current model (raises RegistryUnavailableError with a clear message), then start
        the batch worker and the registry poller."""
        version = self.source.current_version()
        self.model = self._load(version)
        self.registry_ok = True
        log.info(
            "serving %s version %s (policy %s, delta %s)",
            self.source.description,
            version,
            self.model.policy_name,
            self.model.delta,
        )
        self.batcher.start()
        if self.config.poll_interval_s > 0:
            self._poller = threading.Thread(target=self._poll, name="pcee-registry-poll", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.stop()
        if self._poller is not None:
            self._poller.join(5)

    def _load(self, version: str) -> ServedModel:
        bundle_dir = self.source.fetch(version)
        cfg = self.config
        return load_served_model(
            bundle_dir, version, cfg.runner_batch_size, cfg.input_shape, cfg.device, cfg.graphs, cfg.max_batch
        )

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            self.check_for_update()

    def check_for_update(self) -> bool:
        """Reload if the source points at a new version. Returns True on a reload; on any failure
        keeps the current model and logs a warning."""
        try:
            version = self.source.current_version()
        except RegistryUnavailableError as err:
            if self.registry_ok:
                log.warning(
                    "registry unreachable, keeping model version %s: %s", self.model.version if self.model else "?", err
                )
            self.registry_ok, self.registry_error = False, str(err)
            return False
        if not self.registry_ok:
            log.warning("registry reachable again")
        self.registry_ok, self.registry_error = True, None
        if self.model is not None and version == self.model.version:
            return False
        try:
            new = self._load(version)
        except Exception as err:
            self.metrics.reload(False)
            log.warning(
                "could not load version %s, keeping %s: %s", version, self.model.version if self.model else "?", err
            )
            return False
        old = self.model.version if self.model else None
        self.model = new  # atomic reference swap; the batcher picks it up on its next batch
        self.metrics.reload(True)
        log.warning("reloaded: model version %s -> %s", old, version)
        return True

    # -- deferral ---------------------------------------------------------------------------------
    async def defer(self, x: np.ndarray, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Forward the samples of ``x`` whose answer is marked deferred to the fallback in one
        request; fill in its answers, or mark them ``deferral_failed`` (best guess kept). Never raises
        for a fallback problem."""
        idx = [j for j, a in enumerate(answers) if a.get("deferred")]
        if not idx:
            return answers
        cfg = self.config
        url = f"{str(cfg.fallback_url).rstrip('/')}/predict"
        results, problem = None, None
        try:
            if self._http is None:
                self._http = httpx.AsyncClient(timeout=httpx.Timeout(cfg.fallback_timeout_s))
            r = await asyncio.wait_for(self._http.post(url, json={"inputs": x[idx].tolist()}), cfg.fallback_timeout_s)
            if r.status_code != 200:
                problem = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                results = _fallback_results(r.json(), len(idx))
        except (TimeoutError, httpx.TimeoutException):
            problem = f"no answer within {cfg.fallback_timeout_s:g} s"
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}: {err}"
        except ValueError as err:  # not JSON, or not the shape of a pcee answer
            problem = f"malformed answer: {err}"
        outcomes = []
        for k, j in enumerate(idx):
            a = answers[j]
            if results is not None:
                fb = results[k]
                a["local_prediction"] = a["prediction"]
                a["prediction"] = fb["prediction"]
                a["fallback_model_version"] = fb["model_version"]
                outcomes.append((a["request_id"], True, fb["prediction"]))
            else:
                a["deferred"], a["deferral_failed"] = False, True
                outcomes.append((a["request_id"], False, None))
        if problem is not None:
            log.warning(
                "deferral of %d sample(s) to %s failed, answering with the best guess: %s", len(idx), url, problem
            )
        self.metrics.decided(["deferred" if ok else "deferral_failed" for _, ok, _ in outcomes])
        if self.store is not None:
            try:  # off the event loop; shielded so a client that leaves does not lose the outcome
                await asyncio.shield(asyncio.to_thread(self.store.record_deferrals, outcomes))
            except Exception as err:  # the answer stands; the row keeps decision "deferred"
                log.warning("could not record the deferral outcome of %d row(s): %s", len(outcomes), err)
        return answers


def _fallback_results(body: Any, n: int) -> list[dict[str, Any]]:
    """The fallback's ``{"model_version", "results": [...]}`` -> n dicts with an int prediction."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != n:
        raise ValueError(f"expected {n} result(s) under 'results'")
    out = []
    for res in results:
        pred = res.get("prediction") if isinstance(res, dict) else None
        if isinstance(pred, bool) or not isinstance(pred, int):
            raise ValueError(f"prediction must be an integer class index, got {pred!r}")
        out.append({"prediction": pred, "model_version": str(res.get("model_version", body.get("model_version")))})
    return out


def _json(content: Any) -> Response:
    """A JSON response rendered by orjson (~5x faster than json.dumps on an answer); numpy scalars
    are numbers, a non-finite float becomes null."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InputError(400, f"invalid Content-Length header {declared!r}") from None
        if size > cap:  # refuse before reading a byte of the body
            raise InputError(413, f"payload too large: {size} bytes > limit {cap} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():  # chunked uploads have no Content-Length: count as we go
        total += len(chunk)
        if total > cap:
            raise InputError(413, f"payload too large: more than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_from_multipart(headers: Headers, body: bytes) -> bytes:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body
        yield b""

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=10, max_part_size=len(body) + 1).parse()
    except MultiPartException as err:
        raise InputError(400, f"malformed multipart upload: {err.message}") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise InputError(
            422, "multipart upload has no file part: send the image as a file field (e.g. -F file=@digit.png)"
        )
    data = await files[0].read()
    await form.close()
    return data


_Model = TypeVar("_Model", bound=BaseModel)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes an endpoint answers with (500 for all)."""
    return {code: {"model": ErrorResponse} for code in (*codes, 500)}


_PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": PredictRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}


def create_app(service: Service) -> FastAPI:
    """A FastAPI app around a started :class:`Service`."""
    cfg = service.config
    app = FastAPI(title="pcee", description="Performance Control Early Exiting service", docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(CountResponses, metrics=service.metrics)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        service.metrics.error("internal")
        return _error(500, f"internal error: {type(err).__name__}")

    # Bodies are read by hand (not as FastAPI body parameters) so that the size caps hold before a
    # byte is read; the request bodies are documented through openapi_extra instead. /predict
    # answers with the batcher's dicts as they are (hot path): its response_model documents them.
    @app.post(
        "/predict",
        response_model=PredictAnswer | PredictBatchResponse,
        responses=_errors(400, 413, 415, 422),
        openapi_extra={"requestBody": _PREDICT_BODY},
    )
    async def predict(request: Request) -> Response:
        model = service.served
        batched = False
        try:
            body = await _read_capped(request, cfg.max_body_bytes)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "multipart/form-data":
                x = array_from_image(await _image_from_multipart(request.headers, body), model.input_shape)
            elif ctype in IMAGE_TYPES:
                x = array_from_image(body, model.input_shape)
            elif ctype in ("application/json", "") or ctype.endswith("+json"):
                x, batched = arrays_from_json(parse_json_body(body), model.input_shape, cfg.max_samples_per_request)
            else:
                raise InputError(
                    415,
                    f"unsupported content type {ctype!r}: use application/json, multipart/form-data, image/png or image/jpeg",
                )
            answers = await service.batcher.submit(x)
            if cfg.answer_mode == "defer":
                answers = await service.defer(x, answers)
        except InputError as err:
            service.metrics.error(err.problem or _problem(err.message))
            return _error(err.status, err.message)
        except ClientDisconnect:
            service.metrics.error("client_disconnect")
            return _error(400, "client disconnected")
        if not batched:  # one sample is answered flat; a list (even of one) as {"results": [...]}
            return _json(answers[0])
        return _json({"model_version": answers[0]["model_version"], "results": answers})

    # /predict is served by a plain Starlette route placed before FastAPI's, which stays for the
    # OpenAPI schema: FastAPI's per-request machinery (dependency solving, exit stack) cost ~0.07 ms
    # of a ~1.5 ms served request, and /predict takes nothing FastAPI would inject
    app.router.routes.insert(0, Route("/predict", predict, methods=["POST"]))

    @app.post(
        "/feedback",
        response_model=FeedbackResponse,
        responses=_errors(400, 404, 409, 413, 422, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
            }
        },
    )
    async def feedback(request: Request) -> FeedbackResponse | JSONResponse:
        try:
            payload = parse_json_body(await _read_capped(request, 64 * 1024))
            fb = _validated(
                FeedbackRequest, payload, 'feedback must be a JSON object {"request_id": str, "label": int}'
            )
            rid, label = fb.request_id, fb.label
            if service.feedback_store is None:
                raise InputError(503, "feedback is unavailable: the service runs without a traffic store")
            try:
                created = service.feedback_store.add_feedback(rid, label)
            except UnknownRequestError:
                raise InputError(
                    404, f"unknown request_id {rid!r}: no logged prediction has this id", "unknown request_id"
                ) from None
            if not created:
                existing = service.feedback_store.get_feedback(rid)
                if existing != label:
                    raise InputError(
                        409,
                        f"request {rid} already has label {existing}; a different label ({label}) is refused",
                        "label conflict",
                    )
            else:
                row = service.feedback_store.get_request(rid)
                if row is not None and row["decision"] == "answered":  # measured accuracy on answered
                    service.metrics.feedback_on_answered(int(row["prediction"]) == label)
        except InputError as err:
            service.metrics.error(err.problem or _problem(err.message))
            return _error(err.status, err.message)
        return FeedbackResponse(request_id=rid, label=label, created=created)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        m = service.served
        return HealthResponse(
            status="ok",
            model_version=m.version,
            delta=m.delta,
            target_accuracy=m.target_accuracy,
            policy=m.policy_name,
            num_exits=m.num_exits,
            device=m.device,
            input_shape=list(m.input_shape),
            source=service.source.description,
            registry_ok=service.registry_ok,
            registry_error=service.registry_error,
            logging=service.store is not None,
            uptime_s=round(time.time() - service.started_at, 3),
            answer_mode=cfg.answer_mode,
            answer_threshold=m.answer_rule.threshold,
            answer_rule_kind=m.answer_rule.kind,
            shadow_fraction=cfg.shadow_fraction,
            fallback_url=cfg.fallback_url,
        )

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
    async def metrics() -> Response:
        m = service.served
        text = service.metrics.render(
            m.version,
            m.delta,
            time.time() - service.started_at,
            service.registry_ok,
            answer_threshold=m.answer_rule.threshold,
        )
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


class CountResponses:
    """ASGI middleware: every HTTP response counts once in ``pcee_http_requests_total`` by the route
    it matched (its path template; ``unmatched`` for none, so odd URLs add no series) and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.http(_endpoint(scope), message["status"])  # before the client can see it
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # the 500 is sent by Starlette's outermost error middleware, outside this one
                self.metrics.http(_endpoint(scope), 500)
            raise


def _endpoint(scope: Scope) -> str:
    routes: list[BaseRoute] = scope["app"].routes
    for route in routes:  # a handful: cheaper than it looks, and the label stays a path template
        if route.matches(scope)[0] != Match.NONE:
            return getattr(route, "path", "unmatched")
    return "unmatched"


def _validated(model: type[_Model], payload: Any, not_an_object: str) -> _Model:
    """``payload`` as ``model``, or a 422 naming the first field in error and what it must be (the
    field's description); ``not_an_object`` is the message for a payload that is no JSON object."""
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        if not first["loc"]:
            raise InputError(422, not_an_object) from None
        name = str(first["loc"][0])
        got = "nothing" if first["type"] == "missing" else repr(first["input"])
        raise InputError(
            422, f'"{name}" must be {model.model_fields[name].description}, got {got}', f"invalid {name}"
        ) from None


def _problem(message: str) -> str:
    """A short metric label for an error message ("wrong shape [..]: ..." -> "wrong shape")."""
    head = message.split(":")[0]
    return "".join(ch for ch in head if not ch.isdigit() and ch not in "[](){}'\",").strip()[:40] or "error"
