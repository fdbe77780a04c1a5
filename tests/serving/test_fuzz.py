"""The real service fuzzed against its own OpenAPI schema (schemathesis): every operation, a fixed seed
and a bounded number of examples (>= 1,000 requests), checking for server errors, undocumented status
codes and content types, and responses that do not match their schema; the service runs with a token,
so schemathesis also checks that /feedback refuses requests without it. The run prints what it tried
(the summary below the test session), and a failing case comes with schemathesis's account of it and a
curl line that reproduces it (then added to REGRESSIONS below). The longer run is ``benchmarks/fuzz_api.py``.

The requests that broke the service before (issue 30) are regression tests here, on one keep-alive
connection that must stay usable after each refusal."""

from __future__ import annotations

import json

import httpx
import pytest

from benchmarks.fuzz_api import CHECKS, run_schemathesis

TOKEN = "fuzz-token-0123456789abcdef"
#: per operation and run. One schemathesis run generates from ~160 to ~1,700 requests: its fuzzing of
#: /predict (nested arrays of 64 numbers a sample) sometimes ends after a few examples. So the test runs
#: seeds 30, 31, ... until 1,000 requests are reached; every run generates at least ~150 (the coverage
#: phase and /feedback), so MAX_RUNS runs always reach it.
MAX_EXAMPLES = 300
SEED = 30
MIN_REQUESTS = 1000
MAX_RUNS = 12


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, bundle_dir):
    from tests.serving.conftest import start_server

    s = start_server(
        tmp_path_factory.mktemp("fuzz"),
        *("--bundle", str(bundle_dir), "--poll-interval", "0", "--max-wait-ms", "0", "--shadow-fraction", "0"),
        env={"PCEE_SERVE_TOKEN": TOKEN},
    )
    yield s
    s.stop()


def summary(report: dict) -> str:
    """One paragraph: what one run tried, per operation and phase, and what failed."""
    cases = report["test_cases"]
    lines = [
        f"schemathesis {report['schemathesis_version']} seed {report['seed']}: {cases['generated']} requests generated "
        f"over {report['operations']['tested']}/{report['operations']['total']} operations in "
        f"{report['running_time']:.1f} s; failures {cases['with_failures']} (unique {cases['unique_failures']}), "
        f"errors {cases['errored']}"
    ]
    for op, phases in report.get("valid_rates", {}).items():
        parts = [f"{phase}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) for phase, counts in phases.items()]
        lines.append(f"  {op}: " + "; ".join(parts))
    return "\n".join(lines)


@pytest.mark.integration
@pytest.mark.timeout(600)  # a bound, not a measurement: the runs take ~20-70 s on the 2-core machine
def test_schemathesis_finds_nothing(fuzzed, tmp_path, record_property):
    texts, total, seconds = [], 0, 0.0
    for run in range(MAX_RUNS):
        report, console = run_schemathesis(
            fuzzed.url, tmp_path / f"run{run}", MAX_EXAMPLES, SEED + run, token=TOKEN, timeout=600
        )
        texts.append(summary(report))
        total += report["test_cases"]["generated"]
        seconds += report["running_time"]
        failures = json.dumps(report["failures"], indent=1)[:6000]
        # a failure's console account names the check and gives a curl line that reproduces it
        assert report["test_cases"]["with_failures"] == 0 and not report["failures"], (
            f"{texts[-1]}\n{failures}\n{console[-6000:]}"
        )
        assert report["test_cases"]["errored"] == 0 and not report["errors"], f"{texts[-1]}\n{console[-4000:]}"
        assert report["operations"]["tested"] == report["operations"]["total"] == 4, texts[-1]
        if total >= MIN_REQUESTS:
            break
    text = (
        f"{total} requests in {len(texts)} run(s), {seconds:.1f} s of schemathesis; 0 failures; checks "
        f"{', '.join(CHECKS)}\n" + "\n".join(texts)
    )
    record_property("schemathesis", text)  # printed under the session (tests/conftest.py)
    print(text)
    assert total >= MIN_REQUESTS, text
    assert fuzzed.alive()


REGRESSIONS = [
    # (what, path, body, status): each broke the service before (issue 30)
    ("5000-digit integer pixel", "/predict", b'{"inputs": [' + b"1" * 5000 + b"]}", 422),
    ("pixel beyond float64", "/predict", b'{"inputs": [[' + b", ".join([b"1e400"] * 8) + b"]]}", 422),
    ("4301-digit negative integer", "/predict", b'{"inputs": [-' + b"9" * 4301 + b"]}", 422),
    ("21-digit label", "/feedback", b'{"request_id": "%s", "label": 373428038193593712640}', 422),
    ("5000-digit label", "/feedback", b'{"request_id": "%s", "label": ' + b"7" * 5000 + b"}", 422),
    ("label 11 of a 10-class model", "/feedback", b'{"request_id": "%s", "label": 11}', 422),
    ("label 1000000", "/feedback", b'{"request_id": "%s", "label": 1000000}', 422),
    ("an id no request has", "/feedback", b'{"request_id": "00000000-0000-4000-8000-000000000000", "label": 1}', 404),
    ("an id that is no UUID", "/feedback", b'{"request_id": "abc", "label": 1}', 422),
]


@pytest.mark.integration
def test_what_broke_the_service_is_a_4xx_and_the_connection_stays_usable(fuzzed, digits_test):
    x, y = digits_test
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    with httpx.Client(base_url=fuzzed.url, timeout=30, headers=auth) as c:
        rid = c.post("/predict", json={"inputs": x[0].tolist()}).json()["request_id"]
        for what, path, body, status in REGRESSIONS:
            r = c.post(path, content=body.replace(b"%s", rid.encode()))
            assert r.status_code == status, (what, r.status_code, r.text[:300])
            assert set(r.json()) == {"error", "status"}, what
            ok = c.post("/predict", json={"inputs": x[1].tolist()})  # the same keep-alive connection
            assert ok.status_code == 200, (what, ok.text[:300])
        assert "valid labels are 0..9" in c.post("/feedback", json={"request_id": rid, "label": 10}).json()["error"]
        assert c.post("/feedback", json={"request_id": rid, "label": int(y[0])}).status_code == 200
        again = c.post("/feedback", json={"request_id": rid, "label": (int(y[0]) + 1) % 10})
        assert again.status_code == 409  # relabelling keeps its 409
    assert fuzzed.store().get_feedback(rid) == int(y[0])


def test_the_schema_states_the_served_model(fuzzed):
    spec = httpx.get(f"{fuzzed.url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["label"]["minimum"] == 0 and body["properties"]["label"]["maximum"] == 9
    assert body["properties"]["request_id"]["format"] == "uuid"
    inputs = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    one = inputs["properties"]["inputs"]["anyOf"][0]  # one sample: [1, 8, 8], pixels in [0, 1]
    assert (one["minItems"], one["items"]["minItems"], one["items"]["items"]["minItems"]) == (1, 8, 8)
    assert one["items"]["items"]["items"] == {"type": "number", "minimum": 0, "maximum": 1}
