"""Registry aliases on a real MLflow registry (SQLite backend, no server): promote, roll back, refuse."""

from __future__ import annotations

import pytest

from pcee.registry.aliases import CHALLENGER, CHAMPION, PREVIOUS, aliases, promote, rollback, set_challenger
from pcee.registry.client import client, registered_models, tracking_uri
from pcee.settings import Settings

NAME = "pcee-test-model"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry with one model of three versions (sources are placeholders: aliases never read them)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = client()
    c.create_registered_model(NAME)
    for _ in range(3):
        c.create_model_version(NAME, source=(tmp_path / "artifacts").as_uri())
    return c


def test_promote_moves_the_old_champion_to_previous_and_clears_the_challenger(registry):
    assert registered_models() == [NAME]
    assert aliases(NAME) == {CHALLENGER: None, CHAMPION: None, PREVIOUS: None}
    assert promote(NAME, "1") == {CHALLENGER: None, CHAMPION: "1", PREVIOUS: None}
    set_challenger(NAME, "2")
    assert aliases(NAME)[CHALLENGER] == "2"
    assert promote(NAME, "2") == {CHALLENGER: None, CHAMPION: "2", PREVIOUS: "1"}
    assert promote(NAME, "2") == {CHALLENGER: None, CHAMPION: "2", PREVIOUS: "1"}  # promoting the champion: no-op


def test_rollback_swaps_and_a_second_rollback_undoes_it(registry):
    promote(NAME, "1")
    promote(NAME, "3")
    assert rollback(NAME)[CHAMPION] == "1"
    assert rollback(NAME) == {CHALLENGER: None, CHAMPION: "3", PREVIOUS: "1"}


def test_bad_requests_name_the_problem_and_change_nothing(registry):
    with pytest.raises(ValueError, match="no 'previous' version"):
        rollback(NAME)
    promote(NAME, "1")
    with pytest.raises(ValueError, match=r"has no version 7; versions: \[1, 2, 3\]"):
        promote(NAME, "7")
    assert aliases(NAME) == {CHALLENGER: None, CHAMPION: "1", PREVIOUS: None}


def test_without_a_tracking_server_the_error_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="set MLFLOW_TRACKING_URI or run `make up`"):
        tracking_uri(Settings(state_dir=tmp_path))
