"""Running model-written Python against its tests (HumanEval / MBPP pass@1), contained.

Each program runs in a fresh interpreter (`sys.executable -I`, isolated from the user's site and
PYTHON* variables) in its own session (so a timeout kills the whole process group, children too),
inside an empty temporary working directory that is deleted afterwards, with:

* a wall-clock timeout (the group gets SIGKILL when it expires);
* resource limits set in the child before the program runs: address space (`memory_mb`), CPU
  seconds, file size, no core dumps;
* no network: proxy variables point to a closed port, and `socket.socket` / `socket.create_connection`
  / DNS lookups raise inside the child;
* a minimal environment (no credentials or tokens of the parent are passed on).

This is containment against accidents (runaway loops, memory blow-ups, stray downloads), not a
security boundary against hostile code: run untrusted models' code in a container or VM as well.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the program: limits, then no network, then the program as __main__.
_PRELUDE = r"""
import resource, socket, sys
memory = int(sys.argv[2])
cpu = int(sys.argv[3])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                     (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, 64 * 2**20),
                     (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass

def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while running generated code")

class _NoSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if family in (socket.AF_INET, socket.AF_INET6) or (family == -1 and fileno is None):
            _no_network()
        super().__init__(family, type, proto, fileno)

socket.socket = _NoSocket
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
socket.gethostbyname = _no_network
socket.gethostbyname_ex = _no_network
del resource, socket, memory, cpu, limit, value

import runpy
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_CLOSED_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail at once


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed: <last error line>", "timed out after Ns"
    duration_s: float


def _child_env(workdir: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "no_proxy": "",
        "NO_PROXY": "",
    }
    for var in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy"):
        env[var] = env[var.upper()] = _CLOSED_PROXY
    return env


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "non-zero exit"
    return lines[-1][:300]


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 2048) -> ExecutionResult:
    """Run `program` as a Python script under the limits above; passed = exit status 0 in time."""
    import time

    with tempfile.TemporaryDirectory(prefix="dllm-cache-exec-") as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(program, encoding="utf-8")
        cmd = [
            sys.executable,
            "-I",
            "-c",
            _PRELUDE,
            str(script),
            str(memory_mb * 2**20),
            str(max(1, int(timeout_s) + 1)),
        ]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecutionResult(False, f"timed out after {timeout_s:g}s", time.perf_counter() - start)
        finally:
            if proc.poll() is None:  # an exception of ours (KeyboardInterrupt): leave nothing behind
                _kill_group(proc)
                proc.wait()
        duration = time.perf_counter() - start
        # Children the program left running die with their group.
        _kill_group(proc)
    if proc.returncode == 0:
        return ExecutionResult(True, "passed", duration)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = str(-proc.returncode)
        return ExecutionResult(False, f"failed: killed by {name}", duration)
    return ExecutionResult(False, f"failed: {_last_error_line(stderr)}", duration)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a model's answer: a fenced block (```python ...```; an unclosed last fence counts),
    preferring one that defines `entry_point`, then one labelled python; else the text itself."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(text)]
    if not blocks:
        return text
    if entry_point is not None:
        for _, code in blocks:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
                return code
    for lang, code in blocks:
        if lang in ("python", "py", "python3"):
            return code
    return blocks[0][1]


def truncate_at(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """`text` up to the earliest stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]
