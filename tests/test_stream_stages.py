"""Stages on streams: squeeze trains from a stream and resumes inside an epoch, evaluation
scores a streamed test split as it scores the same images in memory, and the stages that need
the whole dataset refuse a stream in one line before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ddjax import cli, data, evaluate, models, train
from ddjax.data.streaming import StreamSource
from ddjax.experts import training
from ddjax.experts.store import load_trajectories, read_meta
from ddjax.sre2l import teacher as teacher_lib

pytest.importorskip("grain")

CLASSES = ("n01", "n02", "n03", "n04")


def write_imagenet_folder(root: Path, train: int, val: int, size=(40, 48), suffix=".JPEG"):
    """ImageNet's layout: ``train/<class>/*``, ``val/<class>/*``, class-dependent colours."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                coarse[..., c % 3] = 40 + 60 * c  # a class cue the teacher can learn
                image = Image.fromarray(coarse).resize(size[::-1], Image.Resampling.BILINEAR)
                image.save(folder / f"{name}_{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"), train=12, val=3)


def squeeze_args(folder: Path) -> list[str]:
    return [
        "--config=configs/squeeze/sre2l.py:digits",
        f"--config.dataset.name=stream:folder:{folder}",
        "--config.dataset.image_size=32",
        "--config.dataset.normalisation=imagenet",
        "--config.augment=none",
        "--config.batch_size=8",
        "--config.epochs=2",
        "--config.checkpoint_every_batches=2",
    ]


def _teacher_leaves(workdir: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(teacher_lib.load_teacher(workdir).variables)]


def test_squeeze_trains_from_a_stream_and_resumes_inside_an_epoch(folder, tmp_path, monkeypatch):
    args = squeeze_args(folder)
    assert cli.main(["squeeze", *args, f"--workdir={tmp_path / 'whole'}"]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert whole["train_accuracy"] is None  # a stream has no per-example record
    assert set(whole["test_accuracy_by_epoch"]) == {"1", "2"}

    # Kill the run after 4 of the 6 batches of its second epoch (a resume point every 2).
    original = StreamSource.epoch_batches

    def killed(self, epoch, key=None, start_batch=0):
        for i, batch in enumerate(original(self, epoch, key, start_batch), start=start_batch):
            if epoch == 1 and i == 4:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(StreamSource, "epoch_batches", killed)
    assert cli.main(["squeeze", *args, f"--workdir={tmp_path / 'killed'}"]) == 130
    assert not (tmp_path / "killed" / "teacher").exists()
    # The last resume point: before batch 2 of epoch 1, 6 + 2 batches trained (a point is
    # saved before every 2nd batch; the kill came while batch 4 was being read).
    assert [int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()] == [8]
    monkeypatch.setattr(StreamSource, "epoch_batches", original)
    assert cli.main(["squeeze", *args, f"--workdir={tmp_path / 'killed'}"]) == 0

    for a, b in zip(
        _teacher_leaves(tmp_path / "whole" / "teacher"),
        _teacher_leaves(tmp_path / "killed" / "teacher"),
        strict=True,
    ):
        np.testing.assert_array_equal(b, a)
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_a_streamed_test_split_scores_like_the_same_images_in_memory(tmp_path):
    root = write_imagenet_folder(tmp_path / "png", train=2, val=5, size=(16, 16), suffix=".png")
    in_memory = data.load_dataset(f"folder:{root}", normalisation="imagenet")
    stream = data.open_stream(
        f"stream:folder:{root}", image_size=None, eval_resize=None, normalisation="imagenet"
    )
    model = models.get_model("ConvNetBN", len(CLASSES), (16, 16, 3), width=8)
    tx = train.sgd(0.01)
    pool = train.init_pool(model, tx, jax.random.key(0), (16, 16, 3), 2)
    expected = evaluate.pool_test_accuracy(model, pool, in_memory, pool_mode="loop")
    # Batches of 6 over 20 images: the last batch is padded, and the padding is not counted.
    streamed = evaluate.pool_test_accuracy(model, pool, stream, pool_mode="loop", batch_size=6)
    for a, b in zip(expected, streamed, strict=True):
        np.testing.assert_array_equal(b, a)


def test_experts_train_from_a_stream_and_resume(folder, tmp_path):
    dataset = data.open_stream(f"stream:folder:{folder}", image_size=32, normalisation="imagenet")
    settings = dict(
        model="ConvNet", model_overrides={"width": 8}, num_experts=2, epochs=3, batch_size=8,
        experts_at_once=2, checkpoint_every=1, progress=False,
    )  # fmt: skip
    whole = training.train_experts(dataset, out_dir=tmp_path / "whole", **settings)
    assert whole["completed"] == [0, 1] and whole["num_train"] == 4 * 12
    assert not (tmp_path / "whole" / "forgetting.npz").exists()  # no per-example record
    assert whole["experts"]["0"]["train_accuracy"] == [None] * 3
    assert set(whole["experts"]["0"]["test_accuracy"]) == {"1", "2", "3"}

    killed = tmp_path / "killed"
    assert training.train_experts(dataset, out_dir=killed, _stop_after_epochs=1, **settings)
    assert read_meta(killed)["completed"] == []
    resumed = training.train_experts(dataset, out_dir=killed, **settings)
    assert resumed["experts"] == whole["experts"]
    a, b = (load_trajectories(d, [0, 1]) for d in (tmp_path / "whole", killed))
    assert jax.tree.leaves(a)[0].shape[:2] == (2, 4)  # init + 3 epochs
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(
    ("stage", "args"),
    [
        ("select", ["--config=configs/select/digits.py"]),
        ("distill", ["--config=configs/distill/mtt.py:digits,ipc=1", "--config.experts_dir=x"]),
    ],
)
def test_stages_that_need_the_whole_dataset_refuse_a_stream(stage, args, folder, tmp_path, capsys):
    workdir = tmp_path / "run"
    name = f"stream:folder:{folder}"
    code = cli.main([stage, *args, f"--config.dataset.name={name}", f"--workdir={workdir}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{stage} needs the whole dataset in memory" in err
    assert f"'folder:{folder}'" in err  # the name that would work
    assert not workdir.exists()


def test_stream_options_are_refused_for_in_memory_data(tmp_path, capsys):
    for override in ("--config.dataset.image_size=32", "--config.dataset.workers=2"):
        workdir = tmp_path / "run"
        args = ["squeeze", "--config=configs/squeeze/sre2l.py:digits", override]
        assert cli.main([*args, f"--workdir={workdir}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "applies to streams (stream:NAME) only" in err
        assert not workdir.exists()


def test_squeeze_refuses_stream_settings_it_cannot_honour(folder, tmp_path, capsys):
    args = squeeze_args(folder)
    for override, message in (
        ("--config.augment=crop_flip", "cropped and flipped by its pipeline"),
        ("--config.checkpoint_every_batches=0", "checkpoint_every_batches=0"),
        ("--config.dataset.train_limit=10", "config.dataset.train_limit"),
    ):
        workdir = tmp_path / "run"
        assert cli.main(["squeeze", *args, override, f"--workdir={workdir}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ddjax: error:")
        if message:
            assert message in err
        assert not workdir.exists()
