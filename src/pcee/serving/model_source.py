"""Where the service gets its model: a registry alias (MLflow ``models:/<name>@<alias>``) or a local
bundle directory (tests, offline use).

A :class:`ModelSource` answers two questions: which version is current (cheap; polled) and where
that version's bundle directory is (may download). :func:`load_served_model` turns a bundle
directory into a :class:`ServedModel` ready for the batch worker.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pcee.bundle import ModelBundle
from pcee.inference.device import resolve_device
from pcee.registry.fetch import fetch_bundle
from pcee.registry.http import fail_fast_http
from pcee.selective import NO_RULE, AnswerRule
from pcee.settings import Settings
from pcee.verification import Verification

log = logging.getLogger("pcee.serving")


class RegistryUnavailableError(RuntimeError):
    """The model registry could not be reached or has no model under the alias."""


class ModelSource(Protocol):
    description: str

    def current_version(self) -> str:
        """The version the source points at now (raises RegistryUnavailableError)."""
        ...

    def fetch(self, version: str) -> Path:
        """A local bundle directory for ``version``."""
        ...


@dataclass
class LocalBundleSource:
    """A bundle directory on disk; its version is a content hash of the bundle files, so replacing
    the directory's contents (atomically, by rename) is picked up like an alias move."""

    path: Path
    description: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.description = self.description or f"local bundle {self.path}"

    def current_version(self) -> str:
        if not self.path.is_dir():
            raise RegistryUnavailableError(f"bundle directory {self.path} does not exist")
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            h.update(f.relative_to(self.path).as_posix().encode())
            h.update(f.read_bytes())
        return "local-" + h.hexdigest()[:12]

    def fetch(self, version: str) -> Path:
        return self.path


