"""Registry aliases: ``challenger`` (new candidate), ``champion`` (served), ``previous`` (rollback).

Stages are deprecated in MLflow and never used. Promotion moves the old champion to
``previous``; rollback swaps ``champion`` and ``previous``.
"""

from __future__ import annotations

from pcee.registry.client import client, registered_models

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
ALIASES = (CHALLENGER, CHAMPION, PREVIOUS)


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points to, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if (
            getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
            or "not found" in str(err).lower()
        ):
            return None
        raise


def aliases(name: str) -> dict[str, str | None]:
    return {alias: alias_version(name, alias) for alias in ALIASES}


def set_challenger(name: str, version: str) -> None:
    client().set_registered_model_alias(name, CHALLENGER, str(version))


def _check_version(name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().get_model_version(name, str(version))
    except MlflowException:
        known = sorted(int(mv.version) for mv in client().search_model_versions(f"name='{name}'"))
        raise ValueError(f"model {name!r} has no version {version}; versions: {known or 'none'}") from None


def promote(name: str, version: str) -> dict[str, str | None]:
    """Make ``version`` the champion; the old champion becomes ``previous``. Returns the aliases."""
    version = str(version)
    _check_version(name, version)
    c = client()
    old = alias_version(name, CHAMPION)
    if old == version:
        return aliases(name)
    if old is not None:
        c.set_registered_model_alias(name, PREVIOUS, old)
    c.set_registered_model_alias(name, CHAMPION, version)
    if alias_version(name, CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    return aliases(name)


def rollback(name: str) -> dict[str, str | None]:
    """Swap ``champion`` and ``previous`` (a second rollback undoes the first)."""
    c = client()
    champion, previous = alias_version(name, CHAMPION), alias_version(name, PREVIOUS)
    if previous is None:
        raise ValueError(f"model {name!r} has no 'previous' version to roll back to (aliases: {aliases(name)})")
    c.set_registered_model_alias(name, CHAMPION, previous)
    if champion is not None:
        c.set_registered_model_alias(name, PREVIOUS, champion)
    return aliases(name)


__all__ = [
    "ALIASES",
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS",
    "alias_version",
    "aliases",
    "promote",
    "registered_models",
    "rollback",
    "set_challenger",
]
