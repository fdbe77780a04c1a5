"""Selective answering in the HTTP service, against real uvicorn servers on 127.0.0.1: abstained
answers in the API, the store and /metrics; the answer mode; deferral to a real second pcee service;
a fallback that is down, slow or failing; start-up errors; shadow runs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from pcee.serving.app import ServeConfig
from tests.serving.conftest import build_bundle, free_port

pytestmark = pytest.mark.integration

N = 40  # samples sent per test: the first N of the digits test split


def metrics(url: str) -> dict[str, float]:
    """/metrics as {"name{labels}": value} (one sample per line)."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def predict(url: str, x: np.ndarray) -> list[dict]:
    r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"]


@pytest.fixture(scope="session")
def selective_bundle(tmp_path_factory, digits_test):
    """A bundle with an answer rule whose ρ declines some of the first N test samples and answers the
    others: (bundle dir, ρ, which of the N are answered)."""
    from pcee.bundle import ModelBundle

    x, _ = digits_test
    tmp = tmp_path_factory.mktemp("selective")
    e = ModelBundle.load(build_bundle(tmp / "plain", logit_scale=30)).runner().run(x[:N]).expected_accuracy
    values = np.unique(e)
    assert values.size >= 3, f"the test bundle needs distinct expected accuracies, got {values}"
    rho = float(values[values.size // 2])
    rule = {
        "threshold": rho,
        "kind": "certified",
        "target_accuracy": 0.5,
        "risk": 0.1,
        "bound": "clopper-pearson",
        "n": 100,
    }
    out = build_bundle(tmp / "bundle", logit_scale=30, meta_extra={"answer_rule": rule})  # the same model and maps
    answered = e >= rho - 1e-12
    assert 0 < answered.sum() < N
    return out, rho, answered


def test_abstained_answers_in_api_store_and_metrics(server_factory, selective_bundle, digits_test):
    bundle, rho, expect_answered = selective_bundle
    x, y = digits_test
    srv = server_factory("--bundle", str(bundle), "--poll-interval", "0", "--shadow-fraction", "0", "--seed", "0")
    h = httpx.get(f"{srv.url}/health").json()
    assert (h["answer_mode"], h["answer_threshold"], h["answer_rule_kind"]) == ("abstain", rho, "certified")
    assert h["shadow_fraction"] == 0.0 and h["fallback_url"] is None
    res = predict(srv.url, x[:N])
    answered = np.array([a["answered"] for a in res])
    assert answered.tolist() == expect_answered.tolist()
    for a in res:
        assert a["abstained"] is (not a["answered"]) and a["deferred"] is False and a["deferral_failed"] is False
        assert a["answer_threshold"] == rho and a["answer_mode"] == "abstain" and a["shadow"] is False
        assert (a["expected_accuracy"] >= rho) is a["answered"]
        assert 0 <= a["prediction"] < 10 and "confidence" in a and "exit" in a  # the best guess is always there
    store = srv.store()
    for a in res:
        row = store.get_request(a["request_id"])
        assert row["decision"] == ("answered" if a["answered"] else "abstained")
        assert row["answer_threshold"] == rho and row["prediction"] == a["prediction"] and row["shadow"] is False
    n_ans = int(answered.sum())
    m = metrics(srv.url)
    assert m['pcee_decisions_total{decision="answered"}'] == n_ans
    assert m['pcee_decisions_total{decision="abstained"}'] == N - n_ans
    assert (
        m['pcee_decisions_total{decision="deferred"}'] == 0
        and m['pcee_decisions_total{decision="deferral_failed"}'] == 0
    )
    assert m["pcee_answer_threshold"] == pytest.approx(rho, rel=1e-5)
    assert m["pcee_window_coverage"] == pytest.approx(n_ans / N, rel=1e-5)
    mean_e = np.mean([a["expected_accuracy"] for a in res if a["answered"]])
    assert m["pcee_window_answered_expected_accuracy"] == pytest.approx(mean_e, rel=1e-5)
    # feedback: measured accuracy on answered requests
    for a, label in zip(res, y[:N], strict=True):
        assert (
            httpx.post(f"{srv.url}/feedback", json={"request_id": a["request_id"], "label": int(label)}).status_code
            == 200
        )
    httpx.post(
        f"{srv.url}/feedback", json={"request_id": res[0]["request_id"], "label": int(y[0])}
    )  # a repeat counts once
    m = metrics(srv.url)
    correct = sum(a["prediction"] == int(label) for a, label in zip(res, y[:N], strict=True) if a["answered"])
    assert m["pcee_feedback_answered_total"] == n_ans and m["pcee_feedback_answered_correct_total"] == correct
    s = store.selective_window()
    assert (s.n, s.answered, s.abstained) == (N, n_ans, N - n_ans)
    assert s.n_labelled_answered == n_ans and s.answered_accuracy_measured == pytest.approx(correct / n_ans)
    store.dispose()


def test_answer_mode_and_rho_zero_decline_nothing(server_factory, server, selective_bundle, digits_test):
    bundle, rho, _ = selective_bundle
    x, _ = digits_test
    srv = server_factory(
        "--bundle", str(bundle), "--poll-interval", "0", "--answer-mode", "answer", "--shadow-fraction", "0"
    )
    assert httpx.get(f"{srv.url}/health").json()["answer_threshold"] == rho
    res = predict(srv.url, x[:N])
    assert all(
        a["answered"] and not a["abstained"] and a["answer_mode"] == "answer" and a["answer_threshold"] == rho
        for a in res
    )
    assert metrics(srv.url)['pcee_decisions_total{decision="abstained"}'] == 0
    # the shared server's bundle has no answer rule: ρ = 0 in the default mode (abstain) declines nothing
    h = httpx.get(f"{server.url}/health").json()
    assert (h["answer_mode"], h["answer_threshold"], h["answer_rule_kind"]) == ("abstain", 0.0, "none")
    res = predict(server.url, x[:N])
    assert all(a["answered"] and not a["abstained"] and a["answer_threshold"] == 0.0 for a in res)


def test_deferral_to_a_real_second_service(server_factory, tmp_path, selective_bundle, digits_test):
    bundle, rho, expect_answered = selective_bundle
    x, _ = digits_test
    fb_bundle = build_bundle(tmp_path / "fallback-bundle", seed=1)  # another model, no answer rule (ρ = 0)
    fallback = server_factory(
        "--bundle", str(fb_bundle), "--poll-interval", "0", "--shadow-fraction", "0", sub="fallback"
    )
    fb_version = httpx.get(f"{fallback.url}/health").json()["model_version"]
    srv = server_factory(
        "--bundle",
        str(bundle),
        "--poll-interval",
        "0",
        "--shadow-fraction",
        "0",
        "--answer-mode",
        "defer",
        "--fallback-url",
        fallback.url,
    )
    assert httpx.get(f"{srv.url}/health").json()["fallback_url"] == fallback.url
    local = predict(fallback.url, x[:N])  # what the fallback answers for each sample
    n_fb_before = fallback.store().count_requests()
    res = predict(srv.url, x[:N])
    store = srv.store()
    for a, want_answered, fb in zip(res, expect_answered, local, strict=True):
        row = store.get_request(a["request_id"])
        if want_answered:
            assert a["answered"] and not a["deferred"] and "local_prediction" not in a
            assert row["decision"] == "answered" and row["fallback_prediction"] is None
        else:
            assert a["deferred"] is True and a["answered"] is False and a["deferral_failed"] is False
            assert a["prediction"] == fb["prediction"] and a["fallback_model_version"] == fb_version
            assert a["local_prediction"] == row["prediction"]  # our best guess, kept
            assert row["decision"] == "deferred" and row["fallback_prediction"] == fb["prediction"]
    n_def = int((~expect_answered).sum())
    assert fallback.store().count_requests() == n_fb_before + n_def  # the fallback saw the deferred samples only
    assert any(a["prediction"] != a["local_prediction"] for a in res if a["deferred"]), (
        "the models should differ somewhere"
    )
    m = metrics(srv.url)
    assert m['pcee_decisions_total{decision="deferred"}'] == n_def
    assert m['pcee_decisions_total{decision="answered"}'] == N - n_def
    assert store.selective_window().deferred == n_def
    store.dispose()


class _Fallback(BaseHTTPRequestHandler):
    """A tiny real HTTP fallback: ``mode`` "slow" sleeps longer than the timeout, "error" answers 500."""

    mode = "slow"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.mode == "slow":
            time.sleep(60.0)
        body = b'{"error": "boom"}'
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass


def test_fallback_slow_failing_or_down_gives_the_best_guess(server_factory, selective_bundle, digits_test):
    bundle, rho, expect_answered = selective_bundle
    x, _ = digits_test
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fallback)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    fb_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    srv = server_factory(
        "--bundle",
        str(bundle),
        "--poll-interval",
        "0",
        "--shadow-fraction",
        "0",
        "--answer-mode",
        "defer",
        "--fallback-url",
        fb_url,
        "--fallback-timeout-s",
        "0.5",
    )
    store = srv.store()

    def check(what: str) -> int:
        # a slow fallback sleeps far past the timeout, so an answer at all shows the timeout cut the wait
        # (the log's "no answer within 0.5 s" below says which path); no bound on the elapsed time here
        res = predict(srv.url, x[:N])
        for a, want_answered in zip(res, expect_answered, strict=True):
            row = store.get_request(a["request_id"])
            assert row["prediction"] == a["prediction"]  # the best guess
            if want_answered:
                assert a["answered"] and row["decision"] == "answered"
            else:
                assert a["deferral_failed"] is True and a["deferred"] is False and a["answered"] is False, what
                assert "fallback_model_version" not in a and "local_prediction" not in a
                assert row["decision"] == "deferral_failed" and row["fallback_prediction"] is None
        return int((~expect_answered).sum())

    failed = check("slow")
    _Fallback.mode = "error"
    failed += check("HTTP 500")
    httpd.shutdown()
    httpd.server_close()  # the port is closed now: connection refused
    failed += check("down")
    m = metrics(srv.url)
    assert m['pcee_decisions_total{decision="deferral_failed"}'] == failed
    assert m['pcee_decisions_total{decision="deferred"}'] == 0
    log = srv.log()
    assert "deferral of" in log and "no answer within 0.5 s" in log and "HTTP 500" in log and "ConnectError" in log
    assert srv.alive()
    store.dispose()


BAD_SETTINGS = [
    ({"answer_mode": "maybe"}, ["--answer-mode", "maybe"], "PCEE_SERVE_ANSWER_MODE='maybe'"),
    ({"answer_mode": "defer"}, ["--answer-mode", "defer"], "answer mode 'defer' needs a fallback URL"),
    (
        {"answer_mode": "defer", "fallback_url": "127.0.0.1:8001"},
        ["--answer-mode", "defer", "--fallback-url", "127.0.0.1:8001"],
        "fallback URL must be an absolute http(s) URL",
    ),
    ({"fallback_url": "ftp://x/y"}, ["--fallback-url", "ftp://x/y"], "fallback URL must be an absolute http(s) URL"),
    ({"fallback_timeout_s": 0.0}, ["--fallback-timeout-s", "0"], "PCEE_SERVE_FALLBACK_TIMEOUT_S=0.0"),
    ({"shadow_fraction": -0.1}, ["--shadow-fraction", "-0.1"], "PCEE_SERVE_SHADOW_FRACTION=-0.1"),
    ({"shadow_fraction": 1.5}, ["--shadow-fraction", "1.5"], "PCEE_SERVE_SHADOW_FRACTION=1.5"),
    ({"port": 0}, ["--port", "0"], "PCEE_SERVE_PORT=0"),  # one limit, in Settings: 0 is refused both ways
]


@pytest.mark.parametrize("kw, argv, needle", BAD_SETTINGS, ids=[b[2][:30] for b in BAD_SETTINGS])
def test_bad_settings_fail_at_start_up(kw, argv, needle, bundle_dir, tmp_path):
    with pytest.raises(ValueError) as err:
        ServeConfig(**kw).validate()
    assert needle in str(err.value)
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pcee.cli",
            "serve",
            "--bundle",
            str(bundle_dir),
            "--port",
            str(port),
            "--traffic-url",
            f"sqlite:///{tmp_path / 't.db'}",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t.db").exists()  # refused before opening the store or loading the model


def test_pcee_serve_entry_point_exits_with_the_message(bundle_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pcee.cli", "serve", "--bundle", str(bundle_dir), "--answer-mode", "defer"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "pcee serve: error: answer mode 'defer' needs a fallback URL" in proc.stderr


def test_shadow_rows_run_to_the_final_exit_and_store_their_inputs(server_factory, bundle_dir, digits_test):
    from pcee.bundle import ModelBundle

    x, _ = digits_test
    srv = server_factory(
        "--bundle", str(bundle_dir), "--poll-interval", "0", "--shadow-fraction", "1.0", "--store-fraction", "0"
    )
    assert httpx.get(f"{srv.url}/health").json()["shadow_fraction"] == 1.0
    res = predict(srv.url, x[:N])
    assert all(a["shadow"] is True for a in res)
    full = ModelBundle.load(bundle_dir).runner().run_all_exits(x[:N])  # the final exit, computed here
    store = srv.store()
    for j, a in enumerate(res):
        row = store.get_request(a["request_id"])
        assert row["shadow"] is True and row["final_prediction"] == int(full.final_prediction[j])
        assert row["input_stored"] == 1 and np.array_equal(
            store.get_input(a["request_id"]), x[j]
        )  # despite store-fraction 0
        np.testing.assert_allclose(row["shadow_confidences"], full.confidences[j], rtol=1e-5)
        assert all(c is None for c in row["confidences"][a["exit"] + 1 :])  # the served path's record is unchanged
    sh = store.shadow_rows()
    assert sorted(sh.ids) == sorted(a["request_id"] for a in res)
    assert sh.x.shape == (N, 1, 8, 8)
    by_id = {a["request_id"]: j for j, a in enumerate(res)}
    assert [int(full.final_prediction[by_id[i]]) for i in sh.ids] == sh.final_prediction.tolist()
    m = metrics(srv.url)
    agree = sum(a["prediction"] == int(full.final_prediction[j]) for j, a in enumerate(res))
    assert m["pcee_shadow_runs_total"] == N and m["pcee_shadow_agreement_total"] == agree
    assert agree >= sum(a["exit"] == 2 for a in res)  # a sample answered at the final exit always agrees
    store.dispose()


def test_default_shadow_fraction_marks_only_shadow_rows(server, digits_test):
    """The shared server runs the default shadow fraction (0.02): a row has a final prediction and
    shadow confidences exactly when its answer says ``shadow``."""
    assert httpx.get(f"{server.url}/health").json()["shadow_fraction"] == 0.02
    x, _ = digits_test
    res = predict(server.url, x[:N])
    store = server.store()
    for a in res:
        row = store.get_request(a["request_id"])
        assert row["shadow"] is a["shadow"] and (row["final_prediction"] is not None) is a["shadow"]
        assert (row["shadow_confidences"] is not None) is a["shadow"]
    m = metrics(server.url)
    assert (
        m["pcee_shadow_runs_total"] <= m["pcee_predictions_total"]
        and m["pcee_shadow_agreement_total"] <= m["pcee_shadow_runs_total"]
    )
    store.dispose()


def test_pyfunc_rows_carry_the_service_answer_columns(selective_bundle, digits_test):
    """The MLflow pyfunc model (loaded from the bundle directory as MLflow would hand it over) returns
    the service's answer columns, from the same function (mode abstain, ρ from the bundle meta)."""
    from types import SimpleNamespace

    from pcee.registry.pyfunc_model import PceeModel

    bundle, rho, expect_answered = selective_bundle
    x, _ = digits_test
    model = PceeModel()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
    got = model.predict(None, x[:N])
    assert list(got.columns) == [
        "prediction",
        "exit",
        "confidence",
        "expected_accuracy",
        "flops",
        "answered",
        "abstained",
        "answer_threshold",
    ]
    assert got["answered"].tolist() == expect_answered.tolist()
    assert got["abstained"].tolist() == (~expect_answered).tolist()
    assert (got["answer_threshold"] == rho).all()
