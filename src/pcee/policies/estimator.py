"""scikit-learn-style parameter handling shared by every exit policy.

:class:`PolicyEstimator` adds to :class:`~pcee.policies.base.ExitPolicy` what every concrete
policy needs: ``get_params``/``set_params`` read from the ``__init__`` signature, parameter
validation with clear errors, fitted-state checks, and a plain-JSON ``to_dict`` (name, params,
fitted state) that :func:`pcee.policies.registry.policy_from_dict` reverses.

Changing a parameter that the fitted state depends on (listed in ``_fit_params``) drops that state,
so a stale fit can never be used silently; parameters only applied at decision time (PCEE's delta,
threshold's tau) can be changed on a fitted policy, which is what a sweep does.
"""

from __future__ import annotations

import inspect
from typing import Any, Self

import numpy as np
from sklearn.exceptions import NotFittedError

from pcee.atomic import to_jsonable
from pcee.calibration.scores import confidence
from pcee.policies.base import ExitPolicy
from pcee.policies.rules import AskPolicy, ExitRule, ScoreThreshold

#: scores are in [0, 1], so thresholds 2 / -1 mean "nobody" / "everybody" and stay plain JSON
NEVER = 2.0
ALWAYS = -1.0


class PolicyEstimator(ExitPolicy):
    """Concrete policies define ``_rule()`` (their :class:`~pcee.policies.rules.ExitRule` from the fitted
    state); ``exit_mask``, ``expected_accuracy`` and ``exit_rule`` all come from it, so the runner and
    ``decide`` apply one implementation. A subclass that overrides ``exit_mask`` or
    ``expected_accuracy`` without its own ``_rule`` is asked through those instead (``exit_rule`` gives
    :class:`~pcee.policies.rules.AskPolicy`)."""

    #: parameters whose change invalidates the fitted state
    _fit_params: tuple[str, ...] = ()
    #: its decisions are its own exit_mask / expected_accuracy, not a rule (set per class, see __init_subclass__)
    _asks_itself: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "_rule" in own:
            cls._asks_itself = False
        elif "exit_mask" in own or "expected_accuracy" in own:
            cls._asks_itself = True

    def _rule(self) -> ExitRule:
        """The rule of the fitted state (concrete policies define it)."""
        raise NotImplementedError(f"policy {self.name!r} defines neither _rule nor exit_mask")

    def exit_rule(self) -> ExitRule:
        self._check_fitted()
        return AskPolicy(self) if self._asks_itself else self._rule()

    def exit_mask(self, level: int, logits: np.ndarray) -> np.ndarray:
        z = self._check_mask_level(level, logits)
        rule = self._rule()
        return rule.decide(level, z, confidence(z, rule.score))[0]

    def expected_accuracy(self, level: int, logits: np.ndarray) -> np.ndarray:
        z = self._check_level(level, logits)
        rule = self._rule()
        return rule.expected(level, z, confidence(z, rule.score))

    # -- parameters ---------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any) -> PolicyEstimator:
        valid = self._param_names()
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for policy {self.name!r}; valid: {', '.join(valid) or '(none)'}"
            )
        old = self.get_params()
        for key, value in params.items():
            setattr(self, key, value)
        try:
            self._validate_params()
        except ValueError:
            for key, value in old.items():
                setattr(self, key, value)
            raise
        changed = {k for k in params if not _same(old[k], params[k])}
        if changed & set(self._fit_params) and self.is_fitted:
            self._reset()
        elif changed:
            self._params_changed(changed)
        return self

    def _validate_params(self) -> None:
        """Raise ValueError naming any bad parameter (subclasses extend)."""

    def _params_changed(self, changed: set[str]) -> None:
        """Hook: decision-time parameters changed on a (possibly) fitted policy."""

    @classmethod
    def default_grid(cls) -> np.ndarray:
        """Default values of the swept parameter ``param_name``."""
        return np.round(np.arange(0, 201) * 0.005, 3)

    # -- fitted state -------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "num_exits_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"policy {self.name!r} is not fitted yet; call fit(logits, labels, flops) first")

    def _reset(self) -> None:
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, key)

    def _check_level(self, level: int, logits: np.ndarray) -> np.ndarray:
        self._check_fitted()
        if not 0 <= level < self.num_exits_:
            raise ValueError(f"exit level must be in [0, {self.num_exits_ - 1}], got {level}")
        z = np.asarray(logits)
        if z.ndim != 2:
            raise ValueError(f"logits of one exit must be (N, K), got shape {z.shape}")
        return z

    def _check_mask_level(self, level: int, logits: np.ndarray) -> np.ndarray:
        z = self._check_level(level, logits)
        if level >= self.num_exits_ - 1:
            raise ValueError(
                f"exit_mask is defined for non-final exits 0..{self.num_exits_ - 2}; the final exit always answers"
            )
        return z

    def _get_state(self) -> dict[str, Any]:
        return {"num_exits": int(self.num_exits_)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.num_exits_ = int(state["num_exits"])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: ``{"name", "params", "state"}`` (state is None before fit)."""
        return {
            "name": self.name,
            "params": to_jsonable(self.get_params()),
            "state": to_jsonable(self._get_state()) if self.is_fitted else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        if d.get("name") != cls.name:
            raise ValueError(f"dict describes policy {d.get('name')!r}, not {cls.name!r}")
        obj = cls(**d.get("params", {}))
        if d.get("state") is not None:
            obj._set_state(d["state"])
        return obj

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class FittedThresholdPolicy(PolicyEstimator):
    """A policy that fits one score threshold per exit (``thresholds_``, (L,)) and exits at the first
    l with s_l(x) >= thresholds_[l]; its expected accuracy is the raw score (no map).

    Subclasses set ``score`` and fit ``thresholds_`` (ALWAYS / NEVER for exits that take all / none).
    """

    score: str
    #: fitted per-exit thresholds (L,), set by the subclass's ``fit``
    thresholds_: np.ndarray

    def _rule(self) -> ExitRule:
        return ScoreThreshold(self.score, self.thresholds_)


def check_outputs(logits: np.ndarray, labels: np.ndarray | None, flops: np.ndarray | None = None) -> tuple:
    """Validate validation outputs: logits (N, L, K), labels (N,), cumulative flops (L,)."""
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty (N, L, K) array, got shape {logits.shape}")
    n, num_exits, num_classes = logits.shape
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got shape {labels.shape}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes - 1}]")
    if flops is not None:
        flops = np.asarray(flops, dtype=np.float64)
        if flops.shape != (num_exits,):
            raise ValueError(f"flops must be ({num_exits},), got shape {flops.shape}")
        if not np.all(np.isfinite(flops)) or np.any(flops <= 0) or np.any(np.diff(flops) < 0):
            raise ValueError("flops must be positive, finite and non-decreasing (cumulative cost F_l)")
    return logits, labels, flops


def first_passing_exit(passes: np.ndarray) -> np.ndarray:
    """Exit index (N,) from a bool (N, L-1) "exit l accepts" array: first True, else L-1."""
    n, m = passes.shape
    first = np.argmax(passes, axis=1) if m else np.zeros(n, dtype=np.int64)
    any_pass = passes.any(axis=1) if m else np.zeros(n, dtype=bool)
    return np.where(any_pass, first, m).astype(np.int64)


def check_unit(name: str, value: Any, low_open: bool = False, high_open: bool = False) -> None:
    """ValueError unless value is a real number in [0, 1] (optionally open at either end)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    bad = not np.isfinite(v) or v < 0 or v > 1 or (low_open and v == 0) or (high_open and v == 1)
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False
