"""S3 artifacts: a real S3-compatible server (pcee_dev's moto launcher, auth enforced) on 127.0.0.1, a real
MLflow server proxying its artifacts to ``s3://<bucket>/mlflow``, DVC pushing to ``s3://<bucket>/dvc``,
and wrong credentials failing a registration before anything is registered."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pcee import dvc_repo
from pcee.settings import Settings
from pcee_dev import s3
from pcee_dev.mlflow_server import mlflow_server_cmd
from pcee_dev.proc import free_port, listening_sockets, tail

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
BUCKET = "pcee-test"
MODEL = "pcee-s3-test"
QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PYTHONUNBUFFERED": "1",
}


class Proc:
    """A server process in its own process group, logging to a file; ``stop`` ends the whole group."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{url}: exited {self.proc.returncode}; log {self.log}:\n{tail(self.log)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{url} not healthy after {timeout}s; log {self.log}:\n{tail(self.log)}")

    def terminate(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self) -> int | None:
        self.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        return self.proc.returncode


@dataclass
class MlflowS3:
    url: str
    backend: str
    root: Path
    proc: Proc
    bad: Proc | None = None  # a second server on the same backend whose S3 secret is wrong (the fault)
    bad_url: str = ""


@dataclass
class LocalS3:
    settings: Settings
    endpoint: str
    creds: s3.S3Credentials
    proc: Proc
    mlflow: MlflowS3
    procs: list[Proc]  # everything the module started: stopped together at the end

    def keys(self, prefix: str) -> set[str]:
        client = s3.s3_client(self.endpoint, self.creds, s3.LOCAL_REGION)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}

    def get(self, key: str) -> bytes:
        client = s3.s3_client(self.endpoint, self.creds, s3.LOCAL_REGION)
        return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def start_local_s3(state: Path, port: int) -> Proc:
    state.mkdir(parents=True, exist_ok=True)
    proc = Proc(s3.server_command(port, state), state / "s3.log", {**os.environ, **QUIET})
    proc.wait_http(f"http://127.0.0.1:{port}{s3.HEALTH_PATH}", 60)
    found = listening_sockets([proc.proc.pid])
    assert {ip for _, ip, _ in found} == {"127.0.0.1"} and port in {p for *_, p in found}, found
    return proc


@pytest.fixture(scope="module")
def local_s3(tmp_path_factory):
    """The S3 server, and (started at the same time, to overlap the start-ups) the MLflow server
    that ``mlflow_s3`` waits for."""
    state = tmp_path_factory.mktemp("s3-state")
    settings = Settings(state_dir=state, artifacts="s3", s3_port=free_port(), s3_bucket=BUCKET)
    root = tmp_path_factory.mktemp("mlflow-s3")
    backend = f"sqlite:///{root / 'mlflow.db'}"
    procs = []
    s3.ensure_local_credentials(state)  # as make up does: the keys exist before anything reads them
    try:
        # MLflow needs the endpoint and keys in its environment, not a running S3 server, to start
        mlflow, url = launch_mlflow(root, "mlflow", backend, settings, s3.client_env(settings))
        procs.append(mlflow)
        procs.append(start_local_s3(state, settings.s3_port))
        endpoint = s3.endpoint_url(settings)
        creds = s3.local_credentials(state)
        assert s3.ensure_bucket(endpoint, BUCKET, creds, s3.LOCAL_REGION) is True
        assert s3.ensure_bucket(endpoint, BUCKET, creds, s3.LOCAL_REGION) is False  # idempotent
        yield LocalS3(settings, endpoint, creds, procs[1], MlflowS3(url, backend, root, mlflow), procs)
    finally:
        for proc in procs:  # all at once: the servers shut down in parallel
            proc.terminate()
        for proc in procs:
            proc.stop()


def launch_mlflow(root: Path, name: str, backend: str, settings: Settings, env: dict[str, str]) -> tuple[Proc, str]:
    """Start an MLflow server proxying artifacts to the bucket; the caller waits for ``<url>/health``."""
    port = free_port()
    cmd = mlflow_server_cmd(port, s3.artifacts_destination(settings), backend=backend)
    return Proc(cmd, root / f"{name}.log", {**os.environ, **QUIET, **env}), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def mlflow_s3(local_s3):
    m = local_s3.mlflow
    m.proc.wait_http(f"{m.url}/health", 120)
    # started once the backend is migrated, to come up while the first tests run
    wrong = {**s3.client_env(local_s3.settings), "AWS_SECRET_ACCESS_KEY": "W" * 40}
    m.bad, m.bad_url = launch_mlflow(m.root, "mlflow-bad-creds", m.backend, local_s3.settings, wrong)
    local_s3.procs.append(m.bad)  # stopped with the others by local_s3
    return m


