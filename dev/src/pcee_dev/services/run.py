"""``python -m pcee_dev.services.run FILE``: what supervisord runs for a service. FILE is the
service's program file (:class:`pcee_dev.services.supervisor.Program` as JSON: command, environment,
working directory); this process becomes the command (``execvpe``: same PID, same process group).
Standard library only: it is on the path of every (re)start."""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> None:
    with open(argv[1]) as fh:
        program = json.load(fh)
    cmd, env = program["cmd"], program["env"]
    print(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}", flush=True)
    os.chdir(program["cwd"])
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main(sys.argv)
