import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The trainers the tests start (subprocesses inherit this) allocate and free (T, V) tensors
# of hundreds of MB per CPU step: glibc 2.35+ then backs them with transparent huge pages,
# and the runs spend a third less time in page faults (run.sh sets the same for its CPU
# demo). The results are bitwise the same; other C libraries ignore the variable.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")


EARLY_NICE = 19  # the early runs get little CPU while a test in the foreground wants it


@pytest.fixture(scope="session", autouse=True)
def early_runs(request, tmp_path_factory):
    """Long subprocess runs that a later test file reads, started when the session starts
    (if a test that reads them is in it) at a lower priority, so that they use the core the
    in-process tests before that file leave idle (CI has two) without slowing them: the
    two preflights of test_preflight.py (start_preflight_runs), the 1/2/4-process and
    two-node runs (start_process_runs) and the run.sh demo (start_demo) of test_train.py.
    {name: what the starter returned};
    the file's fixture finishes them, and anything still running at the end is stopped."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    runs = {}
    if "preflight_runs" in wanted:
        import test_preflight
        runs["preflight"] = test_preflight.start_preflight_runs(tmp_path_factory, nice=EARLY_NICE)
    if "process_runs" in wanted:
        import test_train
        runs["process"] = test_train.start_process_runs(tmp_path_factory, nice=EARLY_NICE)
    if "demo_run" in wanted:
        import test_train
        runs["demo"] = test_train.start_demo(tmp_path_factory, nice=EARLY_NICE)
    yield runs
    procs = [p for p in _leaves(runs) if isinstance(p, subprocess.Popen)]
    for proc in procs:  # SIGTERM first: a torchrun agent then stops its workers
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
