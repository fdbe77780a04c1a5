"""Several serving replicas (issue: scale-out): ``make up``'s hook lists N replicas on the ports after
``PCEE_SERVE_PORT``, behind the load balancer on that port and the fleet's coordinator. The real
fleet (supervisord, HAProxy, two replicas on one store, ``kill -9`` under load, a rolling reload) is
``tests/scale/test_fleet.py``; replicas without a balancer are measured by ``benchmarks/replicas_load.py``.
"""

from __future__ import annotations

import pytest

from pcee_dev.services import manager as services
from pcee_dev.services.hooks import serving

pytestmark = [pytest.mark.integration]

POLL_S = 0.5  # the replicas' model poll (make up: PCEE_SERVE_POLL_S, default 10 s)


# --- make up's hook (no servers) -------------------------------------------------------------------


@pytest.fixture
def hook(tmp_path, monkeypatch):
    """The serving hook and a services Config with its state dir in tmp_path; ``running`` stands for
    "the service was started", so the hook asks MLflow nothing."""
    cfg = services.Config(
        state_dir=tmp_path,
        prefect_port=4200,
        mlflow_port=5000,
        mlflow_backend_uri=f"sqlite:///{tmp_path / 'none.db'}",
        mlflow_artifacts_destination=str(tmp_path / "artifacts"),
        mlflow_workers=1,
    )
    monkeypatch.setattr(serving, "running", lambda c: ["http"])
    monkeypatch.setenv("PCEE_SERVE_PORT", "18100")
    monkeypatch.delenv("PCEE_SCALE_OUT", raising=False)
    return serving, cfg


def _ports(specs: list[dict]) -> list[int]:
    ports = []
    for s in specs:
        cmd = s["cmd"]
        port = int(cmd[cmd.index("--port") + 1])
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
        assert s["health_url"] == f"http://127.0.0.1:{port}/health" and s["url"] == f"http://127.0.0.1:{port}"
        ports.append(port)
    return ports


def test_hook_lists_replicas_behind_one_address(hook, monkeypatch):
    serving, cfg = hook
    monkeypatch.delenv("PCEE_SERVE_REPLICAS", raising=False)
    monkeypatch.delenv("PCEE_SERVE_STATS_PORT", raising=False)
    one = serving.specs(cfg)
    assert [s["name"] for s in one] == ["http", "fleet", "lb"]
    assert _ports(one[:1]) == [18101] and one[2]["url"] == "http://127.0.0.1:18100"  # the address: the balancer
    lb = one[2]["cmd"]
    assert lb[lb.index("--port") + 1] == "18100" and lb[lb.index("--stats-port") + 1] == "18102"

    monkeypatch.setenv("PCEE_SERVE_REPLICAS", "2")
    two = serving.specs(cfg)
    replicas = [s for s in two if s["name"].startswith("http")]
    assert [s["name"] for s in replicas] == ["http", "http-2"]
    assert _ports(replicas) == [18101, 18102]
    assert {s["group"] for s in replicas} == {2} and {s["group"] for s in two[2:]} == {3}
    # the same command (model, options) but for the port, and the same environment (store, registry);
    # no poll of their own: the coordinator reloads them one at a time
    assert [c for c in replicas[0]["cmd"] if c != "18101"] == [c for c in replicas[1]["cmd"] if c != "18102"]
    assert replicas[0]["env"] == replicas[1]["env"]
    cmd = replicas[0]["cmd"]
    assert cmd[cmd.index("--poll-interval") + 1] == "0"
    lb = two[-1]["cmd"]
    assert [lb[i + 1] for i, a in enumerate(lb) if a == "--replica"] == ["http=18101", "http-2=18102"]

    monkeypatch.setenv("PCEE_SCALE_OUT", "1")  # scale-out's default: 2 replicas
    monkeypatch.delenv("PCEE_SERVE_REPLICAS")
    assert [s["name"] for s in serving.specs(cfg)] == ["http", "http-2", "fleet", "lb"]
