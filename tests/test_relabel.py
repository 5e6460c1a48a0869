"""ddjax.sre2l.relabel: FKD-style stored soft labels, replayed exactly; resume; storage; errors.

A tiny BatchNorm ConvNet teacher (width 8, depth 2, 8-px images, 4 classes) labels 10 synthetic
images in batches of 4 (so every epoch has a smaller last batch, as FKD's ``drop_last=False``).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import data, models, synfolder
from ddjax.config import import_config
from ddjax.errors import DDJaxError
from ddjax.sre2l import crops, label_store, relabel
from ddjax.sre2l import views as views_lib
from ddjax.sre2l.teacher import Teacher, save_teacher
from ddjax.synset import SyntheticSet

DATASET = "synthetic:classes=4,size=8,train=3,test=2"
BATCH, EPOCHS, SEED = 4, 2, 42

# Jitted once here: eager calls would compile every primitive separately.
draw = jax.jit(views_lib.draw_augment, static_argnums=(1, 2, 3, 4))
resized_crop = jax.jit(crops.resized_crop, static_argnums=(2, 3))
apply = jax.jit(
    lambda net, variables, x, train: net.apply(variables, x, train=train), static_argnums=(0, 3)
)


def tiny_teacher(net, image_shape, seed=0):
    """A BatchNorm teacher with random weights and running statistics unlike a fresh network's.

    Made with NumPy from the shapes (no PRNG programs to compile), so that eval and train mode
    disagree and the logits are far from uniform.
    """
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
        if name in ("scale", "mean", "bias"):
            return (float(name == "scale") + 0.3 * rng.normal(size=shape.shape)).astype(np.float32)
        fan_in = int(np.prod(shape.shape[:-1]))
        return (rng.normal(size=shape.shape) / np.sqrt(fan_in)).astype(np.float32)

    shapes = models.variable_shapes(net, image_shape)
    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return Teacher(model=net, variables=jax.tree.map(jnp.asarray, variables), meta={})


@pytest.fixture(scope="module")
def setup():
    dataset = data.load_dataset(DATASET)
    net = models.get_model("ConvNet", 4, dataset.image_shape, width=8, depth=2, norm="batch")
    teacher = tiny_teacher(net, dataset.image_shape)
    synset = SyntheticSet(dataset.x_train[:10], dataset.y_train[:10], 4, meta={"method": "sre2l"})
    return dataset, teacher, synset


@pytest.fixture(scope="module")
def store_dir(setup, tmp_path_factory):
    dataset, teacher, synset = setup
    path = tmp_path_factory.mktemp("store") / "labels"
    summary = label_store.write_store(
        path, synset, teacher, dataset, spec=views_lib.AugmentSpec(), epochs=EPOCHS,
        batch_size=BATCH, seed=SEED,
    )  # fmt: skip
    return path, summary


def test_batch_map_is_a_pure_function_of_seed_and_epoch():
    first = views_lib.batch_map(10, 4, seed=42, epoch=3)
    again = views_lib.batch_map(10, 4, seed=42, epoch=3)
    assert [len(b) for b in first] == [4, 4, 2]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(10))
    other_epoch = np.concatenate(views_lib.batch_map(10, 4, seed=42, epoch=4))
    other_seed = np.concatenate(views_lib.batch_map(10, 4, seed=7, epoch=3))
    assert not np.array_equal(np.concatenate(first), other_epoch)
    assert not np.array_equal(np.concatenate(first), other_seed)
    key = lambda *a: jax.random.key_data(views_lib.batch_key(*a))  # noqa: E731
    np.testing.assert_array_equal(key(42, 3, 1), key(42, 3, 1))
    assert not np.array_equal(key(42, 3, 1), key(42, 3, 2))
    assert not np.array_equal(key(42, 3, 1), key(42, 4, 1))


def _expected_views(images, batch, spec, fill=None):
    """The FKD training view built by hand: crop, flip, then CutMix paste or MixUp blend."""
    x = np.asarray(images)[batch.indices]
    n, height, width, channels = x.shape
    a = batch.augment
    if spec.crop == "rrc":
        x = np.asarray(resized_crop(x, a.boxes, height, width))
    elif spec.crop == "random_crop":
        p = spec.padding
        shape = (n, height + 2 * p, width + 2 * p, channels)
        padded = np.broadcast_to(np.asarray(fill, np.float32), shape).copy()
        padded[:, p : p + height, p : p + width] = x
        tops = np.rint(a.boxes[:, 0] * height).astype(int) + p
        lefts = np.rint(a.boxes[:, 1] * width).astype(int) + p
        x = np.stack(
            [
                padded[i, t : t + height, s : s + width]
                for i, (t, s) in enumerate(zip(tops, lefts, strict=True))
            ]
        )
    x = np.where(np.asarray(a.flips)[:, None, None, None], x[:, :, ::-1], x)
    partner = x[a.mix_perm]
    if spec.mix == "cutmix":
        top, left, bottom, right = (int(v) for v in a.mix_bbox)
        x = x.copy()
        x[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    elif spec.mix == "mixup":
        x = a.mix_lam * x + (1 - a.mix_lam) * partner
    return x


def test_replay_reproduces_stored_crops_flips_cutmix_and_logits(setup, store_dir):
    dataset, teacher, synset = setup
    path, _ = store_dir
    store = label_store.open_store(path)
    spec = store.spec
    assert (spec.crop, spec.mix, spec.min_scale) == ("rrc", "cutmix", 0.08)
    for epoch in range(EPOCHS):
        batches = label_store.replay(store, epoch)
        maps = views_lib.batch_map(10, BATCH, SEED, epoch)
        assert [len(b.indices) for b in batches] == [4, 4, 2]
        for b, batch in enumerate(batches):
            np.testing.assert_array_equal(batch.indices, maps[b])
            # The stored crops, flips and mix are exactly those drawn from the batch's key.
            drawn = draw(views_lib.batch_key(SEED, epoch, b), spec, len(batch.indices), 8, 8)
            for stored, fresh in zip(batch.augment, drawn, strict=True):
                np.testing.assert_array_equal(stored, np.asarray(fresh))
            pixels = np.asarray(batch.augment.boxes) * 8
            np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-5)  # integer boxes
            assert np.all(pixels[:, :2] >= 0) and np.all(pixels[:, :2] + pixels[:, 2:] <= 8)
            assert np.all(pixels[:, 2:] >= 1)
            top, left, bottom, right = batch.augment.mix_bbox
            assert 0 <= top <= bottom <= 8 and 0 <= left <= right <= 8
            assert 0 < batch.augment.mix_lam < 1
            np.testing.assert_array_equal(np.sort(batch.augment.mix_perm), np.arange(len(maps[b])))
            # Replay gives exactly the views the logits were computed on ...
            views = np.asarray(label_store.augmented_batch(synset.images, batch, spec))
            np.testing.assert_allclose(
                views, _expected_views(synset.images, batch, spec), rtol=0, atol=1e-6
            )
            # ... and the teacher (eval mode) on them gives the stored fp16 logits.
            logits = apply(teacher.model, teacher.variables, views, False)
            assert batch.logits.dtype == np.float16 and batch.logits.shape == (len(maps[b]), 4)
            np.testing.assert_allclose(
                np.asarray(logits).astype(np.float16).astype(np.float32),
                batch.logits.astype(np.float32),
                rtol=2**-10,
                atol=1e-4,
            )
    # One compiled labelling program per batch shape (4 and 2), however many epochs.
    assert views_lib.make_labeller(teacher.model, spec, "eval")._cache_size() == 2
    # Different epochs draw different crops.
    first, second = label_store.replay(store, 0)[0], label_store.replay(store, 1)[0]
    assert not np.array_equal(first.augment.boxes, second.augment.boxes)


def test_random_crop_mixup_and_teacher_in_train_mode(setup, tmp_path):
    """CIFAR's views (RandomCrop(pad 4) + flip + MixUp) and its teacher left in train mode."""
    dataset, teacher, synset = setup
    spec = views_lib.AugmentSpec(
        crop="random_crop", mix="mixup", fill=views_lib.padding_fill(dataset)
    )
    np.testing.assert_allclose(
        spec.fill, [-m / s for m, s in zip(dataset.mean, dataset.std, strict=True)]
    )
    synset = SyntheticSet(synset.images[:8], synset.labels[:8], 4)  # one batch shape: 4
    label_store.write_store(
        tmp_path / "cifar", synset, teacher, dataset, spec=spec, epochs=1, batch_size=BATCH,
        seed=3, teacher_mode="train",
    )  # fmt: skip
    store = label_store.open_store(tmp_path / "cifar")
    assert store.teacher_mode == "train"
    lams = []
    for batch in label_store.replay(store, 0):
        offsets = np.asarray(batch.augment.boxes[:, :2]) * 8
        assert np.all(np.abs(offsets) <= 4) and np.all(batch.augment.boxes[:, 2:] == 1)
        views = np.asarray(label_store.augmented_batch(synset.images, batch, store.spec))
        expected = _expected_views(synset.images, batch, store.spec, fill=spec.fill)
        np.testing.assert_allclose(views, expected, rtol=1e-6, atol=1e-6)
        trained = np.asarray(apply(teacher.model, teacher.variables, views, True))
        evaluated = np.asarray(apply(teacher.model, teacher.variables, views, False))
        np.testing.assert_allclose(
            trained.astype(np.float16).astype(np.float32),
            batch.logits.astype(np.float32),
            rtol=2**-10,
            atol=1e-4,
        )
        assert np.abs(trained - evaluated).max() > 1e-2  # the quirk changes the labels
        lams.append(float(batch.augment.mix_lam))
    assert all(0 < lam < 1 for lam in lams) and len(set(lams)) == len(lams)


