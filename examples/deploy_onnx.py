"""Classify images with a model from ``dvn export``, using only onnxruntime, numpy and PIL (no dvn, no torch).

The manifest beside the ONNX files says how to turn a raw image into the model's input: convert it to grey or
RGB, zero-pad it centred (``pad``, images no larger than the input) or resize it bilinearly to height x width
(``bilinear``: a JPEG is first decoded at a reduced scale, PIL's ``draft``, as dvn reads folder images), scale
pixels to 0..1, then normalise each channel with the task's mean and std.

Usage::

    dvn export -o exported
    python examples/deploy_onnx.py exported/manifest.json --task mnist --level 2 digit.png other.png

prints one ``path: class (probability)`` line per image. ``--level`` defaults to the largest level exported for
the task; ``--task`` may be left out when the manifest holds a single task. A graph of a shared export
(``dvn export --shared``) runs too: its blocks are read from the weights file beside it (to keep each block in
memory once for several tasks in one process, use ``dvn_cli.runtime.ort.SharedOrtRuntime``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def pick_model(manifest: dict, task: str | None, level: int | None) -> dict:
    """The manifest entry of (task, level); level defaults to the task's largest."""
    tasks = sorted({m["task"] for m in manifest["models"]})
    if task is None:
        if len(tasks) != 1:
            sys.exit(f"error: pass --task; this manifest has {', '.join(tasks)}")
        task = tasks[0]
    models = [m for m in manifest["models"] if m["task"] == task]
    if not models:
        sys.exit(f"error: no model for task {task!r}; this manifest has {', '.join(tasks)}")
    if level is None:
        return max(models, key=lambda m: m["level"])
    for model in models:
        if model["level"] == level:
            return model
    sys.exit(f"error: task {task} has levels {sorted(m['level'] for m in models)}, not {level}")


def preprocess(path: Path, pre: dict) -> np.ndarray:
    """One image file -> float32 (C, H, W), exactly as the manifest's ``preprocess`` says."""
    height, width = pre["height"], pre["width"]
    mode = "L" if pre["channels"] == 1 else "RGB"
    with Image.open(path) as image:
        if pre["resize"] == "bilinear":  # a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale >= the input
            image.draft(mode, (width, height))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert(mode)
        w, h = image.size
        if pre["resize"] == "pad" and w <= width and h <= height:
            canvas = Image.new(image.mode, (width, height), 0)
            canvas.paste(image, ((width - w) // 2, (height - h) // 2))
            image = canvas
        elif (w, h) != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3), in 0..1
    pixels = pixels.reshape(height, width, -1).transpose(2, 0, 1)  # (C, H, W)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="manifest.json written by dvn export")
    parser.add_argument("images", type=Path, nargs="+", help="image files to classify")
    parser.add_argument("--task", help="task name (default: the only task in the manifest)")
    parser.add_argument("--level", type=int, help="level (default: the largest exported)")
    args = parser.parse_args()

    manifest = json.loads(args.manifest.read_text())
    model = pick_model(manifest, args.task, args.level)
    model_path = args.manifest.parent / model["file"]
    data = model_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != model["sha256"]:
        sys.exit(f"error: {model_path} does not match the sha256 in {args.manifest}")

    options = ort.SessionOptions()
    if manifest.get("layout") == "shared":  # dvn export --shared: the graph's weights are in one shared file
        weights = args.manifest.parent / manifest["weights"]["file"]
        if hashlib.sha256(weights.read_bytes()).hexdigest() != manifest["weights"]["sha256"]:
            sys.exit(f"error: {weights} does not match the sha256 in {args.manifest}")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights.parent))
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(path, model["preprocess"]) for path in args.images])  # (B, C, H, W)
    (logits,) = session.run([model["output"]], {model["input"]: batch})  # (B, classes)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for path, row in zip(args.images, probs, strict=True):
        best = int(row.argmax())
        print(f"{path}: {model['classes'][best]} ({row[best]:.3f})")


if __name__ == "__main__":
    main()
