"""``make up`` hook: the local S3-compatible server (``python -m pcee_dev.s3``, moto, auth enforced).

Listed only with ``PCEE_ARTIFACTS=s3`` (or ``PCEE_SCALE_OUT=1``) and no ``PCEE_S3_ENDPOINT_URL``:
with an endpoint of your own (AWS, MinIO) nothing is started and your ``AWS_*`` environment is used.
It starts before MLflow (group -1): MLflow's ``--artifacts-destination`` is ``s3://<bucket>/mlflow``.
Healthy once it answers and the bucket (``PCEE_S3_BUCKET``, default ``pcee``) exists; the health
check creates the bucket the first time. Keys: ``<state>/s3/credentials`` (0600); objects are
snapshotted to ``<state>/s3/data`` and survive ``make down``/``make up``.
"""

from __future__ import annotations

import sys

from pcee.settings import Settings
from pcee_dev import s3

NAME = "s3"


def specs(cfg) -> list[dict]:
    settings = Settings()
    if settings.artifacts != "s3" or not s3.is_local(settings):
        return []
    endpoint = s3.endpoint_url(settings)
    reported: set[str] = set()

    def ready() -> bool:
        if not s3.local_ready(endpoint):  # another program on the port fails here
            return False
        try:
            creds = s3.ensure_local_credentials(cfg.state_dir)
            s3.ensure_bucket(endpoint, settings.s3_bucket, creds, s3.LOCAL_REGION)
        except s3.S3Error as err:  # e.g. another program on the port: say so once, then time out with the log
            if str(err) not in reported:
                reported.add(str(err))
                print(f"{NAME}: {err}", file=sys.stderr, flush=True)
            return False
        return True

    return [
        {
            "name": NAME,
            "cmd": s3.server_command(settings.s3_port, cfg.state_dir),
            "health_check": ready,
            "url": endpoint,
            "startup_timeout": 60.0,
            "group": -1,  # before MLflow, whose artifacts live in the bucket
        }
    ]
