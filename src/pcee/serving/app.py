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

Untrusted input (:mod:`pcee.serving.auth`, :mod:`pcee.serving.schemas`): with a token configured, writes
need it (``/predict`` too when asked; deferrals forward it); ``/feedback`` has a per-client rate limit, and
a label must be a class of the model version that logged the request. The OpenAPI document states the
served model's contract and is rebuilt when the version changes. Every handler answers its own errors,
so no request escapes as an exception and a keep-alive connection stays usable.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcee.inference.device import resolve_device
from pcee.serving.auth import BearerAuth, ClientRateLimit, bearer_header
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
    feedback_request_schema,
    predict_request_schema,
)
from pcee.settings import Settings
from pcee.traffic.store import LabelOutOfRangeError, TrafficStore, UnknownRequestError
from pcee.verification import LabelState, label_state

log = logging.getLogger("pcee.serving")

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")

#: largest /feedback body read (an id and a label are ~80 bytes)
FEEDBACK_BODY_BYTES = 64 * 1024


def _default(name: str) -> Any:
    """The default of a :class:`~pcee.settings.Settings` field: every serving default is written there, once."""
    return Settings.model_fields[name].default


#: ServeConfig field -> the Settings field (``PCEE_*`` variable) that holds its default and its limits
_SETTINGS = {
    "host": "serve_host",
    "port": "serve_port",
    "max_batch": "serve_max_batch",
    "max_wait_ms": "serve_max_wait_ms",
    "max_body_bytes": "serve_max_body_bytes",
    "max_samples_per_request": "serve_max_samples",
    "store_fraction": "serve_store_fraction",
    "poll_interval_s": "serve_poll_s",
    "seed": "serve_seed",
    "answer_mode": "serve_answer_mode",
    "fallback_url": "serve_fallback_url",
    "fallback_timeout_s": "serve_fallback_timeout_s",
    "shadow_fraction": "serve_shadow_fraction",
    "token": "serve_token",
    "token_on_predict": "serve_token_predict",
    "feedback_rate_limit": "serve_feedback_rate_limit",
    "device": "serve_device",
    "graphs": "serve_graphs",
}


