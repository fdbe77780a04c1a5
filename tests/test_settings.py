"""pcee.settings: one model for every environment variable, validated, documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pcee.settings import CUDA_SERVE_MAX_BATCH, Settings, SettingsError
from pcee.stack import default_traffic_url

REPO = Path(__file__).resolve().parents[1]


def _var(field: str) -> str:
    return "MLFLOW_TRACKING_URI" if field == "mlflow_tracking_uri" else f"PCEE_{field.upper()}"


def test_every_setting_is_documented_on_the_architecture_page():
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = [_var(f) for f in Settings.model_fields if f"`{_var(f)}`" not in page]
    assert not missing, f"settings missing from docs/architecture.md: {missing}"


def test_environment_is_read_and_paths_resolved(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PCEE_STATE_DIR", "state")
    monkeypatch.setenv("PCEE_SERVE_PORT", "8123")
    monkeypatch.setenv("PCEE_TASK_RUNNER", " Dask ")
    monkeypatch.setenv("PCEE_TRAFFIC_SYNCHRONOUS", "full")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    s = Settings()
    assert s.state_dir == (tmp_path / "state").resolve() and s.state_dir.is_absolute()
    assert (s.serve_port, s.task_runner, s.traffic_synchronous) == (8123, "dask", "FULL")
    assert s.recorded_tracking_uri() == "http://127.0.0.1:1"
    assert default_traffic_url(s) == f"sqlite:///{tmp_path.resolve() / 'state' / 'traffic.db'}"
    with pytest.raises(ValidationError, match="frozen"):  # read once, passed inward, never mutated
        s.serve_port = 1  # type: ignore[misc]


def test_tracking_uri_recorded_by_make_up(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path))
    assert Settings().recorded_tracking_uri() is None
    (tmp_path / "services.json").write_text('{"mlflow_tracking_uri": "http://127.0.0.1:5999"}')
    assert Settings().recorded_tracking_uri() == "http://127.0.0.1:5999"


@pytest.mark.parametrize(
    "var,value,needle",
    [
        ("PCEE_SERVE_PORT", "eighty", "PCEE_SERVE_PORT='eighty'"),
        ("PCEE_SERVE_PORT", "70000", "PCEE_SERVE_PORT='70000': Input should be less than or equal to 65535"),
        ("PCEE_TASK_RUNNER", "ray", "PCEE_TASK_RUNNER='ray'"),
        ("PCEE_SERVE_SHADOW_FRACTION", "1.5", "PCEE_SERVE_SHADOW_FRACTION='1.5'"),
        ("PCEE_TRAFFIC_SYNCHRONOUS", "sometimes", "PCEE_TRAFFIC_SYNCHRONOUS='sometimes'"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match="bad pcee setting") as err:
        Settings()
    assert needle in str(err.value)


def test_library_io_defaults_follow_the_settings(monkeypatch, tmp_path):
    from pcee.dvc_repo import project_dir
    from pcee.traffic.store import TrafficStore

    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("PCEE_PROJECT_DIR", str(tmp_path / "p"))
    monkeypatch.delenv("PCEE_TRAFFIC_URL", raising=False)
    assert project_dir() == (tmp_path / "p").resolve()
    store = TrafficStore.from_settings(Settings())
    assert store.url == f"sqlite:///{(tmp_path / 's' / 'traffic.db').resolve()}"
    store.dispose()


def test_the_micro_batch_is_larger_on_cuda_unless_set(monkeypatch):
    monkeypatch.delenv("PCEE_SERVE_MAX_BATCH", raising=False)
    default = Settings.model_fields["serve_max_batch"].default
    assert Settings().serve_micro_batch() == default
    assert Settings(serve_device="cuda:1").serve_micro_batch() == CUDA_SERVE_MAX_BATCH != default
    assert Settings(serve_device="cuda", serve_max_batch=32).serve_micro_batch() == 32
    monkeypatch.setenv("PCEE_SERVE_MAX_BATCH", "48")
    assert Settings(serve_device="cuda").serve_micro_batch() == 48
