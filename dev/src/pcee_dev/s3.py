"""The local S3-compatible server of the scaled-out stack (development tools: ``make up``, tests):
moto's standalone server with authentication enforced, its keys, its bucket and its readiness. The
library reads only the addresses and keys (:mod:`pcee.stack.s3`, re-exported here).

``make up`` starts it on ``127.0.0.1:PCEE_S3_PORT`` (``python -m pcee_dev.s3``) when
``PCEE_ARTIFACTS=s3`` and no ``PCEE_S3_ENDPOINT_URL`` names an S3 API of your own.

The server is not an open test double: it enforces AWS Signature V4 against one IAM user whose keys
are generated once (:func:`ensure_local_credentials`) and kept in ``<state>/s3/credentials`` (mode
0600, AWS shared-credentials format), so a wrong key or secret is refused (``InvalidAccessKeyId`` /
``SignatureDoesNotMatch``) as on AWS. Its ``/moto-api`` control endpoints (reset, disable auth)
are refused. moto keeps objects in memory; the server snapshots them to ``<state>/s3/data``
every few seconds and when it stops, and loads the snapshot when it starts, so artifacts outlive
``make down``.

Imports: the standard library and boto3; moto only inside :func:`serve` (the server process), which
hands what it imported to its steps.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import signal
import string
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pcee.settings import Settings

# the addresses and keys are the library's (pcee.stack.s3), re-exported beside the server
from pcee.stack.s3 import (
    LOCAL_REGION,
    LOCAL_USER,
    S3Credentials,
    S3Error,
    artifacts_destination,
    client_env,
    credentials_path,
    dvc_remote_url,
    endpoint_url,
    is_local,
    local_credentials,
    read_credentials,
    s3_dir,
)

__all__ = [
    "LOCAL_REGION",
    "LOCAL_USER",
    "S3Credentials",
    "S3Error",
    "artifacts_destination",
    "client_env",
    "credentials_path",
    "dvc_remote_url",
    "endpoint_url",
    "is_local",
    "local_credentials",
    "read_credentials",
    "s3_dir",
    "ensure_bucket",
    "ensure_local_credentials",
    "local_ready",
    "reachable",
    "s3_client",
    "serve",
    "server_command",
    "verify_presigned",
    "wait_reachable",
]


SNAPSHOT_INTERVAL_S = 2.0
#: the local server answers this path with 200 without credentials: the readiness check
HEALTH_PATH = "/pcee-s3-health"


# --- credentials --------------------------------------------------------------------------------


def _generate() -> S3Credentials:
    # AWS's shapes: "AKIA" + 16 upper-case alphanumerics (moto treats AKIA keys as IAM user keys), 40-char secret
    upper = string.ascii_uppercase + string.digits
    key_id = "AKIA" + "".join(secrets.choice(upper) for _ in range(16))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits + "+/") for _ in range(40))
    return S3Credentials(key_id, secret)


def ensure_local_credentials(state_dir: str | os.PathLike) -> S3Credentials:
    """The local server's keys: read from ``<state>/s3/credentials``, generated there (0600) the first
    time (``make up``, before anything reads them)."""
    path = credentials_path(state_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        creds = _generate()
        text = (
            f"# keys of pcee's local S3 server (make up); generated once, never committed\n[{LOCAL_USER}]\n"
            f"aws_access_key_id = {creds.access_key_id}\naws_secret_access_key = {creds.secret_access_key}\n"
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # 0600 from the start, not chmod after
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent first start keeps one set of keys
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return read_credentials(path)


# --- client side: readiness and the bucket ------------------------------------------------------


def reachable(endpoint: str, timeout: float = 2.0) -> bool:
    """True when something answers HTTP at ``endpoint`` (any status: an S3 API refuses anonymous calls).

    For pcee's local server use ``endpoint + HEALTH_PATH``: it answers once its snapshot is loaded.
    """
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def local_ready(endpoint: str, timeout: float = 2.0) -> bool:
    """True when pcee's local S3 server answers its health path with 200 (its snapshot is loaded)."""
    try:
        with urllib.request.urlopen(endpoint + HEALTH_PATH, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_reachable(endpoint: str, timeout: float = 30.0, log: str | os.PathLike | None = None) -> None:
    """Wait until :func:`reachable`; :class:`S3Error` naming the endpoint (and the server's log) on timeout."""
    deadline = time.monotonic() + timeout
    while not reachable(endpoint):
        if time.monotonic() > deadline:
            where = f"; log: {log}" if log else ""
            raise S3Error(f"S3 endpoint {endpoint} not answering after {timeout:.0f}s{where}")
        time.sleep(0.2)


def s3_client(endpoint: str | None, credentials: S3Credentials | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client; ``credentials`` None: boto3's own chain (env, profile, instance role)."""
    import boto3
    from botocore.config import Config

    keys = {}
    if credentials is not None:
        keys = {"aws_access_key_id": credentials.access_key_id, "aws_secret_access_key": credentials.secret_access_key}
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=Config(
            signature_version="s3v4",
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        ),
        **keys,
    )


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


def ensure_bucket(
    endpoint: str | None, bucket: str, credentials: S3Credentials | None = None, region: str | None = None
) -> bool:
    """Create ``bucket`` unless it exists (idempotent); returns True when it was created.

    Raises :class:`S3Error` naming the endpoint and bucket: credentials refused, endpoint down, ...
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    client = s3_client(endpoint, credentials, region)
    where = f"bucket {bucket!r} at {endpoint or 'AWS S3'}"
    try:
        try:
            client.head_bucket(Bucket=bucket)
            return False
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if region and region != "us-east-1":  # AWS rejects an explicit us-east-1 constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            client.create_bucket(**kwargs)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False  # a concurrent start created it
            raise
        return True
    except NoCredentialsError:
        raise S3Error(
            f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        ) from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code"))
        if code in _CREDENTIAL_CODES or code == "403":
            raise S3Error(f"{where}: S3 credentials refused ({code}): {err}") from None
        raise S3Error(f"{where}: {err}") from None
    except BotoCoreError as err:
        raise S3Error(f"{where}: {err}") from None


# --- the local server ---------------------------------------------------------------------------


def server_command(port: int, state_dir: str | os.PathLike, host: str = "127.0.0.1") -> list[str]:
    """The command that runs the local S3 server (this module's :func:`serve`) in the venv's Python."""
    return [sys.executable, "-m", "pcee_dev.s3", "--host", host, "--port", str(port), "--state-dir", str(state_dir)]


def verify_presigned(environ: dict, creds: S3Credentials, now: float | None = None) -> str | None:
    """Check a SigV4 query-signed ("presigned") request against ``creds``; None if valid, else why not.

    MLflow hands clients presigned GET URLs for downloads from an S3 artifact store; moto verifies
    only header-signed requests, so the local server checks these itself (AWS's algorithm:
    https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html).
    """
    import calendar
    import hmac
    from urllib.parse import unquote

    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    path, _, query = raw.partition("?")
    pairs = [pair.partition("=") for pair in query.split("&") if pair]
    params = {unquote(k): unquote(v) for k, _, v in pairs}
    try:
        key_id, date, region, service, _terminator = params["X-Amz-Credential"].split("/")
        amz_date, expires = params["X-Amz-Date"], int(params["X-Amz-Expires"])
        signed_headers, signature = params["X-Amz-SignedHeaders"], params["X-Amz-Signature"]
        signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    except (KeyError, ValueError):
        return "malformed presigned URL"
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        return "unsupported signing algorithm"
    if not hmac.compare_digest(key_id, creds.access_key_id):
        return "InvalidAccessKeyId"
    if (now if now is not None else time.time()) > signed_at + expires:
        return "presigned URL expired"
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted((k, v) for k, _, v in pairs if k != "X-Amz-Signature"))
    headers = []
    for name in signed_headers.split(";"):
        value = environ.get("HTTP_" + name.upper().replace("-", "_"), "")
        headers.append(f"{name}:{' '.join(value.split())}\n")
    canonical = "\n".join(
        [
            environ.get("REQUEST_METHOD", "GET"),
            path,
            canonical_query,
            "".join(headers),
            signed_headers,
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    k = f"AWS4{creds.secret_access_key}".encode()
    for part in (date, region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(expected, signature) else "SignatureDoesNotMatch"


class _Snapshot:
    """moto's objects on disk: content-addressed blobs plus an index, rewritten only when something changed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.index = root / "index.json"
        self._last: Any = None
        self._sha: dict[tuple[str, str, str, str], str] = {}

    def restore(self, s3: Any, region: str) -> int:
        if not self.index.is_file():
            return 0
        data = json.loads(self.index.read_text())
        n = 0
        for bucket, keys in data.items():
            if bucket not in s3.buckets:
                s3.create_bucket(bucket, region)
            for key, entry in keys.items():
                obj = s3.put_object(bucket, key, (self.blobs / entry["blob"]).read_bytes())
                obj.metadata.update(entry.get("metadata") or {})
                n += 1
        return n

    def save(self, s3: Any) -> None:
        # a stable view of the backend: the server's threads may add keys while we iterate
        for _ in range(5):
            try:
                state = {
                    name: [(k, obj) for k, obj in list(bucket.keys.items())]
                    for name, bucket in list(s3.buckets.items())
                }
                break
            except RuntimeError:
                time.sleep(0.05)
        else:
            return
        signature = {(b, k, obj.etag, str(obj.last_modified)) for b, items in state.items() for k, obj in items}
        if signature == self._last:
            return
        self.blobs.mkdir(parents=True, exist_ok=True)
        index: dict[str, dict[str, Any]] = {}
        for bucket, items in state.items():
            index[bucket] = {}
            for key, obj in items:
                ident = (bucket, key, obj.etag, str(obj.last_modified))
                sha = self._sha.get(ident)
                if sha is None:
                    value = obj.value
                    sha = hashlib.sha256(value).hexdigest()
                    blob = self.blobs / sha
                    if not blob.exists():
                        tmp = blob.with_name(f".{sha}.tmp")
                        tmp.write_bytes(value)
                        tmp.replace(blob)
                    self._sha[ident] = sha
                meta = {k: v for k, v in dict(obj.metadata).items() if isinstance(v, str)}
                index[bucket][key] = {"blob": sha, "metadata": meta}
        tmp = self.index.with_name(".index.json.tmp")
        tmp.write_text(json.dumps(index, sort_keys=True))
        tmp.replace(self.index)
        used = {e["blob"] for keys in index.values() for e in keys.values()}
        for blob in self.blobs.iterdir():
            if blob.name not in used and not blob.name.startswith("."):
                blob.unlink(missing_ok=True)
        self._sha = {i: s for i, s in self._sha.items() if s in used}
        self._last = signature


def serve(host: str, port: int, state_dir: Path, snapshot_interval_s: float = SNAPSHOT_INTERVAL_S) -> None:
    """Run the local S3 server until SIGTERM/SIGINT: moto's standalone server with IAM auth enforced."""
    try:
        from moto import settings as moto_settings
        from moto.core.authorization import ActionAuthenticatorMixin
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.iam.models import iam_backends
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from moto.s3.models import s3_backends
        from werkzeug.serving import make_server
    except ImportError as err:
        raise SystemExit(f"the local S3 server needs moto[server] (`uv sync --group dev`): {err}") from None

    creds = ensure_local_credentials(state_dir)
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    s3 = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    snapshot = _Snapshot(s3_dir(state_dir) / "data")
    restored = snapshot.restore(s3, LOCAL_REGION)
    _add_local_user(iam, creds)
    presigned = _authenticate_every_request(moto_settings, ActionAuthenticatorMixin)
    app = _guarded_app(DomainDispatcherApplication(create_backend_app), creds, presigned)
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    banner = (
        f"s3: serving http://{host}:{server.server_port} (auth enforced, user {LOCAL_USER!r}, "
        f"keys in {credentials_path(state_dir)}); restored {restored} objects from {snapshot.root}"
    )
    _serve_until_stopped(server, snapshot, s3, snapshot_interval_s, banner)


def _add_local_user(iam: Any, creds: S3Credentials) -> None:
    """One IAM user allowed everything on S3, holding exactly the keys of the credentials file."""
    iam.create_user(LOCAL_REGION, LOCAL_USER)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(LOCAL_USER, "pcee-s3", json.dumps(policy))
    key = iam.create_access_key(LOCAL_USER)
    key.access_key_id, key.secret_access_key = creds.access_key_id, creds.secret_access_key


def _authenticate_every_request(moto_settings: Any, authenticator: Any) -> threading.local:
    """From the first request on, every call is signature-checked and authorised (moto's IAM simulation),
    except a presigned request already checked by :func:`verify_presigned`: the returned thread-local's
    ``verified`` marks that request (the server runs one thread per request)."""
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    authenticator.request_count = 0
    presigned = threading.local()
    moto_check = authenticator._authenticate_and_authorize_action

    def check(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        if not getattr(presigned, "verified", False):
            moto_check(self, iam_request_cls, resource)

    authenticator._authenticate_and_authorize_action = check
    return presigned


_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>pcee's S3 server refuses unsigned requests</Message></Error>"
)


def _guarded_app(moto_app: Any, creds: S3Credentials, presigned: threading.local) -> Any:
    """The WSGI app in front of moto: health, no control API, signed requests only (header-signed go to moto's
    check, presigned to :func:`verify_presigned`)."""

    def app(environ: dict, start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == HEALTH_PATH:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        # /moto-api can reset all data or switch auth off, without credentials: not on this server
        if path.startswith("/moto-api"):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"moto's control API is disabled on pcee's S3 server\n"]
        if "HTTP_AUTHORIZATION" in environ:
            return moto_app(environ, start_response)  # header-signed: moto checks it
        why = "unsigned request"
        if "X-Amz-Signature" in environ.get("QUERY_STRING", ""):
            why = verify_presigned(environ, creds) or ""
            if not why:
                presigned.verified = True
                try:
                    return moto_app(environ, start_response)
                finally:
                    presigned.verified = False
        start_response("403 Forbidden", [("Content-Type", "application/xml")])
        return [_DENIED.replace(b"refuses unsigned requests", f"refuses this request: {why}".encode())]

    return app


def _serve_until_stopped(server: Any, snapshot: _Snapshot, s3: Any, snapshot_interval_s: float, banner: str) -> None:
    """Serve until SIGTERM/SIGINT, snapshotting every ``snapshot_interval_s`` and once more on the way out."""
    stop = threading.Event()

    def snapshots() -> None:
        while not stop.wait(snapshot_interval_s):
            try:
                snapshot.save(s3)
            except Exception as err:  # noqa: BLE001 - keep serving; the next round retries
                print(f"s3: snapshot to {snapshot.root} failed: {err!r}", file=sys.stderr, flush=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=snapshots, name="s3-snapshot", daemon=True)
    thread.start()
    print(banner, flush=True)
    try:
        server.serve_forever()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            server.server_close()
        thread.join(timeout=10)
        snapshot.save(s3)  # the last writes survive a clean stop
        print("s3: stopped, snapshot saved", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pcee's local S3-compatible server (moto, auth enforced)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=Settings().s3_port)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--snapshot-interval", type=float, default=SNAPSHOT_INTERVAL_S)
    args = parser.parse_args(argv)
    serve(args.host, args.port, (args.state_dir or Settings().state_dir).resolve(), args.snapshot_interval)


if __name__ == "__main__":
    main()
