"""Run one sd_jax command as several local processes that form one JAX job (a pod simulated on one machine).

    python -m sd_jax.launch --processes 2 --devices-per-process 4 -- train_dreambooth.py --model M ...
    python -m sd_jax.launch --processes 2 --devices-per-process 4 -- generate.py --model M --from-file P.txt

Each process gets the variables :func:`sd_jax.sharding.initialize_distributed` reads
(``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`` on a free port, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``) and, with ``--devices-per-process D``, ``D`` CPU devices
(``JAX_PLATFORMS=cpu``, ``--xla_force_host_platform_device_count=D``). Process 0's
output goes to this terminal; the others write ``LOG_DIR/process-I.log``.

Failure ends the job: when a process exits non-zero (or is killed), the others get
``--grace`` seconds to stop on their own (a NaN stop or a bad flag ends every process
at the same point, each with its message), then SIGTERM, then SIGKILL, each to the
process's whole group, so none is left waiting in a collective. The launcher exits
with the first failure's status (128 + N for a signal N). Children also die with the
launcher (Linux ``PR_SET_PDEATHSIG``) if it is killed itself.

A real pod needs no launcher: every host runs the same command and JAX finds the
coordinator itself (``gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PROG = "python -m sd_jax.launch"
EXIT_USAGE = 2
MAX_PROCESSES = 64
MAX_DEVICES = 256
# Variables of a surrounding cluster that would make a child join the wrong job.
FOREIGN_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SD_JAX_DISTRIBUTED",
               "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
DEVICE_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One launch: N processes of ``command``, validated on construction."""

    command: tuple[str, ...]
    processes: int
    devices_per_process: int | None = None
    port: int | None = None          # None: a free port
    log_dir: Path | None = None      # None: a new temporary folder
    grace_s: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(self.command))
        if not self.command:
            raise ValueError("no command given: put it after '--', e.g. -- train_dreambooth.py --model M ...")
        if _bad_int(self.processes, 1, MAX_PROCESSES):
            raise ValueError(f"--processes {self.processes!r} must be an integer in [1, {MAX_PROCESSES}]")
        if self.devices_per_process is not None and _bad_int(self.devices_per_process, 1, MAX_DEVICES):
            raise ValueError(f"--devices-per-process {self.devices_per_process!r} must be an integer in "
                             f"[1, {MAX_DEVICES}]")
        if self.port is not None and _bad_int(self.port, 1, 65535):
            raise ValueError(f"--port {self.port!r} must be an integer in [1, 65535]")
        if not (isinstance(self.grace_s, (int, float)) and 0 <= self.grace_s <= 3600):
            raise ValueError(f"--grace {self.grace_s!r} must be a number of seconds in [0, 3600]")
        script = self.command[0]
        if script.endswith(".py") and not Path(script).is_file():
            raise ValueError(f"script {script[:200]!r} does not exist")


def _bad_int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_argv(command: Sequence[str]) -> list[str]:
    """A ``.py`` script runs under this Python; anything else is run as given."""
    return [sys.executable, *command] if command[0].endswith(".py") else list(command)


def child_env(base: Mapping[str, str], process_id: int, processes: int, port: int,
              devices_per_process: int | None) -> dict[str, str]:
    """The environment of process ``process_id``: the job's coordinates, and D CPU devices when asked."""
    env = {k: v for k, v in base.items() if k not in FOREIGN_ENV}
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(process_id))
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
        env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_FLAG}={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")  # logs and the terminal see lines as they are printed
    return env


def _die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGKILL when the launcher dies (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def exit_status(returncode: int) -> int:
    """A child's return code as a shell status (a signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _say(message: str) -> None:
    print(f"sd_jax.launch: {message}", file=sys.stderr, flush=True)


def stop_all(procs: Sequence[subprocess.Popen], term_wait_s: float = 5.0) -> None:
    """SIGTERM every running process group, then SIGKILL what is left; reap them all."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + term_wait_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
        p.wait()


class _Terminated(Exception):
    """The launcher got SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def launch(config: LaunchConfig, env: Mapping[str, str] | None = None) -> int:
    """Start the processes, wait for all (or the first failure), return the job's exit status."""
    env = os.environ if env is None else env
    log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="sd_jax-launch-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port = config.port or free_port()
    argv = child_argv(config.command)
    n = config.processes
    devices = f", {config.devices_per_process} CPU device(s) each" if config.devices_per_process else ""
    _say(f"{n} process(es){devices}, coordinator 127.0.0.1:{port}; process 0 below, the others in {log_dir}")
    procs: list[subprocess.Popen] = []
    logs = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    first_failure: tuple[int, int] | None = None  # (process, status)
    try:
        for i in range(n):
            out = None
            if i > 0:
                out = open(log_dir / f"process-{i}.log", "wb")  # noqa: SIM115 - closed in finally
                logs.append(out)
            procs.append(subprocess.Popen(argv, env=child_env(env, i, n, port, config.devices_per_process),
                                          stdout=out, stderr=subprocess.STDOUT if out else None,
                                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
        fail_deadline = None
        while [p.poll() for p in procs].count(None):  # polls every process (any() would stop early)
            if first_failure is None:
                for i, p in enumerate(procs):
                    if p.returncode not in (None, 0):
                        first_failure = (i, exit_status(p.returncode))
                        where = "" if i == 0 else f" (log {log_dir / f'process-{i}.log'})"
                        _say(f"process {i} failed with status {first_failure[1]}{where}; stopping the others "
                             f"in {config.grace_s:g} s unless they end first")
                        if i > 0:
                            tail = _tail(log_dir / f"process-{i}.log")
                            if tail:
                                print(f"--- process {i}, last lines:\n{tail}\n---", file=sys.stderr, flush=True)
                        fail_deadline = time.monotonic() + config.grace_s
                        break
            if fail_deadline is not None and time.monotonic() >= fail_deadline:
                _say("stopping the remaining processes")
                break
            time.sleep(0.05)
    except (KeyboardInterrupt, _Terminated) as err:
        _say("interrupted; stopping every process")
        stop_all(procs)
        return 143 if isinstance(err, _Terminated) else 130
    finally:
        stop_all(procs)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        for f in logs:
            f.close()
    if first_failure is None:
        for i, p in enumerate(procs):
            if p.returncode != 0:
                first_failure = (i, exit_status(p.returncode))
                break
    if first_failure is not None:
        return first_failure[1]
    _say(f"all {n} process(es) finished")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The launcher's command line (everything after ``--`` is the command)."""
    from sd_jax.cli.common import ArgumentParser  # one-line errors, status 2

    p = ArgumentParser(prog=PROG, description="Run a command as N local processes of one JAX job "
                                "(jax.distributed over localhost), e.g. to test a pod run on one machine.")
    p.add_argument("--processes", type=int, required=True, help="how many processes (hosts) to start")
    p.add_argument("--devices-per-process", type=int, help="give each process this many CPU devices "
                                                           "(JAX_PLATFORMS=cpu); default: leave devices alone")
    p.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--log-dir", help="where processes 1..N-1 write process-I.log (default: a new temporary folder)")
    p.add_argument("--grace", type=float, default=20.0, help="seconds the others get to end on their own after "
                                                               "one fails, before they are stopped (default 20)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT.py ARGS... (or any program and arguments)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one error line and status 2 for a bad flag, else the job's status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        config = LaunchConfig(command=tuple(command), processes=args.processes,
                              devices_per_process=args.devices_per_process, port=args.port,
                              log_dir=Path(args.log_dir) if args.log_dir else None, grace_s=args.grace)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return launch(config)


if __name__ == "__main__":
    sys.exit(main())