def make_bundle(path: Path, tag: str) -> Path:
    """A stand-in bundle: the files fetch_bundle looks for, with content that must round-trip."""
    path.mkdir(parents=True)
    (path / "model.json").write_text(f'{{"tag": "{tag}"}}\n')
    (path / "policy.json").write_text('{"thresholds": [0.5]}\n')
    (path / "weights.bin").write_bytes(os.urandom(200_000))
    return path


def register(bundle: Path, run_name: str) -> tuple[str, str]:
    from pcee.registry.tracking import log_and_register

    return log_and_register(
        experiment="pcee-s3",
        run_name=run_name,
        model_name=MODEL,
        bundle_dir=bundle,
        params={"engine": "s3"},
        metrics={"accuracy": 0.9},
        tags={"data_md5": "x"},
    )


@pytest.fixture(scope="module")
def champion(mlflow_s3, local_s3, tmp_path_factory):
    """Version 1 registered through the S3-backed server and promoted to champion (as the flows do)."""
    from pcee.registry import promote

    bundle = make_bundle(tmp_path_factory.mktemp("bundle") / "bundle", "v1")
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_s3.url
    try:
        run_id, version = register(bundle, "v1")
        promote(MODEL, version)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return run_id, version, bundle


def test_mlflow_artifacts_live_in_the_bucket_and_round_trip(local_s3, mlflow_s3, champion, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pcee.registry.fetch import fetch_bundle

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3.url)
    run_id, version, bundle = champion
    run = MlflowClient(mlflow_s3.url).get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied by the server

    keys = local_s3.keys("mlflow/")
    weights = [k for k in keys if k.endswith("/weights.bin")]
    assert weights and any(k.endswith("/MLmodel") for k in keys), sorted(keys)
    assert local_s3.get(weights[0]) == (bundle / "weights.bin").read_bytes()  # in S3, byte for byte

    got = fetch_bundle(MODEL, version, tmp_path / "dl", tracking_uri=mlflow_s3.url)
    for name in ("model.json", "policy.json", "weights.bin"):
        assert (got / name).read_bytes() == (bundle / name).read_bytes()
    # nothing went to a local artifact directory: the server was given only s3://
    assert not list(mlflow_s3.root.rglob("weights.bin"))
    # MLflow 3 hands the client presigned S3 URLs for downloads: the server verified and served them
    s3_log = local_s3.proc.log.read_text(errors="replace")
    assert re.search(r"GET /pcee-test/mlflow/\S+X-Amz-Signature=\S+ HTTP/1.1\" 20[06]", s3_log), tail(local_s3.proc.log)
    assert '" 500 ' not in s3_log, tail(local_s3.proc.log)


def test_wrong_s3_credentials_fail_registration_and_keep_the_champion(
    local_s3, mlflow_s3, champion, tmp_path, monkeypatch
):
    """The fault: the MLflow server's S3 secret is wrong. The registration fails (the server's log
    names S3's refusal), no version is added, nothing is written to the bucket, the champion stays."""
    from pcee.registry import aliases
    from pcee.registry.tracking import client

    _, version, _ = champion
    assert mlflow_s3.bad is not None
    mlflow_s3.bad.wait_http(f"{mlflow_s3.bad_url}/health", 120)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3.url)
    before_aliases, before_versions = aliases(MODEL), len(client().search_model_versions(f"name='{MODEL}'"))
    before_keys = local_s3.keys("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3.bad_url)
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:  # noqa: PT011 - MLflow's exception type varies
        register(make_bundle(tmp_path / "bundle", "v2"), "v2-bad-creds")
    elapsed = time.monotonic() - t0
    # the client sees the artifact upload fail (HTTP 500 / reset); S3's reason is in the server's log
    assert "mlflow-artifacts" in str(err.value), str(err.value)
    print(f"the failure took {elapsed:.0f}s")  # reported: no timing assertion in a test
    server_log = mlflow_s3.bad.log.read_text(errors="replace")
    assert "SignatureDoesNotMatch" in server_log, tail(mlflow_s3.bad.log)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3.url)
    assert aliases(MODEL) == before_aliases and before_aliases["champion"] == version
    assert len(client().search_model_versions(f"name='{MODEL}'")) == before_versions
    assert local_s3.keys("") == before_keys


