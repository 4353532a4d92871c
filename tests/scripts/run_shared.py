"""One subprocess of the shared-folder tests: run every pair of each given shared-export folder on one fixed batch.

Usage: python run_shared.py FOLDER... Prints one JSON line per folder, flushed: ``{"logits": {"task/level": [...]}}``,
``{"refused": "<the one-line DvnError>"}``, or ``{"bug": "<type: message>"}`` for any other exception; each also
names ``outside``, the files outside the folder that Python opened while the folder was read (audit hook). A
native crash ends the process by a signal, and the count of lines printed names the folder that caused it.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401  (imported before the audit hook: its own start-up reads are not the folder's)

from dvn_cli.errors import DvnError
from dvn_cli.runtime.ort import SharedOrtRuntime

opened: list[str] = []
libraries = tuple(entry for entry in sys.path if entry)  # Python's own imports are not the folder's reads


def audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, Path)) and not str(args[0]).startswith(libraries):
        opened.append(str(args[0]))


sys.addaudithook(audit)
batch = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
for folder in map(Path, sys.argv[1:]):
    opened.clear()
    try:
        # the standard graphs: what is under test is the folder (an engine cache reads fixed files of its own, the
        # user's cache key and /proc/cpuinfo, and is tested in test_engine_cache.py)
        runtime = SharedOrtRuntime(folder, threads=1, cache=False)
        result = {"logits": {f"{t}/{lv}": runtime.run(t, lv, batch).tolist() for t, lv in runtime.pairs()}}
    except DvnError as exc:
        result = {"refused": str(exc)}
    except Exception as exc:  # a traceback for the user: the test fails on it
        result = {"bug": f"{type(exc).__name__}: {exc}"}
    inside = folder.resolve()
    result["outside"] = [p for p in opened if not Path(p).resolve().is_relative_to(inside)]
    print(json.dumps(result), flush=True)
