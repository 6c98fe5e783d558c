"""``python -m elastic_det.supervise [OPTIONS] -- COMMAND...``: run torchrun again while training progresses.

COMMAND is the whole torchrun command line (``torchrun ... -m elastic_det.train CONFIG --work-dir W ...``),
``python -m torch.distributed.run ...``, or ``python -m elastic_det.train ...`` for one process. Every
launcher in launch/ runs it (through launch/elastic_run.sh); it is the one place that decides whether to
start torchrun again:

* before the first attempt, a pre-flight (config, dataset indexes, work dir) in this process: bad input
  stops here (exit 2) and torchrun is started zero times;
* each attempt runs COMMAND in its own process group; a worker that stops with a final code (bad input,
  another writer owns the work dir) reports it through ``ELASTIC_DET_EXIT_DIR`` (see exit_status.py), and
  the supervisor stops torchrun at once and exits with that code: torchrun never retries bad input;
* any other failure is retried while the newest committed checkpoint step keeps advancing; after
  ``--max-stalled-attempts`` attempts in a row that committed nothing, and at least
  ``--min-stall-seconds`` since the last progress (room for a replaced rendezvous host to come back, whose
  absence makes every other node's attempts fail fast), it gives up with exit 4;
* SIGTERM, SIGINT, SIGHUP (sent on as SIGTERM), SIGUSR1 and SIGUSR2 are forwarded to torchrun once, the
  first one only (a repeated signal aborts torchrun's wait for its workers); the workers save and stop,
  and the supervisor exits 143 (preempted: run the same command again to resume);
* one JSON line per attempt start and end goes to ``WORK_DIR/supervisor/<host>-<pid>.jsonl``;
* unless ``--no-warm-start``, a warm server (warm_start.py) imports torch and the trainer once, while the
  pre-flight and torchrun start, and every worker torchrun starts or restarts is forked from it ready.

Exit codes: 0 done, 2 bad input, 3 another writer owns the work dir, 4 no progress (gave up), 143 stopped
by a signal (requeue).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import FINAL_EXIT_CODES, NO_PROGRESS_EXIT_CODE, PREEMPTED_EXIT_CODE, ElasticDetError, InfrastructureError
from ..goodput.ledger import LAUNCH_TIME_ENV
from ..process import die_with_parent, process_start_time
from ..storage import WorkDir
from . import exit_status
from .checks import Target, check_torch, committed_step, progress_store, rendezvous_mode, resolve, work_dir_hint
from .torchrun import without_teardown
from .warm_server import start_server

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
FORWARD_AS = {signal.SIGUSR1: signal.SIGUSR1, signal.SIGUSR2: signal.SIGUSR2}  # the rest go on as SIGTERM


@dataclass
class Options:
    max_stalled_attempts: int = 3
    work_dir: str | None = None
    min_stall_s: float = 0.0  # give up only this long after the last progress (or the start)
    preflight: bool = True
    forward_signals: bool = True
    backoff_s: float = 1.0  # wait before the first retry without progress; doubles up to max_backoff_s
    max_backoff_s: float = 30.0
    poll_s: float = 0.5  # how often the exit-status dir is read while an attempt runs
    stop_timeout_s: float | None = None  # after a forwarded signal or a final code: SIGKILL after this
    warm_start: bool = True  # fork the workers from a server that has imported torch and the trainer


def parse_cli(argv: list[str]) -> tuple[Options, list[str]]:
    own, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m elastic_det.supervise", usage="%(prog)s [OPTIONS] -- COMMAND...",
                                description=__doc__.split("\n")[0])
    p.add_argument("--max-stalled-attempts", type=int, default=3, metavar="K",
                   help="give up (exit 4) after K attempts in a row that committed no new checkpoint [3]")
    p.add_argument("--min-stall-seconds", type=float, default=0.0, metavar="S",
                   help="and only when the last progress (or the start) is at least S seconds ago [0]")
    p.add_argument("--work-dir", help="the work dir to watch (default: the one of the train command)")
    p.add_argument("--no-preflight", action="store_true", help="skip the config/data/work-dir pre-flight")
    p.add_argument("--no-forward-signals", action="store_true",
                   help="do not forward signals to COMMAND (inside a Slurm step slurmstepd signals it itself)")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S",
                   help="wait before retrying an attempt that made no progress; doubles each time [1]")
    p.add_argument("--max-backoff", type=float, default=30.0, metavar="S", help="the longest such wait [30]")
    p.add_argument("--stop-timeout", type=float, metavar="S",
                   help="SIGKILL COMMAND's process group this long after a forwarded signal or a final code "
                        "[torchrun's --shutdown-timeout (or PET_SHUTDOWN_TIMEOUT, else 30) + 30]")
    p.add_argument("--no-warm-start", action="store_true",
                   help="let every worker import torch and the trainer itself (no warm server)")
    args = p.parse_args(own)
    if not command:
        p.error("no COMMAND after --")
    if args.max_stalled_attempts < 1:
        p.error("--max-stalled-attempts must be at least 1")
    if args.min_stall_seconds < 0:
        p.error("--min-stall-seconds must be >= 0")
    return Options(args.max_stalled_attempts, args.work_dir, args.min_stall_seconds, not args.no_preflight,
                   not args.no_forward_signals, args.backoff, args.max_backoff,
                   stop_timeout_s=args.stop_timeout, warm_start=not args.no_warm_start), command


def default_stop_timeout(command: list[str]) -> float:
    """torchrun's grace period for its workers (flag, else ``PET_SHUTDOWN_TIMEOUT``, else 30 s) + 30 s."""
    value = os.environ.get("PET_SHUTDOWN_TIMEOUT", "30")
    for i, token in enumerate(command):
        if token in ("-m", "--module"):
            break  # the train arguments start here
        if token.startswith(("--shutdown-timeout=", "--shutdown_timeout=")):
            value = token.split("=", 1)[1]
        elif token in ("--shutdown-timeout", "--shutdown_timeout") and i + 1 < len(command):
            value = command[i + 1]
    try:
        return float(value) + 30
    except ValueError:
        return 60.0


