"""Every exit policy by name: build from parameters, or rebuild (fitted) from its JSON dict."""

from __future__ import annotations

from typing import Any

from pcee.policies.eero import EEROPolicy
from pcee.policies.estimator import PolicyEstimator
from pcee.policies.msdnet_budget import MSDNetBudgetPolicy
from pcee.policies.oracle import OraclePolicy
from pcee.policies.pcee import PCEEPolicy
from pcee.policies.pcee_ws import PCEEWSPolicy
from pcee.policies.risk_controlled import RiskControlledPCEEPolicy
from pcee.policies.temperature import TemperaturePolicy
from pcee.policies.threshold import ThresholdPolicy

_POLICIES: dict[str, type[PolicyEstimator]] = {
    cls.name: cls
    for cls in (
        PCEEPolicy,
        PCEEWSPolicy,
        ThresholdPolicy,
        TemperaturePolicy,
        MSDNetBudgetPolicy,
        EEROPolicy,
        OraclePolicy,
        RiskControlledPCEEPolicy,
    )
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
#: the registered policy that decides with labels: the physical limit the others' curves are compared with
LIMIT_POLICY: str = next(name for name, cls in _POLICIES.items() if cls.decides_with_labels)
#: policies with reliability maps and ``map_values`` (closed-form δ sweep)
PCEE_TYPE_POLICIES: tuple[str, ...] = ("pcee", "pcee-ws", "risk-controlled")


def get_policy_class(name: str) -> type[PolicyEstimator]:
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICY_NAMES)}")
    return _POLICIES[name]


def build_policy(name: str, **params: Any) -> PolicyEstimator:
    """An unfitted policy ``name`` with ``params`` (unknown or bad parameters raise ValueError)."""
    cls = get_policy_class(name)
    valid = cls._param_names()
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for policy {name!r}; valid: {', '.join(valid) or '(none)'}")
    return cls(**params)


def policy_from_dict(d: dict[str, Any]) -> PolicyEstimator:
    """Rebuild a policy (with its fitted state, if any) from :meth:`to_dict` output."""
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError("a policy dict needs at least a 'name' key (and 'params', 'state')")
    return get_policy_class(d["name"]).from_dict(d)