def test_dvc_pushes_and_pulls_through_the_s3_remote(local_s3, tmp_path, monkeypatch):
    state, repo = local_s3.settings.state_dir, tmp_path / "repo"
    for key, value in {
        "PCEE_STATE_DIR": str(state),
        "PCEE_ARTIFACTS": "s3",
        "PCEE_S3_PORT": str(local_s3.settings.s3_port),
        "PCEE_S3_BUCKET": BUCKET,
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("PCEE_DVC_REMOTE_URL", "PCEE_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc_repo.run_dvc(["init", "-q"], repo)
    (repo / "data").mkdir()
    payload = os.urandom(50_000)
    (repo / "data" / "x.bin").write_bytes(payload)
    (repo / "data" / "labels.csv").write_text("a,b\n1,2\n")

    info = dvc_repo.version_data("data", repo)
    assert info["remote"] == f"s3://{BUCKET}/dvc"
    config_local = (repo / ".dvc" / "config.local").read_text()
    assert local_s3.endpoint in config_local and local_s3.creds.secret_access_key not in config_local
    assert (
        not (repo / ".dvc" / "config").read_text().strip()
        or "endpointurl" not in (repo / ".dvc" / "config").read_text()
    )
    keys = local_s3.keys("dvc/")
    md5 = info["md5"]  # DVC's layout on a cloud remote: files/md5/<2 hex>/<rest>
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys, sorted(keys)
    assert payload in {local_s3.get(k) for k in keys}

    # a fresh checkout's view: no workspace copy, no cache; pull brings the bytes back from S3
    for path in (repo / "data", repo / ".dvc" / "cache"):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    dvc_repo.run_dvc(["pull"], repo)
    assert (repo / "data" / "x.bin").read_bytes() == payload

    # the path a real bucket takes: PCEE_S3_ENDPOINT_URL plus the user's AWS_* (here: a wrong secret)
    monkeypatch.setenv("PCEE_S3_ENDPOINT_URL", local_s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", local_s3.creds.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "W" * 40)
    with pytest.raises(RuntimeError, match=r"dvc status --cloud") as err:
        dvc_repo.run_dvc(["status", "--cloud"], repo)
    assert any(word in str(err.value) for word in ("403", "Forbidden", "SignatureDoesNotMatch")), str(err.value)


def test_credentials_file_is_private_and_stable(local_s3):
    path = s3.credentials_path(local_s3.settings.state_dir)
    assert path.stat().st_mode & 0o777 == 0o600
    assert s3.local_credentials(local_s3.settings.state_dir) == local_s3.creds  # generated once
    env = s3.client_env(local_s3.settings)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == local_s3.endpoint
    assert env["AWS_ACCESS_KEY_ID"] == local_s3.creds.access_key_id
    assert "***" in repr(local_s3.creds) and local_s3.creds.secret_access_key not in repr(local_s3.creds)
    # the server refuses unsigned requests and moto's unauthenticated control API
    assert httpx.get(f"{local_s3.endpoint}/{BUCKET}").status_code == 403
    assert httpx.post(f"{local_s3.endpoint}/moto-api/reset-auth", content=b"inf").status_code == 403
    with pytest.raises(s3.S3Error, match="credentials refused"):
        s3.ensure_bucket(local_s3.endpoint, BUCKET, s3.S3Credentials("AKIAWRONGWRONGWRONG0", "x" * 40))
    # presigned GETs (MLflow hands them to clients for downloads) are checked, not waved through
    client = s3.s3_client(local_s3.endpoint, local_s3.creds, s3.LOCAL_REGION)
    client.put_object(Bucket=BUCKET, Key="presign/a b.txt", Body=b"0123456789")
    params = {"Bucket": BUCKET, "Key": "presign/a b.txt", "ResponseContentDisposition": 'attachment; filename="a b"'}
    url = client.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
    assert httpx.get(url).content == b"0123456789"
    assert httpx.get(url, headers={"Range": "bytes=2-4"}).content == b"234"
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    forged = s3.s3_client(local_s3.endpoint, s3.S3Credentials(local_s3.creds.access_key_id, "z" * 40), s3.LOCAL_REGION)
    assert httpx.get(forged.generate_presigned_url("get_object", Params=params)).status_code == 403


def test_objects_survive_a_restart(tmp_path):
    """moto keeps objects in memory: the launcher's snapshot brings them back after make down/up."""
    state, port = tmp_path / "state", free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_local_s3(state, port)
    try:
        creds = s3.local_credentials(state)
        s3.ensure_bucket(endpoint, "keep", creds, s3.LOCAL_REGION)
        s3.s3_client(endpoint, creds, s3.LOCAL_REGION).put_object(Bucket="keep", Key="a/b.txt", Body=b"kept")
    finally:
        assert proc.stop() == 0  # a clean stop writes the snapshot
    proc = start_local_s3(state, port)
    try:
        got = s3.s3_client(endpoint, creds, s3.LOCAL_REGION).get_object(Bucket="keep", Key="a/b.txt")
        assert got["Body"].read() == b"kept"
        assert s3.ensure_bucket(endpoint, "keep", creds, s3.LOCAL_REGION) is False
    finally:
        proc.stop()
