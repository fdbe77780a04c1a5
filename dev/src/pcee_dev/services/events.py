"""``python -m pcee_dev.services.events LOG``: supervisord's event listener for ``make up``. Every
unexpected exit (``exited``: supervisord restarts the service), failed start (``backoff``: it
retries after a pause) and give-up (``fatal``) is appended to LOG as one JSON line, which
``make status`` counts; the same line goes to stderr (``<state>/logs/supervisor-events.log``).
Expected exits (``make down``, ``services.py stop``) are not recorded."""

from __future__ import annotations

import json
import sys
import time

from supervisor import childutils

KINDS = {"PROCESS_STATE_EXITED": "exited", "PROCESS_STATE_BACKOFF": "backoff", "PROCESS_STATE_FATAL": "fatal"}


def record(headers: dict[str, str], payload: str) -> dict | None:
    """The JSON record of one event, or None for an exit supervisord expected (a stop)."""
    fields, _ = childutils.eventdata(payload + "\n")
    if headers["eventname"] == "PROCESS_STATE_EXITED" and fields.get("expected") == "1":
        return None
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "name": fields.get("processname"),
        "event": KINDS.get(headers["eventname"], headers["eventname"]),
        "from_state": fields.get("from_state"),
        "pid": fields.get("pid"),
    }


def main(argv: list[str]) -> None:
    log_path = argv[1]
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        rec = record(headers, payload)
        if rec is not None:
            line = json.dumps(rec)
            with open(log_path, "a") as log:
                log.write(line + "\n")
            print(line, file=sys.stderr, flush=True)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main(sys.argv)
