"""Data: folder tasks, conversion, splits, whole-batch augmentation, resumable batch streams, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvn_cli import settings
from dvn_cli.config import TaskSpec
from dvn_cli.data.batches import TaskBatches, augment_batch, iterate_split, normalize_batch
from dvn_cli.data.datasets import load_task, native_shape
from dvn_cli.data.pixels import channel_stats, convert_images
from dvn_cli.data.registry import DATASETS, parse_task, register_dataset, task_string
from dvn_cli.errors import BadConfig, DvnError, MissingData, UnknownTask

# ------------------------------------------------------------------------------------------------ helpers


def _save(path: Path, size: tuple[int, int], mode: str, seed: int, fmt: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode if mode != "P" else "L"]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, "L" if channels == 1 else mode)
    if mode == "P":
        image = image.convert("P")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


def _make_class(folder: Path, count: int, seed: int) -> None:
    """``count`` images of mixed formats, modes and sizes."""
    kinds = [
        ("png", "RGB", (40, 30)),
        ("jpg", "L", (20, 20)),
        ("bmp", "RGB", (16, 16)),
        ("png", "RGBA", (9, 12)),
        ("gif", "P", (64, 48)),
        ("webp", "RGB", (24, 24)),
    ]
    for i in range(count):
        ext, mode, size = kinds[i % len(kinds)]
        _save(folder / f"img{i:02d}.{ext}", size, mode, seed * 100 + i)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes (5, 6, 4 images) of mixed formats, plus two files PIL cannot read."""
    root = tmp_path / "pets"
    for seed, (name, count) in enumerate((("cat", 5), ("dog", 6), ("fox", 4))):
        _make_class(root / name, count, seed)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "fox" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are ignored, not counted
    return root