def test_beta_sampler_matches_the_beta_distribution():
    keys = jax.random.split(jax.random.key(0), 3000)
    uniforms = jax.random.uniform(jax.random.key(1), (3000, 128))
    for alpha in (0.8, 1.0):
        beta = jax.jit(jax.vmap(lambda u, k, a=alpha: views_lib._symmetric_beta(u, a, k)))
        lams = np.asarray(beta(uniforms, keys))
        assert np.all((lams > 0) & (lams < 1))
        assert abs(lams.mean() - 0.5) < 0.02
        # Var of Beta(a, a) = 1 / (4 (2a + 1)).
        assert abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.01


def test_storage_size_reported_equals_the_files(store_dir):
    path, summary = store_dir
    files = sorted(path.glob("epoch_*.npz"))
    assert [f.name for f in files] == ["epoch_0000.npz", "epoch_0001.npz"]
    on_disk = sum(os.path.getsize(f) for f in files)
    index = json.loads((path / label_store.INDEX_FILE).read_text())
    assert summary["storage_bytes"] == on_disk == index["storage_bytes"]
    assert label_store.open_store(path).storage_bytes == on_disk
    assert summary["index_bytes"] == os.path.getsize(path / label_store.INDEX_FILE)
    assert index["epoch_bytes"] == {str(i): os.path.getsize(f) for i, f in enumerate(files)}
    # Compact: one file per epoch, dominated by 10 x 4 fp16 logits + 10 x 4 float32 boxes.
    assert on_disk < 2 * 4096
    assert index["logits_dtype"] == "float16"
    assert (index["batch_size"], index["seed"], index["epochs"]) == (BATCH, SEED, EPOCHS)
    assert index["augment"]["mix"] == "cutmix" and index["teacher_mode"] == "eval"
    for field in ("synset_sha256", "teacher_sha256"):
        assert len(index[field]) == 16
    assert index["dataset"]["name"] == DATASET


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_store(setup, store_dir, tmp_path):
    dataset, teacher, synset = setup
    reference, _ = store_dir
    path = tmp_path / "labels"

    def kill_after_first_epoch(**record):
        raise Killed(record["epoch"])

    kwargs = dict(spec=views_lib.AugmentSpec(), epochs=EPOCHS, batch_size=BATCH, seed=SEED)
    with pytest.raises(Killed):
        label_store.write_store(
            path, synset, teacher, dataset, log=kill_after_first_epoch, **kwargs
        )
    assert [f.name for f in path.glob("epoch_*.npz")] == ["epoch_0000.npz"]
    (path / "epoch_0001.npz.tmp").write_bytes(b"half-written")  # killed mid-write
    events = []
    summary = label_store.write_store(
        path, synset, teacher, dataset, log=lambda **r: events.append(r["epoch"]), **kwargs
    )
    assert events == [1]  # only the missing epoch was made
    assert not list(path.glob("*.tmp"))
    for epoch in range(EPOCHS):
        with (
            np.load(reference / f"epoch_{epoch:04d}.npz") as a,
            np.load(path / f"epoch_{epoch:04d}.npz") as b,
        ):
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert summary["storage_bytes"] == sum(os.path.getsize(f) for f in path.glob("epoch_*.npz"))


