"""A process of the launcher tests: joins the job, proves it with a cross-process sum, then obeys its orders.

    python tests/launch_probe.py OUT_DIR [--fail PROCESS:STATUS] [--hang]

Writes OUT_DIR/pid-I (its process id) and prints one line; ``--fail`` makes that
process exit with that status after the sum, ``--hang`` makes the others wait in a
barrier the failed one never reaches (as a collective would).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    fail = next((a.split("=", 1)[1] for a in argv if a.startswith("--fail=")), None)
    from sd_jax.sharding import initialize_distributed

    initialize_distributed()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    pid = jax.process_index()
    (out / f"pid-{pid}").write_text(str(os.getpid()))
    total = multihost_utils.process_allgather(np.asarray([pid + 1]), tiled=True).sum()
    print(f"probe: process {pid} of {jax.process_count()}, {jax.local_device_count()} local / "
          f"{jax.device_count()} devices, sum {total}", flush=True)
    if fail is not None:
        who, status = (int(x) for x in fail.split(":"))
        if pid == who:
            print(f"probe: process {pid} fails with {status}", flush=True)
            os._exit(status)
        if "--hang" in argv:
            multihost_utils.sync_global_devices("never reached by the failed process")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