class Supervisor:
    def __init__(self, options: Options, command: list[str]):
        self.opts = options
        self.command = command
        self.stop_timeout = options.stop_timeout_s or default_stop_timeout(command)
        self.name = command_name(command)
        self.wake = threading.Event()
        self.signal_got: int | None = None  # the first handled signal
        self.later_signals: list[int] = []
        self.log = AttemptLog(None)
        self.last_progress = time.monotonic()  # of the last attempt that committed a new step (or the start)
        self.best_step: int | None = None  # the newest committed step seen after an attempt (or before the first)
        self.store = None
        self.warm_env: dict[str, str] = {}
        # the goodput ledger counts the first attempt's start-up from here: the launcher's start when it
        # says (ELASTIC_DET_LAUNCH_TIME), else this process's, so that the pre-flight is not left out
        self.launched = _launch_time()
        self.commands_started = 0

    # ------------------------------------------------------------------------------------------------
    # Signals only record and wake the main loop, which forwards (printing in a handler can deadlock).

    def install(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal_got is None:
            self.signal_got = signum
        else:
            self.later_signals.append(signum)
        self.wake.set()

    # ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        with self._warm_server():
            return self._run()

    @contextlib.contextmanager
    def _warm_server(self) -> Iterator[None]:
        """The warm server for this supervisor's workers (started first: its imports overlap the
        pre-flight and torchrun's start), stopped by PID at the end."""
        if not self.opts.warm_start or "elastic_det.train" not in self.command:
            yield
            return
        directory = tempfile.mkdtemp(prefix="elastic_det-warm-")
        server, self.warm_env = start_server(directory, log=say)
        try:
            yield
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            shutil.rmtree(directory, ignore_errors=True)

    def _run(self) -> int:
        try:
            check_torch()
        except ElasticDetError as e:
            return self._fail(e)
        target, code = self._preflight()
        if code is not None:
            return code
        say(rendezvous_mode(self.command, dict(os.environ)))
        stalled, attempt, backoff = 0, 0, 0.0
        self.last_progress = time.monotonic()
        while True:
            if self.signal_got is not None:
                say(f"got {_name(self.signal_got)} before starting an attempt; exiting 143 (run again to resume)")
                return PREEMPTED_EXIT_CODE
            attempt += 1
            code, progressed = self._attempt(attempt, target, stalled)
            if code is not None:
                return code
            stalled = 0 if progressed else stalled + 1
            if progressed:
                self.last_progress = time.monotonic()
            backoff = 0.0 if progressed else min(self.opts.max_backoff_s, max(backoff * 2, self.opts.backoff_s))
            if backoff:
                self.wake.wait(backoff)  # a signal cuts it short
                self.wake.clear()

    def _preflight(self) -> tuple[Target | None, int | None]:
        """The target, or the exit code when the pre-flight failed for good (or K times for now)."""
        stalled, backoff = 0, self.opts.backoff_s
        while True:
            try:
                target = resolve(self.command, self.opts.work_dir, self.opts.preflight)
            except InfrastructureError as e:
                stalled += 1
                say(f"pre-flight failed ({stalled} of {self.opts.max_stalled_attempts}): {e}")
                if stalled >= self.opts.max_stalled_attempts:
                    return None, NO_PROGRESS_EXIT_CODE
                self.wake.wait(backoff)
                self.wake.clear()
                backoff = min(self.opts.max_backoff_s, backoff * 2)
                if self.signal_got is not None:
                    return None, PREEMPTED_EXIT_CODE
                continue
            except ElasticDetError as e:
                self.log = AttemptLog(work_dir_hint(self.command, self.opts.work_dir))
                return None, self._fail(e)
            self.log = AttemptLog(target.work_dir)
            self.store = progress_store(target.work_dir)
            if target.work_dir is None:
                say("no elastic_det.train in the command and no --work-dir: progress cannot be seen, so every "
                    "failed attempt counts as one without progress")
            return target, None

    def _attempt(self, n: int, target: Target, stalled: int) -> tuple[int | None, bool]:
        """Run COMMAND once; the supervisor's exit code (None: retry) and whether a new step was committed."""
        before = committed_step(self.store)
        if self.best_step is None:
            self.best_step = before or 0
        self.log.event("attempt_start", attempt=n, committed_step=before)
        say(f"attempt {n}: starting {self.name} (committed step {_show(before)})")
        started = time.monotonic()
        rc, final = self._run_command()
        after = committed_step(self.store)
        # Progress is a step newer than any seen after an earlier attempt: on a multi-node job, one that
        # another node's agents committed while this one waited counts too (the job advanced).
        progressed = after is not None and after > self.best_step
        self.best_step = max(self.best_step, after or 0)
        gained = (after - before) if after is not None and before is not None else 0
        if final is not None or rc in FINAL_EXIT_CODES:  # a worker's report, or COMMAND's own (usage: 2)
            code, decision = (final[0] if final is not None else rc), "final"
        elif rc == 0:
            code, decision = 0, "done"
        elif self.signal_got is not None:
            code, decision = PREEMPTED_EXIT_CODE, "preempted"
        elif progressed or stalled + 1 < self.opts.max_stalled_attempts or \
                time.monotonic() - self.last_progress < self.opts.min_stall_s:
            code, decision = None, "retry"
        else:
            code, decision = NO_PROGRESS_EXIT_CODE, "give_up"
        self.log.event("attempt_end", attempt=n, exit_code=rc, committed_step=after, steps_gained=gained,
                       decision=decision)
        say(f"attempt {n} ended: exit {rc} after {time.monotonic() - started:.1f} s, committed step "
            f"{_show(after)} ({gained:+d}); {decision}")
        if decision == "give_up":
            where = target.work_dir.url if target.work_dir is not None else "(no work dir known)"
            waited = time.monotonic() - self.last_progress
            say(f"error: giving up: {stalled + 1} attempts in a row committed no new checkpoint to {where} in "
                f"{waited:.0f} s; the last one exited {rc}. Look at its output above and at the work dir's "
                f"train.log; exiting {NO_PROGRESS_EXIT_CODE}")
        elif decision == "preempted":
            say(f"stopped after {_name(self.signal_got)}: exiting 143 (run the same command again to resume)")
        return code, progressed

    def _run_command(self) -> tuple[int, tuple[int, str] | None]:
        """Run COMMAND in its own process group until it exits; its exit status (128 + N when killed by
        signal N) and the final code a worker reported, if any."""
        exit_dir = tempfile.mkdtemp(prefix="elastic_det-exit-")
        # the launch time lets the goodput ledger count this attempt's start-up from torchrun's start
        launched = self.launched if self.commands_started == 0 else time.time()
        self.commands_started += 1
        env = {**os.environ, **self.warm_env, exit_status.EXIT_DIR_ENV: exit_dir,
               LAUNCH_TIME_ENV: f"{launched:.3f}"}
        try:
            proc = subprocess.Popen(without_teardown(self.command), env=env, start_new_session=True,
                                    preexec_fn=die_with_parent)
        except OSError as e:
            shutil.rmtree(exit_dir, ignore_errors=True)
            say(f"cannot start {self.name}: {e}")
            return 127, None
        threading.Thread(target=lambda: (proc.wait(), self.wake.set()), name="command-wait", daemon=True).start()
        forwarded, final, kill_at = False, None, None
        try:
            while proc.returncode is None:
                if self.signal_got is not None and not forwarded:
                    forwarded = True
                    kill_at = self._forward(proc.pid, self.signal_got)
                self._note_later_signals()
                if final is None:
                    final = exit_status.read_final(exit_dir)
                    if final is not None:
                        say(f"a worker stopped with final exit code {final[0]}: {final[1]}")
                        say(f"stopping {self.name} (no retry)")
                        _killpg(proc.pid, signal.SIGTERM)
                        kill_at = kill_at or time.monotonic() + self.stop_timeout
                if kill_at is not None and time.monotonic() >= kill_at:
                    say(f"{self.name} still running {self.stop_timeout:.0f} s after being stopped; SIGKILL")
                    _killpg(proc.pid, signal.SIGKILL)
                    kill_at = float("inf")
                self.wake.wait(self.opts.poll_s)
                self.wake.clear()
            if final is None:
                final = exit_status.read_final(exit_dir)
            self._note_later_signals()
        finally:
            if proc.returncode is None:  # the supervisor itself failed: leave nothing running
                _killpg(proc.pid, signal.SIGKILL)
            shutil.rmtree(exit_dir, ignore_errors=True)
        rc = proc.returncode
        return (128 - rc if rc < 0 else rc), final

    def _note_later_signals(self) -> None:
        while self.later_signals:
            sig = self.later_signals.pop(0)
            say(f"got {_name(sig)}; already stopping after {_name(self.signal_got)}, not forwarding it")

    def _forward(self, pid: int, got: int) -> float:
        """Forward the first signal to COMMAND's process group; when to SIGKILL it."""
        if not self.opts.forward_signals:
            say(f"got {_name(got)}; not forwarding it (--no-forward-signals: the scheduler signals "
                f"{self.name} itself); waiting for it to stop")
        else:
            sig = FORWARD_AS.get(got, signal.SIGTERM)
            say(f"got {_name(got)}; forwarding {_name(sig)} to {self.name} (process group {pid}); "
                f"no further attempts")
            _killpg(pid, sig)
        return time.monotonic() + self.stop_timeout

    def _fail(self, error: ElasticDetError) -> int:
        say(f"error: {error}")
        self.log.event("preflight", exit_code=error.exit_code,
                       decision="final" if error.exit_code in FINAL_EXIT_CODES else "give_up")
        return error.exit_code


class AttemptLog:
    """One JSON line per event in ``WORK_DIR/supervisor/<host>-<pid>.jsonl``: appended on a local work dir,
    the whole small file rewritten on object stores (no append there). Failing to write it never stops
    the job. Records hold codes, steps and times only: never the environment (credentials live there)."""

    def __init__(self, work_dir: WorkDir | None):
        self.work_dir = work_dir
        self.host = socket.gethostname()
        self.relpath = f"supervisor/{re.sub(r'[^A-Za-z0-9._-]', '_', self.host)}-{os.getpid()}.jsonl"
        self.lines: list[str] = []
        self.warned = False

    def event(self, name: str, **fields: object) -> None:
        line = json.dumps({"event": name, "time": round(time.time(), 3), **fields, "host": self.host})
        self.lines.append(line)
        if self.work_dir is None:
            return
        try:
            if self.work_dir.is_local:
                path = self.work_dir.path(self.relpath)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "a") as f:
                    f.write(line + "\n")
            else:
                self.work_dir.write_bytes_atomic(self.relpath, ("\n".join(self.lines) + "\n").encode())
        except (OSError, ElasticDetError) as e:
            if not self.warned:
                say(f"warning: cannot write the attempt log {self.work_dir.path(self.relpath)}: {e}")
                self.warned = True


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} elastic_det.supervise[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _launch_time() -> float:
    try:
        return float(os.environ[LAUNCH_TIME_ENV])
    except (KeyError, ValueError):
        return process_start_time() or time.time()


def command_name(command: list[str]) -> str:
    """``torchrun``, ``python -m torch.distributed.run`` or the like, for messages."""
    name = os.path.basename(command[0])
    if len(command) > 2 and command[1] == "-m":
        name += f" -m {command[2]}"
    return name


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "?"


def _show(step: int | None) -> str:
    return "unknown" if step is None else str(step)


def main(argv: list[str] | None = None) -> int:
    options, command = parse_cli(sys.argv[1:] if argv is None else argv)
    supervisor = Supervisor(options, command)
    supervisor.install()
    return supervisor.run()