def test_bad_inputs_give_one_line_errors(setup, store_dir, tmp_path):
    dataset, teacher, synset = setup
    path, _ = store_dir
    store = label_store.open_store(path)

    with pytest.raises(DDJaxError, match="not a relabel store"):
        label_store.open_store(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "epoch_0001.npz").unlink()
    with pytest.raises(DDJaxError, match=r"no labels for epoch 1 \(epoch_0001.npz missing"):
        label_store.replay(label_store.open_store(copy), 1)
    with pytest.raises(DDJaxError, match="no labels for epoch 5"):
        label_store.replay(store, 5)

    other_images = SyntheticSet(synset.images + 0.01, synset.labels, 4)
    with pytest.raises(DDJaxError, match="another synthetic set"):
        label_store.check_store(store, synset=other_images)
    bumped = jax.tree.map(lambda x: x * 1.001, teacher.variables)
    with pytest.raises(DDJaxError, match="another teacher"):
        label_store.check_store(store, teacher=Teacher(teacher.model, bumped, {}))
    other_data = data.load_dataset(DATASET + ",seed=1")
    with pytest.raises(DDJaxError, match="made for dataset .* with name="):
        label_store.check_store(store, dataset=other_data)
    label_store.check_store(store, synset=synset, teacher=teacher, dataset=dataset)  # all agree

    kwargs = dict(spec=views_lib.AugmentSpec(), epochs=EPOCHS, batch_size=BATCH)
    with pytest.raises(DDJaxError, match="was made with seed=42, this run has seed=1"):
        label_store.write_store(path, synset, teacher, dataset, seed=1, **kwargs)
    with pytest.raises(DDJaxError, match="was made with synset_sha256="):
        label_store.write_store(path, other_images, teacher, dataset, seed=SEED, **kwargs)
    with pytest.raises(DDJaxError, match=r"mix='blend' is not known; valid: \['cutmix'"):
        views_lib.AugmentSpec(mix="blend")
    with pytest.raises(DDJaxError, match="min_scale=0.0"):
        views_lib.AugmentSpec(min_scale=0.0)
    with pytest.raises(DDJaxError, match="teacher_mode='test'"):
        label_store.write_store(
            tmp_path / "x", synset, teacher, dataset, teacher_mode="test", **kwargs
        )
    wide = models.get_model("ConvNet", 5, dataset.image_shape, width=8, depth=2, norm="batch")
    wrong = Teacher(wide, models.variable_shapes(wide, dataset.image_shape), {})
    with pytest.raises(DDJaxError, match="teacher has 5 outputs, dataset .* has 4 classes"):
        label_store.write_store(tmp_path / "y", synset, wrong, dataset, **kwargs)
    with pytest.raises(DDJaxError, match="batch_size=0 must be a positive integer"):
        views_lib.batch_map(10, 0, 0, 0)


