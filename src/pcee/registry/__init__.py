"""MLflow edge: tracking, the pyfunc model (models-from-code), registry aliases and the gate."""

from pcee.registry.aliases import (
    ALIASES,
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    alias_version,
    aliases,
    promote,
    rollback,
    set_challenger,
)
from pcee.registry.gate import Evaluation, GateDecision, gate
from pcee.registry.tracking import log_and_register, registered_name, tracking_uri

__all__ = [
    "ALIASES",
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS",
    "Evaluation",
    "GateDecision",
    "alias_version",
    "aliases",
    "gate",
    "log_and_register",
    "promote",
    "registered_name",
    "rollback",
    "set_challenger",
    "tracking_uri",
]