@dataclass
class MlflowAliasSource:
    """``models:/<name>@<alias>`` in an MLflow registry; bundles cached under ``cache_dir/<name>/<version>``."""

    model_name: str
    alias: str = "champion"
    tracking_uri: str | None = None
    cache_dir: Path | None = None
    description: str = field(default="")

    def __post_init__(self) -> None:
        # fail fast: a registry that is down must not hang start-up or the poll thread

        fail_fast_http()
        settings = Settings()
        self.tracking_uri = self.tracking_uri or settings.recorded_tracking_uri()
        self.cache_dir = Path(self.cache_dir or settings.state_dir / "serving" / "models")
        self.description = (
            self.description
            or f"models:/{self.model_name}@{self.alias} at {self.tracking_uri or 'default tracking URI'}"
        )

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def current_version(self) -> str:
        try:
            mv = self._client().get_model_version_by_alias(self.model_name, self.alias)
        except Exception as err:  # MlflowException, connection errors, sqlite errors
            raise RegistryUnavailableError(
                f"cannot resolve models:/{self.model_name}@{self.alias} at {self.tracking_uri}: {type(err).__name__}: {_first_line(err)}"
            ) from err
        return str(mv.version)

    def fetch(self, version: str) -> Path:

        cache = Path(self.cache_dir or ".")  # set in __post_init__
        try:
            # Replicas on one machine share the cache and poll the same alias, so they reload at about
            # the same time: one at a time, the first downloads and the others find it cached (else the
            # second download's rename replaces the directory while the first replica loads from it).
            cache.mkdir(parents=True, exist_ok=True)
            with open(cache / ".fetch.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return fetch_bundle(self.model_name, version, cache, self.tracking_uri)
        except FileNotFoundError as err:
            raise RegistryUnavailableError(str(err)) from err
        except Exception as err:  # MlflowException, connection errors
            raise RegistryUnavailableError(
                f"cannot download models:/{self.model_name}/{version}: {_first_line(err)}"
            ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


@dataclass
class ServedModel:
    """A loaded bundle as the service uses it."""

    version: str
    runner: Any  # EarlyExitRunner: .run(x (N,C,H,W) float32) -> ExitResult
    input_shape: tuple[int, int, int]
    policy_name: str
    delta: float | None
    num_exits: int
    target_accuracy: float | None
    bundle_dir: Path
    answer_rule: AnswerRule = NO_RULE  # ρ: bundle meta "answer_rule"; none -> ρ = 0, nothing declined
    num_classes: int = 0  # classes of the final exit: a feedback label lies in [0, num_classes)
    # what the version can say about α on current traffic (bundle meta "verification", else its certificate)
    verification: Verification = field(default_factory=lambda: Verification("not certified"))
    device: str = "cpu"  # where the runner runs the model (/health shows it)


def _policy_delta(policy: Any) -> float | None:
    """The threshold the policy serves (δ for PCEE, the certified δ' for risk-controlled); None when
    nothing is certified and every sample goes to the final exit."""
    value = float(policy.served_threshold())
    return value if math.isfinite(value) else None


def _target_accuracy(meta: dict) -> float | None:
    """The operator's target α the bundle was chosen for (its certificate, else the older meta key)."""
    value = (meta.get("operating_point") or {}).get("target_accuracy", meta.get("target_accuracy"))
    return None if value is None else float(value)


def _input_shape(bundle: Any, override: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if override is not None:
        return tuple(int(v) for v in override)  # type: ignore[return-value]
    meta = getattr(bundle, "meta", None) or {}
    shape = meta.get("input_shape")
    if shape is None:
        cfg = getattr(bundle.model, "config", {}) or {}
        chans = cfg.get("in_chans", cfg.get("in_channels"))
        size = cfg.get("img_size") or cfg.get("image_size") or cfg.get("input_size")
        if chans is not None and size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = (chans, *size)
    if shape is None:
        raise ValueError(
            "the bundle's meta.json has no 'input_shape' (C, H, W) and the model config has no in_chans/img_size; "
            "pass --input-shape C,H,W"
        )
    return tuple(int(v) for v in shape)  # type: ignore[return-value]


def load_served_model(
    bundle_dir: Path,
    version: str,
    batch_size: int = 256,
    input_shape: tuple[int, int, int] | None = None,
    device: str = "cpu",
    graphs: bool = False,
    warm_rows: int = 1,
) -> ServedModel:
    """Load a bundle directory (``ModelBundle.load``, weights_only) and build its runner on ``device``
    (with CUDA graphs when ``graphs``; the bundle's latency profile, if measured on that kind of
    device, decides where splitting a batch pays)."""
    import torch

    where = resolve_device(device)
    bundle = ModelBundle.load(bundle_dir, map_location=where)
    bundle.model.eval()
    runner = bundle.runner(batch_size=batch_size, device=where, graphs=graphs)
    policy = bundle.policy
    shape = _input_shape(bundle, input_shape)
    # warm-up: the first call pays for lazy init (and with graphs, each batch bucket's capture up to the
    # largest micro-batch), which should not land on a request
    with torch.inference_mode():
        runner.run(torch.zeros((1, *shape)).numpy())
        num_classes = int(bundle.model(torch.zeros((1, *shape), device=where))[-1].shape[-1])
        if graphs:
            runner.warmup(torch.zeros((min(warm_rows, batch_size), *shape)).numpy())
    return ServedModel(
        version=str(version),
        runner=runner,
        input_shape=shape,
        policy_name=str(getattr(policy, "name", type(policy).__name__)),
        delta=_policy_delta(policy),
        num_exits=int(bundle.model.num_exits),
        target_accuracy=_target_accuracy(getattr(bundle, "meta", None) or {}),
        bundle_dir=Path(bundle_dir),
        answer_rule=AnswerRule.from_dict((getattr(bundle, "meta", None) or {}).get("answer_rule")),
        num_classes=num_classes,
        verification=Verification.from_meta(getattr(bundle, "meta", None)),
        device=runner.device_name,
    )
