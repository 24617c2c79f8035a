import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The trainers the tests start (subprocesses inherit this) allocate and free (T, V) tensors
# of hundreds of MB per CPU step: glibc 2.35+ then backs them with transparent huge pages,
# and the runs spend a third less time in page faults (run.sh sets the same for its CPU
# demo). The results are bitwise the same; other C libraries ignore the variable.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")


EARLY_NICE = 19  # the early runs run only on CPU time the tests in the foreground leave idle


@pytest.fixture(scope="session", autouse=True)
def early_runs(request, tmp_path_factory):
    """Long subprocess runs that a later test file reads, started when the session starts
    (if a test that reads them is in it) at a lower priority, so that they use the core the
    in-process tests before that file leave idle (CI has two) without slowing them: the
    two preflights of test_preflight.py (start_preflight_runs) and the 1/2/4-process and
    two-node runs of test_train.py (start_process_runs). {name: what the starter returned};
    the file's fixture finishes them, and anything still running at the end is killed."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    runs = {}
    if "preflight_runs" in wanted:
        import test_preflight
        runs["preflight"] = test_preflight.start_preflight_runs(tmp_path_factory, nice=EARLY_NICE)
    if "process_runs" in wanted:
        import test_train
        runs["process"] = test_train.start_process_runs(tmp_path_factory, nice=EARLY_NICE)
    yield runs
    procs = list(runs.get("preflight", {}).values())
    procs += list(runs.get("process", {}).get("procs", {}).values()) + runs.get("process", {}).get("agents", [])
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