def test_run_relabel_writes_the_store_and_evaluates_students(setup, tmp_path):
    """The stage: config + workdir in, store + results out; a second run resumes (no work)."""
    dataset, teacher, synset = setup
    teacher_dir = tmp_path / "teacher"
    save_teacher(
        teacher_dir,
        model_name="ConvNetBN",
        model_overrides={"width": 8, "depth": 2},
        variables=teacher.variables,
        dataset=dataset,
    )
    # 8 images in batches of 4: no smaller last batch, so each program compiles once.
    synset = SyntheticSet(synset.images[:8], synset.labels[:8], 4)
    synset_file = synset.save(tmp_path / "synset.npz")
    config = import_config("relabel/sre2l.py").relabel_fields(
        DATASET, "imagenet", models=("ConvNet",), model_overrides={"width": 8}, epochs=2,
        batch_size=BATCH,
    )  # fmt: skip
    config.synset = str(synset_file)
    config.teacher = str(teacher_dir)
    config.eval.num_models = 2
    workdir = tmp_path / "run"
    results = relabel.run_relabel(config, str(workdir), progress=False)
    files = sorted((workdir / label_store.STORE_DIR).glob("epoch_*.npz"))
    assert len(files) == 2
    assert results["labels"]["storage_bytes"] == sum(os.path.getsize(f) for f in files)
    assert results["labels"]["mode"] == "stored"
    result = results["eval"]["ConvNet"]
    assert len(result["accuracies"]) == 2 and result["lr_source"] == "fixed"
    assert json.loads((workdir / "results.json").read_text()) == results
    store = label_store.open_store(workdir / label_store.STORE_DIR)
    label_store.check_store(store, synset=synset, teacher=teacher, dataset=dataset)
    again = relabel.run_relabel(config, str(workdir), progress=False)
    assert again["eval"] == results["eval"]  # resumed: nothing recomputed
    assert again["labels"]["storage_bytes"] == results["labels"]["storage_bytes"]

    # `ddjax evaluate` with the teacher and the store trains the same students.
    from ddjax import cli

    argv = ["evaluate", "--config", "configs/evaluate/digits.py", f"--config.synset={synset_file}"]
    argv += [f"--config.dataset.name={DATASET}", "--config.eval.num_models=2"]
    argv += [f"--config.kd.teacher={teacher_dir}", "--config.kd.epochs=2"]
    argv += [f"--config.kd.batch_size={BATCH}", "--config.eval.models=ConvNet"]
    store_arg = f"--config.kd.store={workdir / label_store.STORE_DIR}"
    # The relabel run's students are ConvNet width 8; evaluate's default width is the model's
    # own, so compare against a relabel-stage run with the same (default) width instead.
    assert cli.main([*argv, store_arg, "--workdir", str(tmp_path / "ev")]) == 0
    evaluated = json.loads((tmp_path / "ev" / "results.json").read_text())["eval"]["ConvNet"]
    config.unlock()
    config.eval.model_overrides = {}
    direct = relabel.run_relabel(config, str(tmp_path / "default_width"), progress=False)
    assert evaluated["accuracies"] == direct["eval"]["ConvNet"]["accuracies"]
    missing = ["--config.kd.teacher=/no/teacher", "--workdir", str(tmp_path / "w")]
    assert cli.main([*argv, *missing]) == 2 and not (tmp_path / "w").exists()

    # ImageNet's way: no images loaded, the data contract is the teacher's; labels only.
    config.unlock()
    config.dataset.name = ""
    with pytest.raises(DDJaxError, match="config.evaluate=True needs the test images"):
        relabel.run_relabel(config, str(tmp_path / "contract"), progress=False)
    config.evaluate = False
    relabel.run_relabel(config, str(tmp_path / "contract"), progress=False)
    contract_store = label_store.open_store(tmp_path / "contract" / label_store.STORE_DIR)
    assert contract_store.index["dataset"] == store.index["dataset"]  # same fingerprint
    for epoch in range(2):
        with np.load(files[epoch]) as a, np.load(contract_store.epoch_file(epoch)) as b:
            np.testing.assert_array_equal(a["logits"], b["logits"])

    config.labels = "offline"
    with pytest.raises(DDJaxError, match="config.labels='offline'"):
        relabel.run_relabel(config, str(tmp_path / "bad"), progress=False)
    config.labels = "online"
    with pytest.raises(DDJaxError, match="config.labels='online' stores nothing"):
        relabel.run_relabel(config, str(tmp_path / "bad"), progress=False)
    config.labels = "stored"
    config.teacher = ""
    with pytest.raises(DDJaxError, match="config.teacher is empty"):
        relabel.run_relabel(config, str(tmp_path / "bad"), progress=False)