@dataclass(frozen=True)
class ServeConfig:
    """Service settings: built from :class:`pcee.settings.Settings` (:meth:`from_settings`), whose fields
    hold every default and limit; :meth:`validate` checks a config against them."""

    host: str = _default("serve_host")
    port: int = _default("serve_port")
    max_batch: int = _default("serve_max_batch")  # samples per runner call
    max_wait_ms: float = _default("serve_max_wait_ms")  # wait for more requests after the first of a batch
    max_body_bytes: int = _default("serve_max_body_bytes")  # larger bodies get 413 without being read
    max_samples_per_request: int = _default("serve_max_samples")
    store_fraction: float = _default("serve_store_fraction")  # fraction of inputs stored for recalibration
    poll_interval_s: float = _default("serve_poll_s")  # registry alias poll; <= 0: reload only on request (SIGHUP)
    log_requests: bool = True  # False only to measure the cost of logging
    runner_batch_size: int = 256
    input_shape: tuple[int, int, int] | None = None  # override the bundle's meta
    seed: int | None = _default("serve_seed")
    answer_mode: str = _default("serve_answer_mode")  # answer | abstain | defer (pcee.selective)
    fallback_url: str | None = _default("serve_fallback_url")  # where deferred requests go (mode defer)
    fallback_timeout_s: float = _default("serve_fallback_timeout_s")  # longest wait for the fallback's answer
    shadow_fraction: float = _default("serve_shadow_fraction")  # fraction also run to the final exit
    token: str | None = field(default=None, repr=False)  # bearer token of the writes (pcee.serving.auth)
    token_on_predict: bool = _default("serve_token_predict")  # /predict needs the token too
    feedback_rate_limit: str = _default("serve_feedback_rate_limit")  # per client, limits' notation
    device: str = _default("serve_device")  # where the model runs: cpu, cuda, cuda:<index>
    graphs: bool = _default("serve_graphs")  # CUDA graphs per segment and batch bucket (CUDA only)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ServeConfig:
        """The config ``settings`` describe; ``overrides`` set the fields Settings does not hold
        (``log_requests``, ``runner_batch_size``, ``input_shape``)."""
        values = {name: getattr(settings, key) for name, key in _SETTINGS.items()}
        values["max_batch"] = settings.serve_micro_batch()
        if values["token"] is not None:
            values["token"] = values["token"].get_secret_value()
        return cls(**{**values, **overrides}).validate()

    def validate(self) -> ServeConfig:
        """Each value against its Settings field (a bad one raises SettingsError naming the variable), then
        the rule between fields: ``defer`` needs a fallback URL."""
        Settings(**{key: getattr(self, name) for name, key in _SETTINGS.items()})
        if self.answer_mode == "defer" and not self.fallback_url:
            raise ValueError(
                "answer mode 'defer' needs a fallback URL (--fallback-url / PCEE_SERVE_FALLBACK_URL) to defer to"
            )
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
        self._wake = threading.Event()  # a reload asked for (SIGHUP: the fleet's rolling reload)
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
        self.auth = BearerAuth(config.token)
        self.feedback_limit = ClientRateLimit(config.feedback_rate_limit)

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
        self._note_classes(self.model)
        self.registry_ok = True
        log.info(
            "serving %s version %s (policy %s, delta %s)",
            self.source.description,
            version,
            self.model.policy_name,
            self.model.delta,
        )
        self.batcher.start()
        self._poller = threading.Thread(target=self._poll, name="pcee-registry-poll", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.batcher.stop()
        if self._poller is not None:
            self._poller.join(5)

    def _load(self, version: str) -> ServedModel:
        bundle_dir = self.source.fetch(version)
        cfg = self.config
        return load_served_model(
            bundle_dir, version, cfg.runner_batch_size, cfg.input_shape, cfg.device, cfg.graphs, cfg.max_batch
        )

    def request_reload(self) -> None:
        """Look at the source now and reload if it moved (safe from a signal handler: it only sets an event)."""
        self._wake.set()

    def _poll(self) -> None:
        """Check the source every ``poll_interval_s`` (never when <= 0) and whenever a reload is requested."""
        interval = self.config.poll_interval_s if self.config.poll_interval_s > 0 else None
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if not self._stop.is_set():
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
        self._note_classes(new)
        log.warning("reloaded: model version %s -> %s", old, version)
        return True

    def _note_classes(self, model: ServedModel) -> None:
        """Give the rows this version logged before the class count was stored their count, and count
        the stored labels no reader will use (``pcee_impossible_labels_stored``)."""
        if self.feedback_store is None:
            return
        try:
            self.feedback_store.record_num_classes(model.version, model.num_classes)
            self.metrics.impossible_labels_stored.set(self.feedback_store.count_impossible_labels())
        except Exception as err:  # the store's own errors show on the requests that need it
            log.warning("could not count the stored labels outside the model's classes: %s", err)

    # -- writes -----------------------------------------------------------------------------------
    def authorize(self, request: Request, endpoint: str) -> None:
        """InputError(401) when the token is configured for ``endpoint`` and the request lacks it."""
        if endpoint == "/predict" and not self.config.token_on_predict:
            return
        if not self.auth.allows(request.headers.get("authorization")):
            self.metrics.auth_failures.labels(endpoint=endpoint).inc()
            raise InputError(
                401,
                f"{endpoint} needs the service's token: send the header 'Authorization: Bearer <PCEE_SERVE_TOKEN>'",
                "unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def limit_feedback(self, request: Request) -> None:
        """InputError(429) when the client posted more feedback than the rate limit allows."""
        client = request.client.host if request.client else "unknown"
        wait = self.feedback_limit.hit(client)
        if wait is not None:
            self.metrics.rate_limited.inc()
            raise InputError(
                429,
                f"too many feedback requests from {client}: at most {self.config.feedback_rate_limit}; "
                f"retry in {wait:.2f} s",
                "rate limited",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def record_feedback(self, request_id: str, label: int) -> bool:
        """Store a label (True: added, False: the same label was there); InputError for an unknown id
        (404), a label the answering version does not have (422) or a different label (409)."""
        store = self.feedback_store
        if store is None:
            raise InputError(503, "feedback is unavailable: the service runs without a traffic store")
        try:
            created = store.add_feedback(request_id, label, num_classes=self.served.num_classes)
        except UnknownRequestError:
            raise InputError(
                404, f"unknown request_id {request_id!r}: no logged prediction has this id", "unknown request_id"
            ) from None
        except LabelOutOfRangeError as err:
            self.metrics.labels_refused.inc()
            raise InputError(422, str(err), "label out of range") from None
        if not created:
            existing = store.get_feedback(request_id)
            if existing != label:
                raise InputError(
                    409,
                    f"request {request_id} already has label {existing}; a different label ({label}) is refused",
                    "label conflict",
                )
            return False
        row = store.get_request(request_id)
        if row is not None and row["decision"] == "answered":  # measured accuracy on answered
            self.metrics.feedback_on_answered(int(row["prediction"]) == label)
        return True

    # -- verification -----------------------------------------------------------------------------
    def label_state(self) -> LabelState:
        """The served version's verification status and, while it waits, the labels counted so far."""
        store = self.feedback_store
        model = self.served
        return label_state(model.verification, model.version, None if store is None else store.count_labels)

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
            r = await asyncio.wait_for(
                self._http.post(url, json={"inputs": x[idx].tolist()}, headers=bearer_header(cfg.token)),
                cfg.fallback_timeout_s,
            )
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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _refused(service: Service, err: InputError) -> JSONResponse:
    service.metrics.error(err.problem or _problem(err.message))
    return _error(err.status, err.message, err.headers)


def _internal(service: Service, request: Request, err: Exception) -> JSONResponse:
    log.error("unhandled error on %s", request.url.path, exc_info=err)
    service.metrics.error("internal")
    return _error(500, f"internal error: {type(err).__name__}")


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InputError(400, f"invalid Content-Length header {declared[:40]!r}") from None
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


async def _predict_inputs(request: Request, service: Service) -> tuple[np.ndarray, bool]:
    """The samples of a /predict body (N, C, H, W) and whether they came as a list."""
    cfg, shape = service.config, service.served.input_shape
    body = await _read_capped(request, cfg.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return array_from_image(await _image_from_multipart(request.headers, body), shape), False
    if ctype in IMAGE_TYPES:
        return array_from_image(body, shape), False
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        return arrays_from_json(parse_json_body(body), shape, cfg.max_samples_per_request)
    raise InputError(
        415,
        f"unsupported content type {ctype[:60]!r}: use application/json, multipart/form-data, image/png or image/jpeg",
    )


async def predict(request: Request) -> Response:
    """POST /predict (a plain Starlette route: see :func:`create_app`)."""
    service: Service = request.app.state.service
    try:
        service.authorize(request, "/predict")
        x, batched = await _predict_inputs(request, service)
        answers = await service.batcher.submit(x)
        if service.config.answer_mode == "defer":
            answers = await service.defer(x, answers)
    except InputError as err:
        return _refused(service, err)
    except ClientDisconnect:
        service.metrics.error("client_disconnect")
        return _error(400, "client disconnected")
    except Exception as err:  # answered here, not raised: the client's keep-alive connection stays usable
        return _internal(service, request, err)
    if not batched:  # one sample is answered flat; a list (even of one) as {"results": [...]}
        return _json(answers[0])
    return _json({"model_version": answers[0]["model_version"], "results": answers})


async def feedback(request: Request) -> Response:
    """POST /feedback: rate limit, token, then the label checked against the version that answered."""
    service: Service = request.app.state.service
    try:
        service.limit_feedback(request)
        service.authorize(request, "/feedback")
        payload = parse_json_body(await _read_capped(request, FEEDBACK_BODY_BYTES))
        fb = _validated(FeedbackRequest, payload, 'feedback must be a JSON object {"request_id": str, "label": int}')
        created = service.record_feedback(fb.request_id, fb.label)
    except InputError as err:
        return _refused(service, err)
    except ClientDisconnect:
        service.metrics.error("client_disconnect")
        return _error(400, "client disconnected")
    return _json(FeedbackResponse(request_id=fb.request_id, label=fb.label, created=created).model_dump())


async def health(request: Request) -> HealthResponse:
    service: Service = request.app.state.service
    m, cfg = service.served, service.config
    labels = await asyncio.to_thread(service.label_state)
    return HealthResponse(
        status="ok",
        model_version=m.version,
        delta=m.delta,
        target_accuracy=m.target_accuracy,
        policy=m.policy_name,
        num_exits=m.num_exits,
        num_classes=m.num_classes,
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
        auth=service.auth.enabled,
        verification=labels.status,
        labels=labels.labels,
        labels_received=labels.n_labels,
        label_budget=labels.label_budget,
    )


async def metrics(request: Request) -> Response:
    service: Service = request.app.state.service
    m = service.served
    text = service.metrics.render(
        m.version,
        m.delta,
        time.time() - service.started_at,
        service.registry_ok,
        answer_threshold=m.answer_rule.threshold,
        labels=await asyncio.to_thread(service.label_state),
    )
    return Response(text, media_type=CONTENT_TYPE_LATEST)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes an endpoint answers with (500 for all)."""
    return {code: {"model": ErrorResponse} for code in (*codes, 500)}


def _document_routes(app: FastAPI) -> None:
    """The FastAPI routes: /health and /metrics are served by them; /predict and /feedback read their
    bodies by hand (the size caps hold before a byte is read), so their bodies are documented through
    openapi_extra and :func:`_contract_openapi` fills in the served model's contract."""
    body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}}
    # never called for /predict: the Starlette route placed first (create_app) serves it
    app.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=PredictAnswer | PredictBatchResponse,
        responses=_errors(400, 401, 413, 415, 422, 503),
        openapi_extra={"requestBody": _PREDICT_BODY},
    )
    app.add_api_route(
        "/feedback",
        feedback,
        methods=["POST"],
        response_model=FeedbackResponse,
        responses=_errors(400, 401, 404, 409, 413, 422, 429, 503),
        openapi_extra=body,
    )
    app.add_api_route("/health", health, methods=["GET"], response_model=HealthResponse)
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text format"}},
    )


_PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {}},  # the served model's contract: _contract_openapi
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


def _contract_openapi(app: FastAPI, service: Service) -> Callable[[], dict[str, Any]]:
    """``app.openapi``: FastAPI's document with the request bodies of the served model (its input shape,
    its classes) and, with a token, the bearer scheme on the writes; rebuilt when the version changes."""
    cache: dict[str, dict[str, Any]] = {}

    def build() -> dict[str, Any]:
        model = service.served
        if model.version not in cache:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            post = {path: doc["paths"][path]["post"] for path in ("/predict", "/feedback")}
            post["/predict"]["requestBody"]["content"]["application/json"]["schema"] = predict_request_schema(
                model.input_shape, service.config.max_samples_per_request
            )
            post["/feedback"]["requestBody"]["content"]["application/json"]["schema"] = feedback_request_schema(
                model.num_classes
            )
            if service.auth.enabled:
                doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                post["/feedback"]["security"] = [{"bearer": []}]
                if service.config.token_on_predict:
                    post["/predict"]["security"] = [{"bearer": []}]
            cache.clear()
            cache[model.version] = doc
        return cache[model.version]

    return build


def create_app(service: Service) -> FastAPI:
    """A FastAPI app around a started :class:`Service`."""
    app = FastAPI(title="pcee", description="Performance Control Early Exiting service", docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(CountResponses, metrics=service.metrics)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, err: Exception) -> JSONResponse:
        return _internal(service, request, err)

    _document_routes(app)
    # /predict is served by a plain Starlette route placed before FastAPI's, which stays for the
    # OpenAPI schema: FastAPI's per-request machinery (dependency solving, exit stack) cost ~0.07 ms
    # of a ~1.5 ms served request, and /predict takes nothing FastAPI would inject
    app.router.routes.insert(0, Route("/predict", predict, methods=["POST"]))
    app.router.routes.insert(1, Route("/feedback", feedback, methods=["POST"]))
    app.openapi = _contract_openapi(app, service)  # type: ignore[method-assign]
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


_Model = TypeVar("_Model", bound=BaseModel)


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
