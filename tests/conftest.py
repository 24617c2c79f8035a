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


@pytest.fixture(scope="session", autouse=True)
def early_runs(request, tmp_path_factory):
    """Long subprocess runs that a later test file reads, started when the session starts
    if that file's tests are in it: the two preflights of test_preflight.py (two single-
    threaded processes of about a minute) then overlap the in-process tests before them,
    which leave one of CI's two cores idle. {name: what the file's starter returned};
    anything still running at the end of the session is killed."""
    modules = {item.module.__name__ for item in request.session.items}
    runs = {}
    if "test_preflight" in modules:
        import test_preflight
        runs["preflight"] = test_preflight.start_preflight_runs(tmp_path_factory)
    yield runs
    for procs in runs.values():
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
