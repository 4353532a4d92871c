"""A shared-export folder is untrusted input (issue 18): anyone can edit its files and reseal the manifest.

Each risky case runs ``tests/scripts/run_shared.py`` (or the CLI) in a subprocess, so a segfault or bus error
fails the case by its exit code instead of killing the suite. The fuzz tests apply random header and manifest
edits (fixed seeds) and require, for every case: no crash, no traceback, exit 0 only with the logits of the
untouched folder, and no file outside the folder opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.core.network import build_network
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.shared_weights import WEIGHTS_NAME

from .conftest import REPO, settle_batch_norm, tiny_config, tiny_tasks

SCRIPT = REPO / "tests" / "scripts" / "run_shared.py"
PAIRS = [("task0", 2), ("task1", 3)]
runner = CliRunner()


def _export(root: Path, name: str, seed: int, precision: str = "fp32") -> Path:
    torch.manual_seed(seed)
    network = settle_batch_norm(build_network(tiny_config(), tiny_tasks(2)))
    checkpoint = load_checkpoint(save_checkpoint(network, root / f"{name}.safetensors"))
    export_shared(checkpoint, root / name, PAIRS, check=False, precision=precision)
    return root / name


def _exports(root: Path, precision: str) -> dict[str, Path]:
    pristine, bait = _export(root, "pristine", 0, precision), _export(root, "bait", 1, precision)
    (result,) = _run(pristine)
    return {"pristine": pristine, "bait": bait, "logits": result["logits"]}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The untouched export, another model's export (bait outside every copy), and the untouched logits."""
    return _exports(tmp_path_factory.mktemp("untrusted"), "fp32")


@pytest.fixture(scope="module")
def int8_exports(tmp_path_factory) -> dict[str, Path]:
    """The same at int8: int8 blocks, their float32 scales, format 3 (no page alignment)."""
    return _exports(tmp_path_factory.mktemp("untrusted-int8"), "int8")


@pytest.fixture
def folder(exports, tmp_path) -> Path:
    return shutil.copytree(exports["pristine"], tmp_path / "copy")


