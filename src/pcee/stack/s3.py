"""S3 addresses and credentials for MLflow artifacts and the DVC remote: AWS S3, any S3-compatible
API, or the local server ``make up`` runs. No server is started here (the development tools'
``pcee_dev.s3`` runs a local S3-compatible server, with authentication enforced).

``PCEE_ARTIFACTS=s3`` puts the MLflow server's proxied artifacts under ``s3://<bucket>/mlflow`` and
the DVC remote under ``s3://<bucket>/dvc`` (``PCEE_S3_BUCKET``, default ``pcee``). Every client
takes the same code path as on AWS: an endpoint URL (``MLFLOW_S3_ENDPOINT_URL``, DVC's
``endpointurl``) and the ``AWS_*`` credentials.

- ``PCEE_S3_ENDPOINT_URL`` set (AWS, MinIO, Ceph, ...): that endpoint and the user's own ``AWS_*``
  environment (keys, ``AWS_PROFILE``, region).
- not set: the local server on ``127.0.0.1:PCEE_S3_PORT``, whose keys ``make up`` generated once into
  ``<state>/s3/credentials`` (mode 0600, AWS shared-credentials format, profile ``pcee``).

Standard library only.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

from pcee.settings import Settings

#: region the local server and its clients use (any fixed one works; AWS users set their own)
LOCAL_REGION = "us-east-1"
#: the IAM user the local server's keys belong to, and the profile name in the credentials file
LOCAL_USER = "pcee"


class S3Error(RuntimeError):
    """The S3 endpoint cannot be used: unreachable, credentials refused, or the bucket unusable."""


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:  # never print the secret (logs, pytest output)
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"


def s3_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "s3"


def credentials_path(state_dir: str | os.PathLike) -> Path:
    return s3_dir(state_dir) / "credentials"


def is_local(settings: Settings) -> bool:
    """True when pcee runs its own S3 server (no ``PCEE_S3_ENDPOINT_URL``)."""
    return not settings.s3_endpoint_url


def endpoint_url(settings: Settings) -> str:
    return (settings.s3_endpoint_url or f"http://127.0.0.1:{settings.s3_port}").rstrip("/")


def artifacts_destination(settings: Settings) -> str:
    """The MLflow server's ``--artifacts-destination``."""
    return f"s3://{settings.s3_bucket}/mlflow"


def dvc_remote_url(settings: Settings) -> str:
    """The DVC remote (``PCEE_DVC_REMOTE_URL`` when the S3 engine is on)."""
    return f"s3://{settings.s3_bucket}/dvc"


def read_credentials(path: str | os.PathLike) -> S3Credentials:
    parser = configparser.ConfigParser()
    if not parser.read(path) or LOCAL_USER not in parser:
        raise S3Error(f"no [{LOCAL_USER}] profile in the local S3 credentials file {path}")
    section = parser[LOCAL_USER]
    return S3Credentials(section["aws_access_key_id"], section["aws_secret_access_key"])


def local_credentials(state_dir: str | os.PathLike) -> S3Credentials:
    """The local server's keys from ``<state>/s3/credentials``. Never generates them: a missing file
    means this is not the state directory ``make up`` used."""
    path = credentials_path(state_dir)
    if not path.is_file():
        raise S3Error(
            f"no local S3 credentials at {path}: PCEE_STATE_DIR={state_dir} is not the state directory of the "
            "`make up` that started the S3 server (set PCEE_STATE_DIR to it, or `source <state dir>/env.sh`), "
            "or set PCEE_S3_ENDPOINT_URL and your AWS_* credentials"
        )
    return read_credentials(path)


_AWS_PASSTHROUGH = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_CA_BUNDLE",
)


def client_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What the MLflow server, DVC and flows need to reach the S3 API.

    Local server: its endpoint and keys (they override any ``AWS_*`` of the caller, so a user's AWS
    profile never leaks to the local server). ``PCEE_S3_ENDPOINT_URL``: that endpoint and the
    caller's own ``AWS_*`` variables, passed through as they are.
    """
    environ = dict(os.environ if environ is None else environ)
    env = {"MLFLOW_S3_ENDPOINT_URL": endpoint_url(settings)}
    if is_local(settings):
        creds = local_credentials(settings.state_dir)
        env.update(
            AWS_ACCESS_KEY_ID=creds.access_key_id,
            AWS_SECRET_ACCESS_KEY=creds.secret_access_key,
            AWS_DEFAULT_REGION=LOCAL_REGION,
            AWS_REGION=LOCAL_REGION,
        )
    else:
        env.update({k: environ[k] for k in _AWS_PASSTHROUGH if environ.get(k)})
    return env
