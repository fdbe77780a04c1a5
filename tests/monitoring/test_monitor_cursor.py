"""The monitor flow's cursor (last request checked, last drift event) survives between runs."""

from __future__ import annotations

import json

from tests.monitoring.conftest import load_flow_module


def test_cursor_round_trip_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("PCEE_STATE_DIR", str(tmp_path))
    module = load_flow_module("monitor")
    assert module._read_cursor("pcee-digits-small-cnn") == {}
    module._write_cursor("pcee-digits-small-cnn", {"last_request_id": "abc", "events": 1})
    module._write_cursor("pcee-digits-small-cnn", {"last_request_id": "def", "events": 2})
    path = tmp_path / "monitor" / "pcee-digits-small-cnn" / "cursor.json"
    assert json.loads(path.read_text()) == {"last_request_id": "def", "events": 2}
    assert module._read_cursor("pcee-digits-small-cnn") == {"last_request_id": "def", "events": 2}
    assert [p.name for p in path.parent.iterdir()] == ["cursor.json"]  # no temporary left behind