def _run(*folders: Path) -> list[dict]:
    """One result per folder from a subprocess; a native crash fails here, naming the folder that caused it."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, folders)], capture_output=True, text=True, timeout=600
    )
    lines = result.stdout.splitlines()
    crashed = folders[len(lines)] if len(lines) < len(folders) else None
    assert result.returncode == 0, f"exit {result.returncode} on {crashed}: {result.stderr[-2000:]}"
    return [json.loads(line) for line in lines]


def _reseal(folder: Path) -> None:
    """Put the weights file's new size and sha256 into the manifest, as anyone can."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (folder / WEIGHTS_NAME).read_bytes()
    manifest["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    path.write_text(json.dumps(manifest))


def _edit_header(folder: Path, change, length_of=None) -> bool:
    """Rewrite the weights file's JSON header (padded to its old length) and reseal; False if it does not fit."""
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > n:
        return False
    length = n if length_of is None else length_of(n, len(data))
    path.write_bytes(length.to_bytes(8, "little", signed=length < 0) + text.ljust(n) + data[8 + n :])
    _reseal(folder)
    return True


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _tensors(header: dict) -> list[str]:
    return [name for name in header if name != "__metadata__" and not name.startswith("__pad__.")]


def _refused(results: list[dict], message: str) -> None:
    for result in results:
        assert "refused" in result and message in result["refused"], result
        assert not result["outside"], result


# ------------------------------------------------------------------------------------------------ row 1


@pytest.mark.parametrize("before", [10**12, 100000, 0])
def test_negative_offsets_are_refused_not_read(folder, before):
    """Offsets before the data section: a segfault (10**12), the header read as weights (0), memory before it."""

    def change(header):
        name = _tensors(header)[0]
        begin, end = header[name]["data_offsets"]
        n = int.from_bytes((folder / WEIGHTS_NAME).read_bytes()[:8], "little")
        header[name]["data_offsets"] = [-n - before, -n - before + end - begin]

    assert _edit_header(folder, change)
    _refused(_run(folder), "has an invalid tensor index")


@pytest.mark.slow
def test_cli_refuses_negative_offsets_in_one_line(folder, tmp_path):
    def change(header):
        name = _tensors(header)[0]
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [-(10**12), -(10**12) + end - begin]

    assert _edit_header(folder, change)
    Image.new("RGB", (12, 12), (200, 30, 30)).save(tmp_path / "red.png")
    args = [sys.executable, "-m", "dvn_cli", "predict", str(tmp_path / "red.png"), "-c", str(folder)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert len(result.stderr.strip().splitlines()) == 1 and "has an invalid tensor index" in result.stderr


# ------------------------------------------------------------------------------------------------ row 2


def _overlap(header):
    first, second = _tensors(header)[:2]
    begin = header[first]["data_offsets"][0]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    header[second]["data_offsets"] = [begin, begin + size]


def _swap(header):
    """Two blocks of one shape exchange their ranges: every range still valid, the data of the other block."""
    weights = [n for n in _tensors(header) if n.startswith("features.") and ".weight" in n]
    a, b = next((a, b) for a in weights for b in weights if a < b and header[a]["shape"] == header[b]["shape"])
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


def _misalign(header):
    """Move a tensor 8 bytes back, shrinking the padding before it and growing the padding after: still tiled."""
    names = list(header)
    i = next(i for i in range(1, len(names) - 1) if all(names[j].startswith("__pad__.") for j in (i - 1, i + 1)))
    before, block, after = (header[names[j]] for j in (i - 1, i, i + 1))
    before["shape"] = [before["shape"][0] - 8]
    before["data_offsets"][1] -= 8
    block["data_offsets"] = [o - 8 for o in block["data_offsets"]]
    after["shape"] = [after["shape"][0] + 8]
    after["data_offsets"][0] -= 8


def _large_off_page(header):
    """Merge the packed tensors from one that is not on a page into one tensor of a page or more: still tiled, on a
    64-byte boundary, but a tensor that large must start on a page."""
    names = [n for n in header if n != "__metadata__"]
    first = next(i for i, n in enumerate(names) if header[n]["data_offsets"][0] % 4096 and not n.startswith("__pad"))
    begin = header[names[first]]["data_offsets"][0]
    last = next(i for i in range(first, len(names)) if header[names[i]]["data_offsets"][1] - begin >= 4096)
    end = header[names[last]]["data_offsets"][1]
    for name in names[first + 1 : last + 1]:
        del header[name]
    header[names[first]] = {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}


def _wrong_length(header):
    name = _tensors(header)[0]
    header[name]["shape"][0] += 1


@pytest.mark.parametrize(
    "change, message",
    [
        (_overlap, "where the tensor listed before it ends"),
        (_swap, "where the tensor listed before it ends"),
        (_misalign, "does not start on a 64-byte boundary"),
        (_large_off_page, "does not start on a 4096-byte boundary"),
        (_wrong_length, "bytes for a shape of"),
    ],
)
def test_overlapping_swapped_or_misaligned_tensors_are_refused(folder, change, message):
    assert _edit_header(folder, change)
    _refused(_run(folder), message)


# ------------------------------------------------------------------------------------------------ row 3


def _outside_cases(folder: Path, exports: dict) -> dict[str, object]:
    bait, graph = exports["bait"], "task0-level2.onnx"
    shutil.copy(bait / graph, folder.parent / "x.onnx")
    return {
        "weights ..": lambda m: m["weights"].update(file="../bait/" + WEIGHTS_NAME),
        "weights absolute": lambda m: m["weights"].update(file=str(bait / WEIGHTS_NAME)),
        "graph ..": lambda m: m["models"][0].update(file="../x.onnx"),
        "graph absolute": lambda m: m["models"][0].update(file=str(bait / graph)),
        "weights link": WEIGHTS_NAME,
        "graph link": graph,
    }


def test_every_manifest_path_stays_inside_the_folder(exports, tmp_path):
    folders = []
    for i, change in enumerate(_outside_cases(tmp_path, exports).values()):
        copy = shutil.copytree(exports["pristine"], tmp_path / f"case{i}")
        if isinstance(change, str):  # a link out, where the file was
            (copy / change).unlink()
            (copy / change).symlink_to(exports["bait"] / change)
        else:
            _edit_manifest(copy, change)
        folders.append(copy)
    results = _run(*folders)
    _refused(results[:4], "every file must be inside the folder")
    _refused(results[4:], "outside")


def test_cli_refuses_a_graph_outside_the_folder_in_one_line(folder, exports, tmp_path):
    """It was a full onnxruntime traceback."""
    shutil.copy(folder / "task0-level2.onnx", tmp_path / "x.onnx")
    _edit_manifest(folder, lambda m: m["models"][0].update(file="../x.onnx"))
    result = runner.invoke(app, ["info", "-c", str(folder)])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
    assert "names graph '../x.onnx': every file must be inside the folder" in result.stderr


# ------------------------------------------------------------------------------------------------ row 5

CHANGE_IN_USE = """
import json, os, sys
import numpy as np
from dvn_cli.runtime.ort import SharedOrtRuntime
from dvn_cli.errors import WrongFileFormat

folder, other = sys.argv[1], open(sys.argv[2], "rb").read()
weights = os.path.join(folder, "weights.safetensors")
x = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
out = {}
runtime = SharedOrtRuntime(folder, threads=1, cache=False)  # the folder's own file (the cache's: test_engine_cache)
out["before"] = runtime.run("task0", 2, x).tolist()
with open(weights, "r+b") as f:  # what cp does: truncate, then write
    f.truncate(len(other) // 3)
    out["truncated"] = runtime.run("task0", 2, x).tolist()  # a memory map: SIGBUS here
    f.write(other)
out["overwritten"] = runtime.run("task0", 2, x).tolist()
try:
    runtime.run("task1", 3, x)  # a new session needs tensors not read yet
except WrongFileFormat as exc:
    out["new session"] = str(exc)
print(json.dumps(out))
"""


def test_a_weights_file_changed_in_use_is_never_read(folder, exports):
    """Sessions made keep the checked tensors; a session made after the change is refused in one line."""
    args = [sys.executable, "-c", CHANGE_IN_USE, str(folder), str(exports["bait"] / WEIGHTS_NAME)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    out = json.loads(result.stdout)
    expected = exports["logits"]["task0/2"]
    assert out["before"] == out["truncated"] == out["overwritten"] == expected
    assert "changed while in use" in out["new session"] and "\n" not in out["new session"]


def test_a_weights_file_replaced_by_rename_is_never_read(folder, exports):
    """The runtime holds the checked file open: a new file moved into its place (export --shared) is not used."""
    from dvn_cli.runtime.ort import SharedOrtRuntime

    runtime = SharedOrtRuntime(folder, threads=1, cache=False)
    shutil.copy(exports["bait"] / WEIGHTS_NAME, folder / "new")
    os.replace(folder / "new", folder / WEIGHTS_NAME)
    import numpy as np

    x = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
    assert runtime.run("task1", 3, x).tolist() == exports["logits"]["task1/3"]


# ------------------------------------------------------------------------------------------------ row 6


def test_a_tensor_named_twice_is_refused_in_one_line_naming_the_manifest(folder):
    """It was onnxruntime's 'An OrtValue for this name has already been added', with a traceback."""
    _edit_manifest(folder, lambda m: m["models"][1]["tensors"].__setitem__(0, m["models"][1]["tensors"][1]))
    result = runner.invoke(app, ["info", "-c", str(folder)])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
    assert f"{folder / 'manifest.json'} lists tensor" in result.stderr and "twice for task1 level 3" in result.stderr


# ------------------------------------------------------------------------------------------------ fuzz

CASES, BATCH = 200, 25
JUNK = [None, True, -1, 0, 1, 1.5, 2**63, 2**64 + 8, -(10**12), "", "x", "..", [], {}, [0], {"a": 1}]


def _fuzz_header(rng: random.Random, header: dict) -> None:
    """One random edit of a weights file's index: a number, a shape, a dtype, a swap, a deletion, a junk entry."""
    names = [n for n in header if n != "__metadata__"]
    name, other = rng.choice(names), rng.choice(names)
    entry, kind = header[name], rng.randrange(7)
    begin, end = entry["data_offsets"]
    if kind == 0:
        entry["data_offsets"][rng.randrange(2)] = rng.choice([begin, end]) + rng.choice([-4096, -8, -1, 1, 8, 4096])
    elif kind == 1:
        delta = rng.choice([-(10**12), -100000, -4096, -8, 8, 4096, 2**62])
        entry["data_offsets"] = [begin + delta, end + delta]
    elif kind == 2:
        entry["shape"] = [*entry["shape"], 1] if rng.random() < 0.3 else [rng.choice([0, 1, 2, 2**40, -1, "3"])]
    elif kind == 3:
        entry["dtype"] = rng.choice(["F16", "I8", "U8", "F32", "F64", "I64", "BOOL", None, 3])
    elif kind == 4:
        entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    elif kind == 5:
        del header[name]
    else:
        header[name] = rng.choice(JUNK)
    if rng.random() < 0.1:
        header["__metadata__"] = rng.choice([{}, {"dvn": "{}"}, {"dvn": 3}, JUNK[0]])


def _leaves(value, path=()):
    """Every (path, value) inside a JSON value, containers included."""
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _leaves(child, (*path, key))


def _fuzz_manifest(rng: random.Random, manifest: dict, folder: Path, bait: Path) -> None:
    """One random edit of a manifest: a file name (inside, outside, a link out), a tensor list, any value."""
    models, kind = manifest["models"], rng.randrange(6)
    entry = rng.choice([manifest["weights"], *models])
    if kind == 0:
        outside = ["../bait/" + WEIGHTS_NAME, str(bait / WEIGHTS_NAME), str(bait / "task0-level2.onnx"), "/dev/zero"]
        inside = ["", ".", "manifest.json", WEIGHTS_NAME, "sub/../" + WEIGHTS_NAME, *(m["file"] for m in models)]
        entry["file"] = rng.choice(outside + inside)
    elif kind == 1:  # another export's file, and its size and sha256, as a user who knows the format would
        source = bait / (WEIGHTS_NAME if entry is manifest["weights"] else rng.choice(models)["file"])
        data = source.read_bytes()
        entry.update(file=os.path.relpath(source, folder), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    elif kind == 2:
        name = WEIGHTS_NAME if entry is manifest["weights"] else entry["file"]
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(bait / name)
    elif kind == 3:
        names = rng.choice(models)["tensors"]
        i = rng.randrange(len(names))
        edits = [
            lambda: names.append(names[i]),
            lambda: names.pop(i),
            lambda: names.__setitem__(i, rng.choice(models[0]["tensors"] + models[-1]["tensors"])),
            lambda: names.__setitem__(i, rng.choice(JUNK)),
            lambda: rng.shuffle(names),
        ]
        rng.choice(edits)()
    else:
        path, _ = rng.choice(list(_leaves(manifest))[1:])
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if kind == 4 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = rng.choice([*JUNK, "task1", 3, "../x", str(bait)])


def _check_fuzz(results: list[dict], folders: list[Path], logits: dict) -> None:
    for folder, result in zip(folders, results, strict=True):
        assert "bug" not in result, (folder, result)
        assert not result["outside"], (folder, result)
        assert result.get("logits", logits) == logits, f"{folder}: exit 0 with changed logits"
        assert "\n" not in result.get("refused", ""), result


def _fuzz(exports: dict, tmp_path: Path, seed: int, edit, cases: int = CASES) -> list[dict]:
    """``cases`` edited copies of the export, run ``BATCH`` at a time; the graphs are hard links (not edited)."""
    rng, results = random.Random(seed), []
    for start in range(0, cases, BATCH):
        folders = []
        for i in range(start, min(start + BATCH, cases)):
            folder = tmp_path / f"case{i}"
            folder.mkdir()
            for file in exports["pristine"].iterdir():
                (os.link if file.suffix == ".onnx" else shutil.copy)(file, folder / file.name)
            edit(rng, folder)
            folders.append(folder)
        batch = _run(*folders)
        _check_fuzz(batch, folders, exports["logits"])
        results += batch
        for folder in folders:
            shutil.rmtree(folder)
    return results


@pytest.mark.slow
def test_random_header_edits_never_crash_nor_change_the_output(exports, tmp_path):
    def edit(rng, folder):
        while not _edit_header(folder, lambda header: _fuzz_header(rng, header)):
            pass

    results = _fuzz(exports, tmp_path, 18, edit)
    assert sum("refused" in r for r in results) >= CASES * 0.9  # most edits break the index


@pytest.mark.slow
def test_random_header_edits_of_an_int8_file_never_crash_nor_change_the_output(int8_exports, tmp_path):
    def edit(rng, folder):
        while not _edit_header(folder, lambda header: _fuzz_header(rng, header)):
            pass

    results = _fuzz(int8_exports, tmp_path, 23, edit, cases=100)
    assert sum("refused" in r for r in results) >= 100 * 0.9


def _first(header: dict, dtype: str) -> str:
    return next(n for n in _tensors(header) if header[n]["dtype"] == dtype)


def _retype(dtype: str, new: str, factor: int = 1):
    """Say that the first tensor of ``dtype`` is of type ``new``, its shape's first axis times ``factor``."""

    def change(header):
        entry = header[_first(header, dtype)]
        entry["dtype"], entry["shape"] = new, [entry["shape"][0] * factor, *entry["shape"][1:]]

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_retype("I8", "U8"), "disagree on tensor"),  # same bytes, another type: the graph says int8
        (_retype("F32", "I8", 4), "disagree on tensor"),  # a scale read as 4x as many int8 values
        (_retype("I8", "F32"), "bytes for a shape of"),  # int8 bytes read as float32: the length says no
        (_retype("I8", "F16"), "bytes for a shape of"),
    ],
)
def test_lower_precision_type_lies_are_refused(int8_exports, tmp_path, change, message):
    folder = shutil.copytree(int8_exports["pristine"], tmp_path / "copy")
    assert _edit_header(folder, change)
    _refused(_run(folder), message)


@pytest.mark.slow
def test_random_manifest_edits_never_crash_nor_change_the_output(exports, tmp_path):
    def edit(rng, folder):
        _edit_manifest(folder, lambda manifest: _fuzz_manifest(rng, manifest, folder, exports["bait"]))

    results = _fuzz(exports, tmp_path, 18, edit)
    assert sum("refused" in r for r in results) >= CASES * 0.5


# ------------------------------------------------------------------------------------------------ what the fuzz found


def _extra_dimension(header):
    name = _tensors(header)[0]
    header[name]["shape"] = [*header[name]["shape"], 1]  # same bytes, another shape


def _graphs_swapped(manifest):
    a, b = manifest["models"]
    a["file"], b["file"] = b["file"], a["file"]
    for key in ("sha256", "bytes", "tensors", "views"):  # resealed: only the stamp in the graph tells them apart
        a[key], b[key] = b.get(key), a.get(key)


def test_a_graph_must_be_the_one_its_entry_describes(exports, tmp_path):
    """A valid index with a shape the graph does not declare (a traceback at run time), a graph under another pair's
    entry, and a level that is not a whole number are each refused in one line."""
    folders = [shutil.copytree(exports["pristine"], tmp_path / f"case{i}") for i in range(4)]
    assert _edit_header(folders[0], _extra_dimension)
    _edit_manifest(folders[1], _graphs_swapped)
    _edit_manifest(folders[2], lambda m: m["models"][0].update(level="2"))
    _edit_manifest(folders[3], lambda m: m["models"][1].update(level=2, task="task0"))
    first, second, third, fourth = _run(*folders)
    _refused([first], "and the weights file disagree on tensor")
    _refused([second], "is not the graph of task0 level 2 its manifest entry describes")
    _refused([third], "models[0] has no valid level")
    _refused([fourth], "lists task0 level 2 twice")


def test_a_spec_that_describes_another_pair_is_refused(folder):
    """The spec labels predict's output (its classes): it must describe its entry."""
    _edit_manifest(folder, lambda m: m["models"][1]["spec"]["task"].update(classes=["x", "y", "z"]))
    result = runner.invoke(app, ["info", "-c", str(folder)])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
    assert "the manifest's spec for task1 level 3 describes another (task, level), units or classes" in result.stderr


# ------------------------------------------------------------------------------------------------ issue 29


def _set_values(folder: Path, pick, value: float) -> str:
    """Set every number of the first float tensor ``pick(name, header)`` selects to ``value`` and reseal."""
    path = folder / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in _tensors(header) if pick(k, header))
    begin, end = header[name]["data_offsets"]
    dtype = np.dtype({"F32": np.float32, "F16": np.float16}[header[name]["dtype"]])
    data[8 + n + begin : 8 + n + end] = np.full((end - begin) // dtype.itemsize, value, dtype).tobytes()
    path.write_bytes(bytes(data))
    _reseal(folder)
    return name


def _int8_scale(name: str, header: dict) -> bool:
    return name.endswith(".scale") and header.get(name.removesuffix(".scale"), {}).get("dtype") == "I8"


def test_non_finite_values_and_bad_int8_scales_are_refused_at_open_naming_the_tensor(exports, int8_exports, tmp_path):
    """A folder whose numbers are NaN or infinite, or whose int8 scales are not > 0, answered NaN (predict exited 0)
    or 8 % at every level (eval): refused when it is opened, as a checkpoint with such values is."""
    fp16 = _export(tmp_path, "fp16", 0, "fp16")
    cases = [
        (int8_exports["pristine"], _int8_scale, float("nan"), "non-finite values (NaN or infinity)"),
        (int8_exports["pristine"], _int8_scale, 0.0, "an int8 scale that is not > 0"),
        (int8_exports["pristine"], _int8_scale, -0.5, "an int8 scale that is not > 0"),
        (
            fp16,
            lambda name, header: header[name]["dtype"] == "F16",
            float("inf"),
            "non-finite values (NaN or infinity)",
        ),
        (
            exports["pristine"],
            lambda name, header: name.endswith(".shift"),
            float("nan"),
            "non-finite values (NaN or infinity)",
        ),
    ]
    folders, messages = [], []
    for i, (source, pick, value, problem) in enumerate(cases):
        folder = shutil.copytree(source, tmp_path / f"case{i}")
        name = _set_values(folder, pick, value)
        folders.append(folder)
        messages.append(f"{folder / WEIGHTS_NAME} holds {problem} in {name}; it cannot be used")
    for result, message in zip(_run(*folders), messages, strict=True):
        _refused([result], message)
    result = runner.invoke(app, ["predict", str(tmp_path / "x.png"), "-c", str(folders[0]), "--json"])
    assert result.exit_code == 1 and result.stderr == f"error: {messages[0]}\n", result.output


@pytest.mark.parametrize("end", ["trailing bytes", "ends early"])
def test_a_weights_file_must_end_where_its_last_tensor_ends(folder, end):
    """The index must tile the data section to the end of the file: bytes after the last tensor, or a last tensor
    cut short, are refused by the index check itself (the manifest resealed to the new size and sha256)."""
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data + bytes(64) if end == "trailing bytes" else data[:-64])
    _reseal(folder)
    expected = len(data) - 64 if end == "ends early" else len(data) + 64
    _refused(_run(folder), f"has an invalid tensor index (its tensors end at byte {len(data)} of {expected})")


def test_a_shared_folder_without_its_manifest_names_the_manifest(folder):
    """It said "is not a regular file" (the folder was taken for a model file); every command names the manifest."""
    (folder / "manifest.json").unlink()
    for args in (["info"], ["predict", str(folder / "x.png")], ["serve", "--port", "0"]):
        result = runner.invoke(app, [*args, "-c", str(folder)])
        assert result.exit_code == 1 and result.stderr == (
            f"error: {folder} is a folder without manifest.json: pass a model file, or a folder dvn export --shared "
            "wrote\n"
        ), result.output