def test_a_synthetic_folder_is_relabelled_batch_by_batch(setup, tmp_path, monkeypatch):
    """A recovered folder streams: only batches are decoded, the store equals the in-memory one.

    The folder's decoded images (its JPEG round trip) as an in-memory set give the same epoch
    files; replaying from the folder gives the stored views; the predicted size is exact.
    """
    dataset, teacher, _ = setup
    writer = synfolder.SynFolderWriter(
        tmp_path / "set", num_classes=4, ipc=2, image_shape=dataset.image_shape,
        mean=dataset.mean, std=dataset.std,
    )  # fmt: skip
    for ipc_id in range(2):
        picked = [np.flatnonzero(dataset.y_train == c)[ipc_id] for c in range(4)]
        writer.write_batch(ipc_id, np.arange(4), np.full(4, ipc_id), dataset.x_train[picked])
    folder = synfolder.open_synfolder(tmp_path / "set")
    in_memory = SyntheticSet(folder.all_images(), folder.labels, 4)
    taken = []
    take = synfolder.SynFolder.take
    monkeypatch.setattr(
        synfolder.SynFolder, "take", lambda self, i: taken.append(len(i)) or take(self, i)
    )
    spec = views_lib.AugmentSpec()
    kwargs = dict(spec=spec, epochs=EPOCHS, batch_size=3, seed=SEED)  # batches of 3, 3, 2
    streamed = label_store.write_store(tmp_path / "a", folder, teacher, dataset, **kwargs)
    assert taken and max(taken) <= 3  # never the whole set
    label_store.write_store(tmp_path / "b", in_memory, teacher, dataset, **kwargs)
    for epoch in range(EPOCHS):
        with (
            np.load(tmp_path / "a" / f"epoch_{epoch:04d}.npz") as a,
            np.load(tmp_path / "b" / f"epoch_{epoch:04d}.npz") as b,
        ):
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name])
    store = label_store.open_store(tmp_path / "a")
    assert streamed["storage_bytes"] == label_store.predict_storage(8, 4, 3, EPOCHS)
    label_store.check_store(store, synset=folder, teacher=teacher, dataset=dataset)
    with pytest.raises(DDJaxError, match="another synthetic set"):
        label_store.check_store(store, synset=in_memory)
    taken.clear()
    for batch in label_store.replay(store, 1):
        from_folder = label_store.augmented_batch(folder.images, batch, spec)
        np.testing.assert_array_equal(
            from_folder, label_store.augmented_batch(in_memory.images, batch, spec)
        )
    assert taken == [3, 3, 2]


def test_relabel_refuses_a_store_larger_than_the_free_disk_space(setup, tmp_path, monkeypatch):
    dataset, teacher, synset = setup
    save_teacher(
        tmp_path / "teacher", model_name="ConvNetBN", model_overrides={"width": 8, "depth": 2},
        variables=teacher.variables, dataset=dataset,
    )  # fmt: skip
    config = import_config("relabel/sre2l.py").relabel_fields(
        DATASET, "imagenet", models=("ConvNet",), epochs=300, batch_size=BATCH
    )
    config.synset = str(synset.save(tmp_path / "synset.npz"))
    config.teacher = str(tmp_path / "teacher")
    config.evaluate = False
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(relabel.shutil, "disk_usage", lambda path: free)
    needed = label_store.predict_storage(10, 4, BATCH, 300)
    with pytest.raises(DDJaxError, match=f"needs {needed / 2**20:.2f} MiB .* 0.00 MiB free"):
        relabel.run_relabel(config, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
