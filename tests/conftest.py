import ctypes
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# A CPU training step allocates and frees (T, V) tensors of tens to hundreds of MB. glibc's
# malloc serves blocks that large with mmap and returns them to the kernel on free, so every
# step faults its pages in and zeroes them again: about a quarter of a run's CPU time, in the
# kernel. Keeping freed memory in the heap for reuse (no mmap below 1 GB, no trimming below
# 2 GB) removes that; the results are bitwise the same. Subprocesses get it from the
# environment (run.sh sets the same for its CPU demo; other C libraries ignore it), this
# process from mallopt, since its own malloc read the environment when it started.
CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647"
os.environ.setdefault("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)


def _keep_freed_memory() -> None:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


_keep_freed_memory()


# the early runs' command prefix: the lowest priority, so that a test in the foreground gets
# the CPU first (not all of it: on CI-like 2 cores an in-process training test beside the
# 1/2/4-process runs still took about 4x as long, hence test_train.py's order); by the
# `nice` program, so that no Python runs between fork and exec (they are started from a thread)
EARLY_PREFIX = ("nice", "-n", "19")


class EarlyRuns:
    """Long subprocess runs that a later test file reads, started in the background one group
    after another: `get(name)` waits until that group has started and returns what its
    starter returned (a dict holding its Popen objects)."""

    def __init__(self, starters):
        self.started, self.ready = {}, {name: threading.Event() for name, _ in starters}
        self.lock, self.stopping = threading.Lock(), False
        self.thread = threading.Thread(target=self._run, args=(starters,), daemon=True)
        self.thread.start()

    def _run(self, starters):
        for name, start in starters:
            try:
                with self.lock:  # no group starts once the session has ended (stop)
                    if not self.stopping:
                        self.started[name] = start()
            finally:
                self.ready[name].set()
            for proc in self.procs(name):  # the next group starts when this one has ended
                proc.wait()

    def stop(self) -> list:
        """No further group starts; the processes started so far."""
        with self.lock:
            self.stopping = True
            return self.procs()

    def get(self, name):
        if name not in self.ready:
            return None
        self.ready[name].wait()
        return self.started.get(name)

    def procs(self, name=None):
        names = [name] if name else list(self.started)
        return [p for n in names for p in _leaves(self.started.get(n)) if isinstance(p, subprocess.Popen)]


@pytest.fixture(scope="session", autouse=True)
def early_runs(request, tmp_path_factory):
    """Long subprocess runs that a later test file reads, started when the session starts
    (if a test that reads them is in it), at the lowest priority and one group after the
    other, so that they use the core the in-process tests leave idle (CI has two): the two
    preflights of test_preflight.py (start_preflight_runs), then the
    1/2/4-process and two-node runs of test_train.py (start_process_runs). (Not the run.sh
    demo: its two threads spin while they wait for each other, wasting a starved core.) The
    file's fixture finishes them (EarlyRuns.get); anything still running at the end is
    stopped."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    starters = []
    if "preflight_runs" in wanted:
        import test_preflight
        starters.append(("preflight", lambda: test_preflight.start_preflight_runs(tmp_path_factory, prefix=EARLY_PREFIX)))
    if "process_runs" in wanted:
        import test_train
        starters.append(("process", lambda: test_train.start_process_runs(tmp_path_factory, prefix=EARLY_PREFIX)))
    runs = EarlyRuns(starters)
    yield runs
    for proc in runs.stop():  # SIGTERM first: a torchrun agent then stops its workers
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def _leaves(tree):
    """The values in nested dicts and lists."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]
