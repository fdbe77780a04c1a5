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
from dataclasses import dataclass
from typing import Any, AsyncGenerator
from urllib.parse import urlsplit

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from pcee.selective import DEFAULT_ANSWER_MODE, check_answer_mode
from pcee.serving.batcher import MicroBatcher
from pcee.serving.inputs import InputError, array_from_image, arrays_from_json, parse_json_body
from pcee.serving.metrics import ServiceMetrics
from pcee.serving.model_source import ModelSource, RegistryUnavailableError, ServedModel, load_served_model
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

    def validate(self) -> "ServeConfig":
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
            raise ValueError("answer mode 'defer' needs a fallback URL (--fallback-url / PCEE_SERVE_FALLBACK_URL) to defer to")
        if not self.fallback_timeout_s > 0:
            raise ValueError(f"fallback_timeout_s must be > 0, got {self.fallback_timeout_s}")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {self.shadow_fraction}")
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
            lambda: self.model,  # type: ignore[arg-type,return-value]
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

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the current model (raises RegistryUnavailableError with a clear message), then start
        the batch worker and the registry poller."""
        version = self.source.current_version()
        self.model = self._load(version)
        self.registry_ok = True
        log.info("serving %s version %s (policy %s, delta %s)", self.source.description, version, self.model.policy_name, self.model.delta)
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
        return load_served_model(
            bundle_dir, version, batch_size=self.config.runner_batch_size, input_shape=self.config.input_shape
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
                log.warning("registry unreachable, keeping model version %s: %s", self.model.version if self.model else "?", err)
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
            log.warning("could not load version %s, keeping %s: %s", version, self.model.version if self.model else "?", err)
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
        except (asyncio.TimeoutError, httpx.TimeoutException):
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
            log.warning("deferral of %d sample(s) to %s failed, answering with the best guess: %s", len(idx), url, problem)
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
    files = [v for _, v in form.multi_items() if hasattr(v, "read")]
    if not files:
        raise InputError(422, "multipart upload has no file part: send the image as a file field (e.g. -F file=@digit.png)")
    data = await files[0].read()
    await form.close()
    return data


def create_app(service: Service) -> FastAPI:
    """A FastAPI app around a started :class:`Service`."""
    cfg = service.config
    app = FastAPI(title="pcee", description="Performance Control Early Exiting service", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        service.metrics.error("internal")
        service.metrics.http(request.url.path, 500)
        return _error(500, f"internal error: {type(err).__name__}")

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        model = service.model
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
                    415, f"unsupported content type {ctype!r}: use application/json, multipart/form-data, image/png or image/jpeg"
                )
            answers = await service.batcher.submit(x)
            if cfg.answer_mode == "defer":
                answers = await service.defer(x, answers)
        except InputError as err:
            service.metrics.error(_problem(err.message))
            service.metrics.http("/predict", err.status)
            return _error(err.status, err.message)
        except ClientDisconnect:
            service.metrics.error("client_disconnect")
            return _error(400, "client disconnected")
        service.metrics.http("/predict", 200)
        if not batched:  # one sample is answered flat; a list (even of one) as {"results": [...]}
            return JSONResponse(answers[0])
        return JSONResponse({"model_version": answers[0]["model_version"], "results": answers})

    @app.post("/feedback")
    async def feedback(request: Request) -> JSONResponse:
        try:
            body = await _read_capped(request, 64 * 1024)
            payload = parse_json_body(body)
            if not isinstance(payload, dict):
                raise InputError(422, 'feedback must be a JSON object {"request_id": str, "label": int}')
            rid, label = payload.get("request_id"), payload.get("label")
            if not isinstance(rid, str) or not rid:
                raise InputError(422, '"request_id" must be the non-empty string returned by /predict')
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise InputError(422, f'"label" must be a non-negative integer class index, got {label!r}')
            if service.feedback_store is None:
                raise InputError(503, "feedback is unavailable: the service runs without a traffic store")
            try:
                created = service.feedback_store.add_feedback(rid, label)
            except UnknownRequestError:
                raise InputError(404, f"unknown request_id {rid!r}: no logged prediction has this id") from None
            if not created:
                existing = service.feedback_store.get_feedback(rid)
                if existing != label:
                    raise InputError(409, f"request {rid} already has label {existing}; a different label ({label}) is refused")
            else:
                row = service.feedback_store.get_request(rid)
                if row is not None and row["decision"] == "answered":  # measured accuracy on answered
                    service.metrics.feedback_on_answered(int(row["prediction"]) == label)
        except InputError as err:
            service.metrics.error(_problem(err.message))
            service.metrics.http("/feedback", err.status)
            return _error(err.status, err.message)
        service.metrics.http("/feedback", 200)
        return JSONResponse({"request_id": rid, "label": label, "created": created})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        m = service.model
        service.metrics.http("/health", 200)
        return {
            "status": "ok",
            "model_version": m.version,
            "delta": m.delta,
            "target_accuracy": m.target_accuracy,
            "policy": m.policy_name,
            "num_exits": m.num_exits,
            "input_shape": list(m.input_shape),
            "source": service.source.description,
            "registry_ok": service.registry_ok,
            "registry_error": service.registry_error,
            "logging": service.store is not None,
            "uptime_s": round(time.time() - service.started_at, 3),
            "answer_mode": cfg.answer_mode,
            "answer_threshold": m.answer_rule.threshold,
            "answer_rule_kind": m.answer_rule.kind,
            "shadow_fraction": cfg.shadow_fraction,
            "fallback_url": cfg.fallback_url,
        }

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        m = service.model
        text = service.metrics.render(
            m.version, m.delta, time.time() - service.started_at, service.registry_ok, answer_threshold=m.answer_rule.threshold
        )
        service.metrics.http("/metrics", 200)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _problem(message: str) -> str:
    """A short metric label for an error message ("wrong shape [..]: ..." -> "wrong shape")."""
    head = message.split(":")[0]
    return "".join(ch for ch in head if not ch.isdigit() and ch not in "[](){}'\",").strip()[:40] or "error"
