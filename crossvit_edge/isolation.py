"""The first load of an artifact in a child process, so that a runtime that dies on it does not take
the caller with it.

A bundle that passes every check of ``open_bundle`` can still hold bytes that a native runtime
does not survive: ExecuTorch verifies a program's flatbuffer (``Verification::InternalConsistency``)
but a delegate's blob is opaque to it, and XNNPACK aborts the process (SIGABRT) on a corrupted
one; ONNX Runtime and TensorRT are C++ parsers too. So the CLIs (and ``crossvit_edge.runtime.load``
unless told otherwise) first build the Runner in a forked child and run one batch of zeros
through it. The child's stdout and stderr go to /dev/null (a runtime's own log lines would break
the one-line error); it reports back through a pipe. Its death by a signal, a hang past the time
limit or an error becomes one ``UserError`` line in the parent, which then loads the same verified
bytes itself. Artifacts that passed are remembered for the rest of the process (by path and
sha256), so a second load costs nothing.

Linux only: ``fork`` without ``exec`` is unsafe with Apple's frameworks (Core ML) and missing on
Windows; elsewhere the load runs in the caller's process (docs/security.md says so). Runtimes in
the child are fork-safe as used here: ExecuTorch's and PyTorch's thread pools leak and recreate
themselves after a fork, ONNX Runtime's belong to the session the child creates; the TensorRT
device runner forks before it touches CUDA. What the child runs must not include torch's
OpenMP-parallel operators: once the parent has used OpenMP (``profile`` runs its PyTorch
reference first), libgomp hangs in a forked child (measured: ``torch.zeros(1, 3, 240, 240)`` never
returns there). The runners' load and run paths use none (``torch.from_numpy``, ExecuTorch's own
thread pool); a hang would end in the time-limit error, not a hung command.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any, Callable, Dict, Optional, Set, Tuple

from .errors import UserError, brief

CHILD_TIMEOUT_S = 600.0  # a first load of the largest model (XNNPACK weight packing) takes seconds
# What the first load in the child may use, derived from the bundle (``child_limits``): memory (the
# child's data segment, RLIMIT_DATA, over what it had when forked) of CHILD_MEMORY_BASE plus
# CHILD_MEMORY_PER_ARTIFACT_BYTE times the artifact's listed bytes (a runtime's own copy, XNNPACK's
# packed weights) plus CHILD_MEMORY_PER_INPUT_BYTE times one batch of input (activations, planned
# once); CPU time (all threads, RLIMIT_CPU) of CHILD_CPU_BASE_S plus CHILD_CPU_PER_GIB_S per GiB of
# artifact, per pool thread. RLIMIT_DATA, not RLIMIT_AS: the runtimes reserve address space they
# never touch (glibc's 64 MiB arena per thread, thread stacks), which RLIMIT_AS would count.
CHILD_MEMORY_BASE = 1 << 30
CHILD_MEMORY_PER_ARTIFACT_BYTE = 4
CHILD_MEMORY_PER_INPUT_BYTE = 32
CHILD_CPU_BASE_S = 60
CHILD_CPU_PER_GIB_S = 60
_MAX_REPORT = 1 << 20

_passed: Set[Tuple[str, str]] = set()  # (path, sha256) that loaded and ran in a child


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def child_limits(artifact_bytes: int, input_batch_bytes: int, threads: Optional[int]) -> Tuple[int, int]:
    """(memory bytes, CPU seconds) that a first load of an artifact of ``artifact_bytes`` running
    batches of ``input_batch_bytes`` may use, on a pool of ``threads`` (default: the cores)."""
    memory = CHILD_MEMORY_BASE + CHILD_MEMORY_PER_ARTIFACT_BYTE * artifact_bytes + CHILD_MEMORY_PER_INPUT_BYTE * input_batch_bytes
    pool = max(1, threads or os.cpu_count() or 1)
    cpu = int((CHILD_CPU_BASE_S + CHILD_CPU_PER_GIB_S * artifact_bytes / (1 << 30)) * pool) + 1
    return memory, cpu


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit_child(memory: Optional[int], cpu: Optional[int]) -> None:
    import resource

    if memory is not None:
        cap = _data_segment_bytes() + memory
        hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    if cpu is not None:
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime) + cpu  # RLIMIT_CPU counts the process's time so far
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if hard == resource.RLIM_INFINITY or soft + 5 <= hard:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 5 if hard == resource.RLIM_INFINITY else hard))


def in_child(what: str, fn: Callable[[], Any], timeout: float = CHILD_TIMEOUT_S,
             memory: Optional[int] = None, cpu: Optional[int] = None) -> Any:
    """Run ``fn`` in a forked child and return its result (JSON-serialisable). The child's
    UserError is raised here with its message; any other exception, its death by a signal or a
    hang past ``timeout`` seconds is a UserError naming ``what``. ``memory`` (bytes over what the
    child had when forked) and ``cpu`` (seconds) bound the child (RLIMIT_DATA, RLIMIT_CPU)."""
    if not available():
        return fn()
    bounds = ""
    if memory is not None or cpu is not None:
        bounds = (f" (bounded to {memory >> 20} MiB of memory" if memory is not None else " (bounded to") + \
                 (f", {cpu} s of CPU time)" if cpu is not None else ")")
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _child(read_end, write_end, fn, memory, cpu)
    os.close(write_end)
    try:
        raw = _read_all(read_end, pid, timeout, what)
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        os.close(read_end)
        if pid:
            _kill(pid)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
        if number == signal.SIGXCPU:
            raise UserError(f"{what}: loading it used more CPU time than this bundle's bound{bounds}: the artifact is corrupt or "
                            "hostile (it was loaded in a child process first, now stopped)")
        raise UserError(f"{what}: the runtime killed its process ({name}) loading or running it{bounds}: the artifact is corrupt or "
                        "hostile (it was loaded in a child process first, so only that one died)")
    try:
        report = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise UserError(f"{what}: the child process that loaded it exited ({os.waitstatus_to_exitcode(status)}) without a result") from None
    if "error" in report:
        if report.get("memory"):
            raise UserError(f"{what}: loading it needed more memory than this bundle's bound{bounds}: the artifact is corrupt "
                            "or hostile (it was loaded in a child process first, now stopped)")
        raise UserError(str(report["error"]))
    return report.get("result")


def _child(read_end: int, write_end: int, fn: Callable[[], Any], memory: Optional[int] = None, cpu: Optional[int] = None) -> None:
    code = 0
    try:
        os.close(read_end)
        _limit_child(memory, cpu)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent handles Ctrl-C and kills us
        import faulthandler

        faulthandler.disable()  # a runtime's abort is reported by the parent, in one line, not as a thread dump
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            report: Dict[str, Any] = {"result": fn()}
        except UserError as e:
            report = {"error": str(e)}
        except MemoryError:  # the runtime's allocation failed at the bound (RLIMIT_DATA)
            report = {"error": "MemoryError", "memory": True}
        except BaseException as e:  # noqa: BLE001: whatever the runtime raised, reported in one line
            report = {"error": f"{type(e).__name__}: {brief(str(e), 300)}"}
        data = json.dumps(report, default=str).encode()[:_MAX_REPORT]
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view):]
    except BaseException:  # noqa: BLE001
        code = 70
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers


def _read_all(fd: int, pid: int, timeout: float, what: str) -> bytes:
    chunks, total, deadline = [], 0, time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            _kill(pid)
            raise UserError(f"{what}: loading it did not finish within {timeout:.0f} s (in a child process, now stopped)")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total <= _MAX_REPORT:
            chunks.append(chunk)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def probe_runner(bundle, stand_in: bool = False, threads: Optional[int] = None) -> None:
    """Build ``bundle``'s Runner (or its stand-in's) in a child and run one batch of zeros through
    it: what ``Bundle.runner`` would load here, loaded there first. A no-op for an artifact that
    already passed in this process, and where ``available()`` is false."""
    from crossvit_edge.converters.base import runner_class

    entry = bundle.stand_in if stand_in else bundle.manifest["artifact"]
    if not available() or not runner_class(entry["kind"]).isolate_first_load:
        return
    key = (str(bundle.path(entry["file"], "artifact.file")), _listed_digest(bundle.manifest, entry["file"]))
    if key in _passed:
        return

    def load_and_run():
        import numpy as np

        runner = bundle.runner(stand_in=stand_in, threads=threads)
        size = bundle.preprocessing.input_size
        out = np.asarray(runner.run(np.zeros((runner.batch_size, 3, size, size), np.float32)))
        if out.shape != (runner.batch_size, bundle.num_classes):
            raise UserError(f"bundle {bundle.name}: the artifact returned logits of shape {tuple(out.shape)}, "
                            f"the manifest says ({runner.batch_size}, {bundle.num_classes})")
        return None

    size = bundle.preprocessing.input_size
    batch_input = int(bundle.manifest["input"]["shape"][0]) * 3 * size * size * 4
    memory, cpu = child_limits(_listed_bytes(bundle.manifest, entry["file"]), batch_input, threads)
    in_child(f"bundle {bundle.name}: {brief(entry['file'], 120)}", load_and_run, memory=memory, cpu=cpu)
    _passed.add(key)


def isolated_runner(bundle, stand_in: bool = False, threads: Optional[int] = None):
    """``bundle.runner(...)`` after ``probe_runner`` loaded the same artifact in a child first."""
    probe_runner(bundle, stand_in=stand_in, threads=threads)
    return bundle.runner(stand_in=stand_in, threads=threads)


def _listed_digest(manifest: Dict[str, Any], rel: str) -> str:
    """The sha256 of a listed file, or of every listed file of a package folder, in order."""
    files = manifest["files"]
    if rel in files:
        return files[rel]["sha256"]
    prefix = rel.rstrip("/") + "/"
    return ",".join(files[f]["sha256"] for f in sorted(files) if f.startswith(prefix))


def _listed_bytes(manifest: Dict[str, Any], rel: str) -> int:
    """The listed size of a file, or of every listed file of a package folder."""
    files = manifest["files"]
    if rel in files:
        return int(files[rel]["bytes"])
    prefix = rel.rstrip("/") + "/"
    return sum(int(files[f]["bytes"]) for f in files if f.startswith(prefix))