@pytest.fixture
def fake_dataset():
    """A registered in-memory dataset whose images encode their own index (pixels 0 and 1)."""
    n_train, n_test = 200, 30

    def encode(n: int, offset: int) -> torch.Tensor:
        images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
        index = torch.arange(offset, offset + n)
        images[:, 0, 0, 0] = (index // 256).to(torch.uint8)
        images[:, 0, 0, 1] = (index % 256).to(torch.uint8)
        images[:, 0, 4:, 4:] = 200
        return images

    def load(root: Path, train: bool, download: bool):
        n, offset = (n_train, 0) if train else (n_test, 1000)
        return encode(n, offset), torch.arange(n) % 3, ("a", "b", "c")

    register_dataset("fake-indexed", load, channels=1, size=8, augment="digits", folder="FAKE")
    yield "fake-indexed"
    DATASETS.pop("fake-indexed")


def _indices(images: torch.Tensor) -> set[int]:
    return set((images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist())


# ---------------------------------------------------------------------------------------------- folders


def test_folder_task_loads_mixed_formats_modes_and_sizes(image_folder: Path):
    data = load_task(f"pets={image_folder}", channels=3, size=16, val_fraction=0.2)
    assert data.spec.name == "pets"
    assert data.spec.classes == ("cat", "dog", "fox")
    assert data.spec.source == str(image_folder)
    assert data.spec.resize == "bilinear"
    assert data.augment == "natural"
    assert data.skipped == (str(image_folder / "dog" / "notes.txt"), str(image_folder / "fox" / "broken.png"))
    assert data.summary()["skipped"] == 2
    total = len(data.train_labels) + len(data.val_labels) + len(data.test_labels)
    assert total == 15
    assert len(data.test_labels) == 3  # 20% of each class: 1 + 1 + 1
    for split in ("train", "val", "test"):
        images, labels = data.split(split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
        assert labels.dtype == torch.int64 and len(labels) == len(images)
    assert set(data.test_labels.tolist()) == {0, 1, 2}
    assert len(data.spec.mean) == len(data.spec.std) == 3


def test_folder_task_in_grey(image_folder: Path):
    data = load_task(f"pets={image_folder}", channels=1, size=12)
    assert data.train_images.shape[1:] == (1, 12, 12)
    assert len(data.spec.mean) == 1


def test_folder_test_split_is_fixed_whatever_the_seed(image_folder: Path):
    a = load_task(f"pets={image_folder}", channels=3, size=8, seed=0)
    b = load_task(f"pets={image_folder}", channels=3, size=8, seed=5)
    assert torch.equal(a.test_images, b.test_images)


def test_folder_with_train_test_val_subfolders(tmp_path: Path):
    root = tmp_path / "shapes"
    for split, count in (("train", 4), ("test", 2), ("val", 3)):
        for seed, name in enumerate(("circle", "square")):
            _make_class(root / split / name, count, seed)
    data = load_task(f"shapes={root}", channels=3, size=10, val_fraction=0.5)
    assert (len(data.train_labels), len(data.val_labels), len(data.test_labels)) == (8, 6, 4)
    assert data.spec.classes == ("circle", "square")


def test_folder_with_only_a_train_subfolder_carves_its_test_split(tmp_path: Path):
    root = tmp_path / "shapes"
    for seed, name in enumerate(("circle", "square")):
        _make_class(root / "train" / name, 5, seed)
    data = load_task(f"shapes={root}", channels=3, size=8, val_fraction=0.25)
    assert data.spec.classes == ("circle", "square")
    assert (len(data.train_labels), len(data.val_labels), len(data.test_labels)) == (6, 2, 2)


def test_folder_test_split_with_unknown_class_is_refused(tmp_path: Path):
    root = tmp_path / "shapes"
    for split in ("train", "test"):
        for seed, name in enumerate(("circle", "square")):
            _make_class(root / split / name, 2, seed)
    _make_class(root / "test" / "star", 2, 9)
    with pytest.raises(BadConfig, match="star"):
        load_task(f"shapes={root}", channels=3, size=8)


def test_class_folder_without_readable_images_is_named(image_folder: Path):
    (image_folder / "empty").mkdir()
    (image_folder / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(MissingData, match=r"class folder .*empty has no readable images"):
        load_task(f"pets={image_folder}", channels=3, size=8)


def test_folder_with_one_class_is_refused(tmp_path: Path):
    _make_class(tmp_path / "solo" / "cat", 3, 0)
    with pytest.raises(BadConfig, match="only one class sub-folder \\('cat'\\); a task needs at least 2 classes"):
        load_task(f"solo={tmp_path / 'solo'}", channels=3, size=8)


def test_folder_without_class_subfolders_is_refused(tmp_path: Path):
    _save(tmp_path / "flat" / "a.png", (8, 8), "RGB", 0)
    with pytest.raises(MissingData, match="has no class sub-folders"):
        load_task(f"flat={tmp_path / 'flat'}", channels=3, size=8)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(MissingData, match=f"folder {tmp_path / 'nope'} for task 'pets' not found"):
        load_task(f"pets={tmp_path / 'nope'}", channels=3, size=8)


def test_errors_are_one_line(tmp_path: Path, image_folder: Path):
    (image_folder / "empty").mkdir()
    for task in (f"x={tmp_path / 'nope'}", f"pets={image_folder}", "imagenet-22k", "=folder"):
        with pytest.raises(DvnError) as info:
            load_task(task, data_root=tmp_path, channels=3, size=8)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ names and shapes


def test_parse_task_and_task_string():
    assert parse_task("mnist") == ("mnist", None)
    assert parse_task("pets=some/dir") == ("pets", Path("some/dir"))
    with pytest.raises(BadConfig, match="has no name"):
        parse_task("=some/dir")
    with pytest.raises(BadConfig, match="has no folder"):
        parse_task("pets=")
    assert task_string(TaskSpec("mnist", ("0", "1"), source="mnist")) == "mnist"
    assert task_string(TaskSpec("pets", ("a", "b"), source="some/dir")) == "pets=some/dir"


def test_unknown_task_lists_known_names_and_the_folder_form():
    with pytest.raises(UnknownTask) as info:
        load_task("imagenet-22k", channels=1, size=28)
    message = str(info.value)
    assert "'imagenet-22k'" in message
    for name in ("mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn"):
        assert name in message
    assert "name=path/to/folder" in message


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("mnist", DATASETS["mnist"].load, channels=1, size=28, augment="digits", folder="x")


def test_native_shape(image_folder: Path, tmp_path: Path):
    assert native_shape("mnist") == (1, 28)
    assert native_shape("fashion-mnist") == (1, 28)
    assert native_shape("cifar10") == (3, 32)
    assert native_shape("svhn") == (3, 32)
    assert native_shape(f"pets={image_folder}") == (3, 32)  # first image 40x30 -> 30 -> clipped to 32
    big = tmp_path / "big"
    for seed, name in enumerate(("a", "b")):
        _save(big / name / "1.png", (100, 90), "RGB", seed)
    assert native_shape(f"big={big}") == (3, 64)
    with pytest.raises(UnknownTask):
        native_shape("nope")


def test_data_root_comes_from_flag_then_env_then_fallback(monkeypatch):
    monkeypatch.delenv("DVN_DATA_ROOT", raising=False)
    assert settings.data_root() == "data"
    assert settings.data_root(fallback="stored") == "stored"
    monkeypatch.setenv("DVN_DATA_ROOT", "/srv/datasets")
    assert settings.data_root() == "/srv/datasets"
    assert settings.data_root(fallback="stored") == "/srv/datasets"
    assert settings.data_root("flag", "stored") == "flag"


MISSING_FOLDERS = {
    "mnist": "MNIST/raw",
    "fashion-mnist": "FashionMNIST/raw",
    "kmnist": "KMNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}


@pytest.mark.parametrize(("task", "folder"), MISSING_FOLDERS.items())
def test_missing_torchvision_dataset_names_the_folder(tmp_path: Path, task: str, folder: str):
    with pytest.raises(MissingData) as info:
        load_task(task, data_root=tmp_path, channels=1, size=28)
    message = str(info.value)
    assert message.startswith(f"{task} not found in {tmp_path / folder}; ")
    assert "--download" in message and "\n" not in message


def test_missing_mnist_says_how_to_get_it_offline(tmp_path: Path):
    with pytest.raises(MissingData, match="dvn data prepare"):
        load_task("mnist", data_root=tmp_path, channels=1, size=28)


# ---------------------------------------------------------------------------------------------- conversion


def test_grey_to_rgb_repeats_the_channel():
    grey = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    rgb, resize = convert_images(grey, 3, 8)
    assert rgb.shape == (4, 3, 8, 8) and resize == "bilinear"
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    assert torch.equal(rgb[:, :1], grey)


def test_rgb_to_grey_uses_luminance_weights():
    rgb = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = 200, 100, 50
    grey, _ = convert_images(rgb, 1, 2)
    assert grey.shape == (1, 1, 2, 2)
    assert int(grey[0, 0, 0, 0]) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)


def test_smaller_images_are_zero_padded_centred():
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    padded, resize = convert_images(images, 1, 32)
    assert resize == "pad" and padded.shape == (2, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], images)
    assert int(padded.sum()) == int(images.long().sum())  # the border is zeros


def test_larger_images_are_resized_bilinearly():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    resized, resize = convert_images(images, 3, 28)
    assert resize == "bilinear" and resized.shape == (3, 3, 28, 28) and resized.dtype == torch.uint8
    flat = torch.full((1, 1, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(convert_images(flat, 1, 20)[0], torch.full((1, 1, 20, 20), 77, dtype=torch.uint8))


def test_channel_stats_match_a_direct_computation():
    images = torch.randint(0, 256, (50, 3, 6, 6), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-4)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-4)
    assert channel_stats(torch.zeros(4, 1, 3, 3, dtype=torch.uint8)) == ((0.0,), (1.0,))  # constant: no scaling


# ------------------------------------------------------------------------------------------ splits and limit


def test_val_split_is_deterministic_and_disjoint(fake_dataset: str):
    a = load_task(fake_dataset, channels=1, size=8, val_fraction=0.1, seed=3)
    b = load_task(fake_dataset, channels=1, size=8, val_fraction=0.1, seed=3)
    c = load_task(fake_dataset, channels=1, size=8, val_fraction=0.1, seed=4)
    train, val = _indices(a.train_images), _indices(a.val_images)
    assert len(val) == 20 and len(train) == 180
    assert not train & val and train | val == set(range(200))
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.train_images, b.train_images)
    assert _indices(c.val_images) != val
    assert len(a.test_labels) == 30 and _indices(a.test_images) == set(range(1000, 1030))


def test_limit_caps_training_images_only(fake_dataset: str):
    full = load_task(fake_dataset, channels=1, size=8, seed=1)
    small = load_task(fake_dataset, channels=1, size=8, seed=1, limit=25)
    assert len(small.train_labels) == 25
    assert torch.equal(small.val_images, full.val_images)
    assert torch.equal(small.test_images, full.test_images)
    assert _indices(small.train_images) <= _indices(full.train_images)
    assert len(load_task(fake_dataset, channels=1, size=8, seed=1, val_limit=5).val_labels) == 5


def test_stats_are_those_of_the_converted_training_images(fake_dataset: str):
    data = load_task(fake_dataset, channels=3, size=12)
    assert data.spec.resize == "pad" and data.train_images.shape[1:] == (3, 12, 12)
    assert data.spec.mean == channel_stats(data.train_images)[0]
    assert data.spec.source == fake_dataset and data.augment == "digits"


def test_bad_split_arguments(fake_dataset: str):
    with pytest.raises(BadConfig, match="val fraction"):
        load_task(fake_dataset, channels=1, size=8, val_fraction=1.0)
    with pytest.raises(BadConfig, match="limit 0"):
        load_task(fake_dataset, channels=1, size=8, limit=0)
    with pytest.raises(BadConfig, match="channels 2"):
        load_task(fake_dataset, channels=2, size=8)


# -------------------------------------------------------------------------------------------- batches


def _crops(images: torch.Tensor, pad: int, flip: bool) -> list[torch.Tensor]:
    """Every crop (and flipped crop) a sample could become: (B, n, C, H, W)."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, :, dy : dy + h, dx : dx + w]
            out.append(crop)
            if flip:
                out.append(crop.flip(3))
    return torch.stack(out, 1)


@pytest.mark.parametrize(("policy", "pad", "flip"), [("digits", 2, False), ("natural", 4, True)])
def test_augment_batch_crops_and_flips(policy: str, pad: int, flip: bool):
    images = torch.randint(1, 256, (64, 3, 10, 10), dtype=torch.uint8)
    out = augment_batch(images, policy, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)  # pixels moved
    candidates = _crops(images, pad, flip)  # (B, n, C, H, W)
    matches = (candidates == out.unsqueeze(1)).flatten(2).all(2)  # (B, n)
    assert matches.any(1).all()  # every sample is one of its allowed crops
    again = augment_batch(images, policy, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augment_none_is_identity_and_unknown_policy_refused():
    images = torch.randint(0, 256, (5, 1, 7, 7), dtype=torch.uint8)
    assert torch.equal(augment_batch(images, "none", torch.Generator()), images)
    with pytest.raises(BadConfig, match="unknown augmentation policy"):
        augment_batch(images, "wild", torch.Generator())


def test_normalize_batch():
    spec = TaskSpec("t", ("a", "b"), mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.1))
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    x = normalize_batch(images, spec)
    expected = (images.float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(
        1, 3, 1, 1
    )
    assert x.dtype == torch.float32 and torch.allclose(x, expected, atol=1e-5)
    with pytest.raises(BadConfig, match="statistics for 3 channels"):
        normalize_batch(images[:, :2], spec)


def test_iterate_split_in_order(fake_dataset: str):
    data = load_task(fake_dataset, channels=1, size=8)
    batches = list(iterate_split(data.test_images, data.test_labels, data.spec, batch_size=8))
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([y for _, y in batches]), data.test_labels)
    assert torch.allclose(batches[0][0], normalize_batch(data.test_images[:8], data.spec))


def test_task_batches_are_seeded(fake_dataset: str):
    data = load_task(fake_dataset, channels=1, size=8, limit=50)
    a = TaskBatches(data, 16, seed=0, task_index=0)
    b = TaskBatches(data, 16, seed=0, task_index=0)
    c = TaskBatches(data, 16, seed=0, task_index=1)
    assert a.batches_per_epoch == 3
    for _ in range(5):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert xa.shape == (16, 1, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


def test_task_batches_cover_an_epoch_then_reshuffle(fake_dataset: str):
    data = load_task(fake_dataset, channels=1, size=8, limit=48)
    stream = TaskBatches(data, 16, augment=False)
    epochs = [[next(stream)[0] for _ in range(3)] for _ in range(2)]
    std, mean = torch.tensor(data.spec.std), torch.tensor(data.spec.mean)
    seen = [_indices((torch.cat(e) * std + mean).mul(255).round().byte()) for e in epochs]
    assert seen[0] == seen[1] == _indices(data.train_images)
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))
    assert stream.epoch == 1


def test_task_batches_resume_exactly(fake_dataset: str):
    data = load_task(fake_dataset, channels=1, size=8, limit=50)
    stream = TaskBatches(data, 16, seed=7, task_index=2)
    for _ in range(4):  # into the second epoch
        next(stream)
    state = stream.state_dict()
    assert state["generator_state"].dtype == torch.uint8 and (state["epoch"], state["position"]) == (1, 1)
    expected = [next(stream) for _ in range(6)]
    resumed = TaskBatches(data, 16, seed=7, task_index=2)
    as_tensors = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in state.items()}
    resumed.load_state_dict(as_tensors)  # ints as 0-d tensors, as a safetensors file gives them back
    for (x, y), (x2, y2) in zip(expected, (next(resumed) for _ in range(6)), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_task_batches_refuse_state_of_other_data(fake_dataset: str):
    state = TaskBatches(load_task(fake_dataset, channels=1, size=8, limit=50), 16).state_dict()
    other = TaskBatches(load_task(fake_dataset, channels=1, size=8, limit=40), 16)
    with pytest.raises(BadConfig, match="40 training images, the saved state 50"):
        other.load_state_dict(state)


def test_task_batches_smaller_than_a_batch(fake_dataset: str):
    data = load_task(fake_dataset, channels=1, size=8, limit=5)
    x, y = next(TaskBatches(data, 64))
    assert x.shape[0] == 5 and len(y) == 5


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_mnist_and_fashion_mnist(real_data_root: Path):
    mnist = load_task("mnist", data_root=real_data_root, channels=1, size=28)
    fashion = load_task("fashion-mnist", data_root=real_data_root, channels=1, size=28)
    for data in (mnist, fashion):
        assert len(data.train_labels) + len(data.val_labels) == 60000
        assert len(data.val_labels) == 6000
        assert data.test_images.shape == (10000, 1, 28, 28)
        assert data.train_images.dtype == torch.uint8
        assert sorted(set(data.test_labels.tolist())) == list(range(10))
    assert mnist.spec.classes[0] == "0 - zero" and len(mnist.spec.classes) == 10
    assert fashion.spec.classes[:2] == ("T-shirt/top", "Trouser")
    assert mnist.spec.mean[0] == pytest.approx(0.1307, abs=2e-3)
    assert mnist.spec.std[0] == pytest.approx(0.3081, abs=2e-3)
    assert fashion.spec.mean[0] == pytest.approx(0.2860, abs=2e-3)
    rgb = load_task("mnist", data_root=real_data_root, channels=3, size=32, limit=100)
    assert rgb.spec.resize == "pad" and rgb.train_images.shape == (100, 3, 32, 32)
    assert rgb.test_images.shape == (10000, 3, 32, 32)


def test_sixteen_bit_greyscale_decodes_as_its_eight_bit_twin(tmp_path: Path):
    """A 16-bit PNG (PIL mode ``I;16``, values x 257) reads as the 8-bit file it was made from, in grey and in RGB;
    PIL's own ``convert`` clips it to {0, 255}."""
    from dvn_cli.data.decode import input_image, read_image

    eight = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    Image.fromarray(eight.astype(np.int32) * 257).save(tmp_path / "32.tif")  # mode I
    for name in ("16.png", "32.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name, "L", None), eight)
        np.testing.assert_array_equal(
            read_image(tmp_path / name, "RGB", None), read_image(tmp_path / "8.png", "RGB", None)
        )
        np.testing.assert_array_equal(input_image(tmp_path / name, 1, 28, "pad"), eight[None])


def test_float_images_read_as_zero_to_one_or_not_at_all(tmp_path: Path):
    from dvn_cli.data.decode import read_image

    eight = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(eight.astype(np.float32) / 255).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif", "L", None), eight)
    Image.fromarray(eight.astype(np.float32) * 4).save(tmp_path / "wide.tif")  # range unknown: unreadable, not clipped
    assert read_image(tmp_path / "wide.tif", "L", None) is None
