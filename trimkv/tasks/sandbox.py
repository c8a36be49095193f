"""Compile generated C++ and run it on test cases under CPU, memory, output and wall-clock limits.

Used by LongProc's pseudocode-to-code task. Each program is compiled in its own temporary
directory and each test case runs as a separate process:

- stdin comes from a file with the test input and stdout goes to a file in the temporary
  directory, so a program that prints without end hits RLIMIT_FSIZE instead of filling memory;
- RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE and RLIMIT_CORE are set in the child before exec;
- the environment is empty, the working directory is the temporary directory, and the
  program's process group is killed at the wall-clock timeout and after every test case;
- the program runs in a new network namespace (`unshare --net`, util-linux), which has only a
  loopback device that is down, so it cannot reach any host. When the process runs as root,
  `unshare` also switches the program to the `nobody` user; otherwise it maps the user into a
  new user namespace. When neither works, programs run with the host network (see the NOTE in
  `_network_isolation_prefix`).

A compile error, a crash, a timeout or a wrong output makes `run` return a failed result; no
outcome of the program raises.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# User and group id of `nobody` on Debian and most Linux distributions.
NOBODY_ID = 65534


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one test-case run, and the compile timeout.

    The wall-clock default is LongProc's: its SPoC evaluator kills a test case after 3 s and
    sets no other limit. The CPU, memory and output limits are ours and generous.
    """

    timeout_s: float = 3.0
    cpu_time_s: int = 3
    memory_mb: int = 2048
    output_limit_mb: int = 16
    compile_timeout_s: float = 60.0

    def __post_init__(self):
        for name in ("timeout_s", "cpu_time_s", "memory_mb", "output_limit_mb", "compile_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"sandbox limit {name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class RunResult:
    """The outcome of compiling a program and running it on its test cases.

    `status` is one of `passed`, `compile_error`, `compile_timeout`, `wrong_answer`,
    `runtime_error` (wrong output and a non-zero exit status), `timeout` (wall clock),
    `cpu_time_exceeded`, `killed`, `output_limit_exceeded` or `decode_error`.
    `test_case` is the 0-based index of the failing test case (None when none failed), and
    `detail` is a short text for logs, such as the first compiler error line.
    """

    status: str
    test_case: int | None = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class CppSandbox:
    """Compiles a C++ program once and checks its output on each test case.

    `header` is prepended to every program. With `precompiled_header` it is compiled once into a
    precompiled header, which g++ includes exactly as the prepended text. That cut the compile
    time per program from about 0.45 s to 0.1 s with GCC 12 on a 2-core machine.
    `compile_flags` default to LongProc's `-std=c++11 -O`.
    """

    def __init__(
        self,
        header: str = "",
        compiler: str = "g++",
        compile_flags: Sequence[str] = ("-std=c++11", "-O"),
        limits: SandboxLimits | None = None,
        isolate_network: bool = True,
        precompiled_header: bool = True,
    ):
        if shutil.which(compiler) is None:
            raise FileNotFoundError(
                f"C++ compiler {compiler!r} not found on PATH; install it (Debian: apt-get install g++) "
                f"or set task.sandbox.compiler to its path"
            )
        self.header = header
        self.compiler = compiler
        self.compile_flags = list(compile_flags)
        self.limits = limits or SandboxLimits()
        self.isolate_network = isolate_network
        self.precompiled_header = precompiled_header
        self._header_dir: Path | None = None
        self._header_lock = threading.Lock()

    def run(self, code: str, test_cases: Sequence[tuple[Sequence[str], Sequence[str]]]) -> RunResult:
        """Compile `code` and run it on each (input lines, expected output lines) test case.

        A test case passes when stdout equals the expected lines joined by newlines plus a final
        newline, byte for byte. As in LongProc, the exit status is not checked, so a program
        that prints the right output and then crashes passes.
        """
        with tempfile.TemporaryDirectory(prefix="trimkv-cpp-") as work_dir:
            work = Path(work_dir)
            # Others (the `nobody` user that runs the program under root) may enter the directory
            # and run the binary but not list or write it.
            work.chmod(0o711)
            binary = work / "program"
            failure = self._compile(code, work, binary)
            if failure is not None:
                return failure
            for index, (input_lines, output_lines) in enumerate(test_cases):
                stdin_text = "\n".join(input_lines) + "\n"
                expected = "\n".join(output_lines) + "\n"
                result = self._run_case(binary, work, stdin_text, expected, index)
                if result is not None:
                    return result
        return RunResult("passed")

    # Compiling

    def _compile(self, code: str, work: Path, binary: Path) -> RunResult | None:
        source = work / "program.cpp"
        header_args: list[str] = []
        if self.header and self.precompiled_header:
            # g++ uses header.hpp.gch next to header.hpp when the flags match, else the text.
            header_args = ["-include", str(self._header_path())]
            source.write_text(code, encoding="utf-8")
        else:
            source.write_text(self.header + code, encoding="utf-8")

        command = [self.compiler, *self.compile_flags, *header_args, "-o", str(binary), str(source)]
        try:
            completed = subprocess.run(
                command,
                cwd=work,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.limits.compile_timeout_s,
            )
        except subprocess.TimeoutExpired:
            return RunResult("compile_timeout", detail=f"compiling took over {self.limits.compile_timeout_s} s")
        if completed.returncode != 0:
            return RunResult("compile_error", detail=_first_error_line(completed.stderr))
        binary.chmod(0o755)
        return None

    def _header_path(self) -> Path:
        """Write the header (and its precompiled form) once per sandbox; return its path."""
        with self._header_lock:
            if self._header_dir is None:
                header_dir = Path(tempfile.mkdtemp(prefix="trimkv-pch-"))
                weakref.finalize(self, shutil.rmtree, header_dir, True)
                header = header_dir / "header.hpp"
                header.write_text(self.header, encoding="utf-8")
                command = [self.compiler, *self.compile_flags, "-x", "c++-header", "-o", f"{header}.gch", str(header)]
                try:
                    completed = subprocess.run(
                        command, capture_output=True, stdin=subprocess.DEVNULL, timeout=self.limits.compile_timeout_s
                    )
                    if completed.returncode != 0:
                        logger.warning(
                            "building the precompiled header failed (%s); compiling the header text with each program",
                            _first_error_line(completed.stderr),
                        )
                except subprocess.TimeoutExpired:
                    logger.warning("building the precompiled header timed out; compiling the header text with each program")
                self._header_dir = header_dir
            return self._header_dir / "header.hpp"

    # Running

    def _run_case(self, binary: Path, work: Path, stdin_text: str, expected: str, index: int) -> RunResult | None:
        input_path = work / "input.txt"
        output_path = work / "output.txt"
        input_path.write_text(stdin_text, encoding="utf-8")
        command = [*_network_isolation_prefix(self.isolate_network), str(binary)]

        with input_path.open("rb") as stdin, output_path.open("wb") as stdout:
            process = subprocess.Popen(
                command,
                cwd=work,
                env={},
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=functools.partial(_apply_limits, self.limits),
            )
            exited = _wait_for_exit(process.pid, self.limits.timeout_s)
            # Kill the program and any children it left behind. The exited program is not
            # reaped yet, so its process group id cannot have been reused by another group.
            _kill_group(process)
            if not exited:
                return RunResult("timeout", index, f"test case {index} ran over {self.limits.timeout_s} s")
            returncode = process.returncode

        if returncode == -signal.SIGXCPU:
            return RunResult("cpu_time_exceeded", index, f"test case {index} used over {self.limits.cpu_time_s} s of CPU")
        if returncode == -signal.SIGKILL:
            # The kernel sends SIGKILL at the hard CPU limit and when it runs out of memory.
            return RunResult("killed", index, f"test case {index} was killed (hard CPU limit or out of memory)")
        if returncode == -signal.SIGXFSZ:
            return RunResult("output_limit_exceeded", index, f"test case {index} wrote over {self.limits.output_limit_mb} MB")

        try:
            output = output_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return RunResult("decode_error", index, f"test case {index} wrote output that is not UTF-8")
        if output == expected:
            return None
        if returncode != 0:
            # A crash such as std::bad_alloc at the memory limit (SIGABRT) or a segfault.
            return RunResult("runtime_error", index, f"test case {index} exited with status {returncode}")
        return RunResult("wrong_answer", index, f"test case {index}: got {output[:80]!r}, expected {expected[:80]!r}")


def _apply_limits(limits: SandboxLimits) -> None:
    """Set the resource limits in the child process, before exec (runs as preexec_fn)."""
    memory_bytes = limits.memory_mb * 1024 * 1024
    output_bytes = limits.output_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_time_s, limits.cpu_time_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the process to exit, without reaping it; True when it exited."""
    try:
        # A pidfd becomes readable when the process exits (Linux 5.3 and later).
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return _poll_for_exit(pid, timeout_s)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _poll_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    delay_s = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return False
        time.sleep(min(delay_s, remaining_s))
        delay_s = min(delay_s * 2, 0.02)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the process group led by `process`, then reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@functools.lru_cache(maxsize=None)
def _isolation_command() -> tuple[str, ...] | None:
    """Return the `unshare` prefix that works on this machine, or None; probed once per process."""
    # An absolute path, because the program runs with an empty environment and so no PATH.
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    if os.geteuid() == 0:
        candidates = [(unshare, "--net", "--setgid", str(NOBODY_ID), "--setuid", str(NOBODY_ID), "--")]
    else:
        candidates = [(unshare, "--map-root-user", "--net", "--")]
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


_warned_no_isolation = False


def _network_isolation_prefix(isolate: bool) -> tuple[str, ...]:
    # NOTE: where `unshare` is missing or not permitted (containers without user namespaces,
    # for example), programs run with the host network and, under root, as root. The limit is
    # then best-effort, and a warning is logged once.
    global _warned_no_isolation
    if not isolate:
        return ()
    prefix = _isolation_command()
    if prefix is None:
        if not _warned_no_isolation:
            logger.warning(
                "network isolation is unavailable (unshare --net failed or is missing); "
                "generated C++ programs run with the host network"
            )
            _warned_no_isolation = True
        return ()
    return prefix


def network_isolation_available() -> bool:
    """Return whether programs run in their own network namespace on this machine."""
    return _isolation_command() is not None


def _first_error_line(stderr: bytes) -> str:
    text = stderr.decode("utf-8", errors="replace")
    for line in text.splitlines():
        if "error" in line:
            return line.strip()[:200]
    return text.strip()[:200]
