"""The scripts under bench/ start: their imports resolve (they import each other and the
package) and their argument parsers answer --help. Timing itself is never tested."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPTS = sorted(path.name for path in (REPO / "bench").glob("*.py"))

#: Runs every script's --help in one interpreter (torch is imported once), as
#: `python bench/NAME.py --help` would: bench/ first on sys.path, __name__ == "__main__".
HELP_ALL = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, "bench")
answers = {}
for name in sys.argv[1:]:
    sys.argv = [f"bench/{name}", "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(f"bench/{name}", run_name="__main__")
        code = "returned without printing usage"
    except SystemExit as stop:
        code = stop.code
    except Exception as error:
        code = f"{type(error).__name__}: {error}"
    answers[name] = [code, out.getvalue()[:200]]
print(json.dumps(answers))
"""


def test_every_bench_script_answers_help():
    assert {"step_speed.py", "sampling_speed.py", "host_memory.py"} <= set(SCRIPTS)
    done = subprocess.run(
        [sys.executable, "-c", HELP_ALL, *SCRIPTS],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {
        name: code
        for name, (code, text) in answers.items()
        if code not in (0, None) or not text.startswith("usage:")
    }
    assert not failed, failed
