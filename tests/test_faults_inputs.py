"""Fault matrix, inputs: every stage refuses bad input in one line before it writes anything.

One row per case: the stage, its command line and a part of the expected error line. The bad
inputs are generated here: synthetic sets with NaN pixels, labels out of range, soft labels of
the wrong width, a bad stored learning rate or no images (``np.savez`` with the keys
``ddjax.synset`` reads); a dataset without test images; experts trained on another
``train_limit``; config values that overflow float32, are negative or zero. Each row runs the
stage in this process and checks :func:`faults.refused`: exit 2, one line, no traceback, no work
directory created (or an existing one untouched). Refusals come before any training, so a row
costs well under a second; the experts and the teacher the rows need are built once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from faults import DATA, refused, run

from ddjax import data, models
from ddjax.sre2l import label_store, views
from ddjax.sre2l import teacher as teacher_lib
from ddjax.synset import load_synset

CLASSES, SHAPE = 3, (8, 8, 1)
SMALL = "ConvNetW8"
FIXED_NORMALISATION = "mnist"


def _write_set(path, images=None, labels=None, num_classes=CLASSES, learning_rate=np.nan):
    """A synthetic set file as :meth:`ddjax.synset.SyntheticSet.save` writes one."""
    rng = np.random.default_rng(0)
    if images is None:
        images = rng.normal(size=(2 * CLASSES, *SHAPE)).astype(np.float32)
    if labels is None:
        labels = np.repeat(np.arange(CLASSES, dtype=np.int32), 2)
    np.savez(
        path,
        images=images,
        labels=labels,
        num_classes=np.int32(num_classes),
        learning_rate=np.float64(learning_rate),
        meta=np.array(json.dumps({"method": "test"})),
    )
    return path


def _bad_sets(root):
    """``{name: path}`` of the synthetic sets of the rows (and one good one)."""
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2 * CLASSES, *SHAPE)).astype(np.float32)
    nan_images = images.copy()
    nan_images[0, 0, 0, 0] = np.nan
    labels = np.repeat(np.arange(CLASSES, dtype=np.int32), 2)
    sets = {
        "good": {},
        "nan": {"images": nan_images},
        "all_nan": {"images": np.full_like(images, np.nan)},
        "inf": {"images": np.where(images > 1, np.inf, images).astype(np.float32)},
        "label_12": {"labels": np.where(labels == 2, 12, labels).astype(np.int32)},
        "label_neg": {"labels": np.where(labels == 0, -1, labels).astype(np.int32)},
        "float_labels": {"labels": labels.astype(np.float32)},
        "soft_width": {"labels": np.full((len(labels), 5), 0.2, np.float32)},
        "soft_nan": {"labels": np.full((len(labels), CLASSES), np.nan, np.float32)},
        "lr_negative": {"learning_rate": -0.5},
        "lr_inf": {"learning_rate": np.inf},
        "lr_zero": {"learning_rate": 0.0},
        "empty": {
            "images": np.zeros((0, *SHAPE), np.float32),
            "labels": np.zeros((0,), np.int32),
        },
        "wrong_shape": {"images": rng.normal(size=(2 * CLASSES, 16, 16, 1)).astype(np.float32)},
        "wrong_classes": {"num_classes": 5},
        "zero_classes": {"num_classes": 0},
    }
    paths = {name: str(_write_set(root / f"{name}.npz", **kw)) for name, kw in sets.items()}
    not_npz = root / "not_npz.npz"
    not_npz.write_text("not an archive")
    paths["not_npz"] = str(not_npz)
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every file a row names: synthetic sets, a dataset without test images, experts and a
    teacher of the synthetic dataset (one each, tiny)."""
    from ddjax import experts

    root = tmp_path_factory.mktemp("inputs")
    paths = _bad_sets(root)
    rng = np.random.default_rng(2)
    no_test = root / "no_test.npz"
    np.savez(
        no_test,
        x_train=rng.integers(0, 255, (12, 8, 8), np.uint8),
        y_train=np.repeat(np.arange(CLASSES), 4).astype(np.int64),
        x_test=np.zeros((0, 8, 8), np.uint8),
        y_test=np.zeros((0,), np.int64),
    )
    paths["no_test"] = f"npz:{no_test}"
    dataset = data.load_dataset(DATA)
    paths["experts"] = str(root / "experts")
    experts.train_experts(
        # Fixed normalisation constants, so that a run on fewer images (train_limit) differs
        # from the experts in nothing else.
        data.load_dataset(DATA, normalisation=FIXED_NORMALISATION),
        out_dir=paths["experts"],
        model=SMALL,
        num_experts=1,
        epochs=2,
        experts_at_once=1,
        test_every=2,
        augment="none",  # no DSA to compile: the rows need experts, not good ones
        progress=False,
    )
    model = models.get_model("ConvNetBN", CLASSES, SHAPE, width=8, depth=2)
    variables = models.init_variables(model, np.asarray([0, 1], np.uint32), SHAPE)
    paths["teacher"] = str(root / "teacher")
    teacher_lib.save_teacher(
        paths["teacher"],
        model_name="ConvNetBN",
        model_overrides={"width": 8, "depth": 2},
        variables=variables,
        dataset=dataset,
    )
    # A label store of the good set, which the KD row pairs with another set.
    paths["store"] = str(root / "labels")
    label_store.write_store(
        paths["store"],
        load_synset(paths["good"]),
        teacher_lib.load_teacher(paths["teacher"]),
        dataset,
        spec=views.AugmentSpec(),
        epochs=1,
        batch_size=6,
    )
    paths["other"] = str(_write_set(root / "other.npz", images=np.zeros((6, *SHAPE), np.float32)))
    return paths


def _data(name="{DATA}"):
    return f"--config.dataset.name={name}"


#: Each stage's command line (before the row's own arguments and ``--workdir``).
BASE = {
    "select": ["select", "--config", "configs/select/digits.py", _data(), "--config.ipc=1"],
    "evaluate": [
        "evaluate", "--config", "configs/evaluate/digits.py", _data(),
        "--config.synset={good}", f"--config.eval.models={SMALL}",
    ],
    "experts": ["experts", "--config", "configs/experts/mtt.py:digits", _data()],
    "distill": [
        "distill", "--config", "configs/distill/mtt.py:digits,ipc=1", _data(),
        f"--config.model={SMALL}", "--config.experts_dir={experts}", "--config.max_start_epoch=1",
        f"--config.dataset.normalisation={FIXED_NORMALISATION}",
        "--config.expert_epochs=1", "--config.syn_steps=2", "--config.iterations=1",
        f"--config.eval.models={SMALL}",
    ],
    "datm": [
        "distill", "--config", "configs/distill/datm.py:digits,ipc=10", _data(),
        f"--config.model={SMALL}", "--config.experts_dir={experts}", "--config.max_start_epoch=1",
        "--config.current_max_start_epoch=1", "--config.expert_epochs=1",
        f"--config.dataset.normalisation={FIXED_NORMALISATION}",
        "--config.syn_steps=2", "--config.iterations=1", f"--config.eval.models={SMALL}",
    ],
    "squeeze": ["squeeze", "--config", "configs/squeeze/sre2l.py:digits", _data()],
    "teacher": ["teacher", "--config", "configs/teacher/torchvision.py:resnet18"],
    "recover": [
        "recover", "--config", "configs/recover/sre2l.py:digits", _data(),
        "--config.teacher={teacher}", "--config.batch_size=3", "--config.ipc=1",
    ],
    "relabel": [
        "relabel", "--config", "configs/relabel/sre2l.py:digits", _data(),
        "--config.teacher={teacher}", "--config.synset={good}",
    ],
    "quickstart": ["quickstart"],
}  # fmt: skip

#: SelMatch's sliding window over the experts' forgetting scores.
WINDOW = ["--config.method=window", "--config.experts_dir={experts}"]

#: (id, stage, the row's arguments, a part of the expected error line).
ROWS = [
    # --- config values: finite in float32, in range ---
    (
        "lr_img_overflows_float32",
        "distill",
        ["--config.lr_img=1e39"],
        "lr_img=1e+39 must be a positive number, finite in float32",
    ),
    (
        "lr_img_inf",
        "distill",
        ["--config.lr_img=1e400"],
        "config.lr_img=inf must be a positive number",
    ),
    (
        "lr_lr_negative",
        "distill",
        ["--config.lr_lr=-1e-5"],
        "config.lr_lr=-1e-05 must be a positive",
    ),
    ("lr_teacher_zero", "distill", ["--config.lr_teacher=0.0"], "config.lr_teacher=0.0 must be"),
    (
        "syn_steps_zero",
        "distill",
        ["--config.syn_steps=0"],
        "config.syn_steps=0 must be an integer",
    ),
    ("ipc_zero", "distill", ["--config.ipc=0"], "config.ipc=0 must be an integer >= 1"),
    ("momentum_one", "distill", ["--config.momentum=1.0"], "config.momentum=1.0 must be in [0, 1)"),
    ("eval_lr_negative", "distill", ["--config.eval.lr=-0.01"], "config.eval.lr=-0.01 must be"),
    ("train_limit_zero", "distill", ["--config.dataset.train_limit=0"], "train_limit=0 must be"),
    (
        "datm_lr_y_inf",
        "datm",
        ["--config.lr_y=1e39"],
        "config.lr_y=1e+39 must be a positive number, finite",
    ),
    ("datm_threshold_negative", "datm", ["--config.threshold=-1.0"], "threshold=-1.0 must be >= 0"),
    ("eval_lr_negative", "evaluate", ["--config.eval.lr=-0.5"], "config.eval.lr=-0.5 must be"),
    ("eval_lr_overflow", "evaluate", ["--config.eval.lr=1e39"], "finite in float32"),
    ("num_models_zero", "evaluate", ["--config.eval.num_models=0"], "num_models=0 must be"),
    ("eval_epochs_negative", "evaluate", ["--config.eval.epochs=-5"], "epochs=-5 must be"),
    ("eval_section_as_value", "evaluate", ["--config.eval=3"], "'eval' is a section, not a value"),
    ("eval_seed_negative", "evaluate", ["--config.eval.seed=-1"], "seed=-1 must be an integer >="),
    ("ipc_zero", "select", ["--config.ipc=0"], "config.ipc=0 must be"),
    ("eval_lr_negative", "select", ["--config.eval.lr=-1.0"], "config.eval.lr=-1.0 must be"),
    ("beta_negative", "select", ["--config.method=window", "--config.beta=-0.5"], "beta=-0.5"),
    ("beta_beyond_the_class", "select", [*WINDOW, "--config.beta=100.0"], "lower beta"),
    ("betas_repeated", "select", [*WINDOW, "--config.betas=0.5,0.5"], "repeats a value"),
    ("betas_negative", "select", ["--config.method=window", "--config.betas=0.5,-1.5"], "betas[1]"),
    (
        "unknown_feature_model",
        "select",
        ["--config.method=herding", "--config.feature_model=NoSuchNet"],
        "NoSuchNet",
    ),
    ("lr_inf", "experts", ["--config.lr=1e400"], "config.lr=inf must be a positive"),
    ("epochs_zero", "experts", ["--config.epochs=0"], "config.epochs=0 must be"),
    ("epochs_beyond_int32", "experts", ["--config.epochs=10000000000"], "must be <= 2147483647"),
    ("seed_beyond_int32", "experts", ["--config.seed=99999999999999999999"], "must be <= 21474"),
    ("weight_decay_negative", "experts", ["--config.weight_decay=-1e-4"], "must be >= 0"),
    (
        "lr_overflow",
        "squeeze",
        ["--config.lr=1e39"],
        "config.lr=1e+39 must be a positive number, finite in float32",
    ),
    ("lr_negative", "squeeze", ["--config.lr=-0.1"], "config.lr=-0.1 must be a positive number"),
    ("batch_size_zero", "squeeze", ["--config.batch_size=0"], "batch_size=0 must be"),
    ("num_classes_zero", "teacher", ["--config.num_classes=0"], "num_classes=0 must be"),
    ("image_size_negative", "teacher", ["--config.image_size=-1"], "image_size=-1 must be"),
    ("lr_inf", "recover", ["--config.lr=1e400"], "config.lr=inf must be a positive"),
    ("multiplier_overflows", "recover", ["--config.first_bn_multiplier=1e39"], "not finite in"),
    ("iterations_zero", "recover", ["--config.iterations=0"], "iterations=0 must be"),
    ("r_bn_negative", "recover", ["--config.r_bn=-0.01"], "config.r_bn=-0.01 must be >= 0"),
    ("crop_scale_above_one", "recover", ["--config.crop_scale=0.08,2.0"], "crop_scale[1]"),
    ("recipe_lr_negative", "relabel", ["--config.recipe.lr=-0.01"], "recipe.lr=-0.01 must be"),
    ("pool_mode_unknown", "relabel", ["--config.eval.pool_mode=bogus"], "pool_mode='bogus'"),
    ("temperature_zero", "relabel", ["--config.recipe.temperature=0.0"], "temperature=0.0 must"),
    ("num_models_zero", "quickstart", ["--num-models=0"], "--num-models=0 must be an integer"),
    ("epochs_negative", "quickstart", ["--epochs=-5"], "--epochs=-5 must be an integer >= 1"),
    (
        "datm_init_too_few_correct",
        "datm",
        ["--config.ipc=4"],
        "are classified correctly by the final snapshot",
    ),
    (
        "kd_store_of_another_set",
        "evaluate",
        ["--config.synset={other}", "--config.kd.teacher={teacher}", "--config.kd.store={store}"],
        "was made for another synthetic set",
    ),
    (
        "kd_batch_size_not_the_stores",
        "evaluate",
        ["--config.kd.teacher={teacher}", "--config.kd.store={store}", "--config.kd.batch_size=3"],
        "differs from the relabel store's batch size 6",
    ),
    # --- synthetic sets ---
    ("nan_pixels", "evaluate", ["--config.synset={nan}"], "1 of 384 pixels are not finite"),
    ("inf_pixels", "evaluate", ["--config.synset={inf}"], "pixels are not finite"),
    ("label_12", "evaluate", ["--config.synset={label_12}"], "labels range over 0..12"),
    ("label_minus_1", "evaluate", ["--config.synset={label_neg}"], "labels range over -1..2"),
    ("float_labels", "evaluate", ["--config.synset={float_labels}"], "must be integers"),
    ("soft_label_width", "evaluate", ["--config.synset={soft_width}"], "soft labels have 5"),
    ("soft_labels_nan", "evaluate", ["--config.synset={soft_nan}"], "soft labels are not all"),
    ("stored_lr_negative", "evaluate", ["--config.synset={lr_negative}"], "learning rate -0.5"),
    ("stored_lr_inf", "evaluate", ["--config.synset={lr_inf}"], "learning rate inf"),
    ("stored_lr_zero", "evaluate", ["--config.synset={lr_zero}"], "learning rate 0.0"),
    ("empty_set", "evaluate", ["--config.synset={empty}"], "the synthetic set is empty"),
    ("zero_classes", "evaluate", ["--config.synset={zero_classes}"], "num_classes=0 must be"),
    ("not_npz", "evaluate", ["--config.synset={not_npz}"], "cannot read synthetic set"),
    ("wrong_image_shape", "evaluate", ["--config.synset={wrong_shape}"], "images have shape"),
    ("wrong_classes", "evaluate", ["--config.synset={wrong_classes}"], "5 classes, dataset"),
    ("all_nan_set", "relabel", ["--config.synset={all_nan}"], "384 of 384 pixels are not"),
    ("label_12", "relabel", ["--config.synset={label_12}"], "labels range over 0..12"),
    # --- datasets without a test split (the stages that test) ---
    ("no_test_split", "evaluate", [_data("{no_test}")], "has no test images"),
    ("no_test_split", "select", [_data("{no_test}")], "has no test images"),
    ("no_test_split", "experts", [_data("{no_test}")], "has no test images"),
    ("no_test_split", "squeeze", [_data("{no_test}")], "has no test images"),
    ("no_test_split", "distill", [_data("{no_test}")], "has no test images"),
    ("no_test_split", "relabel", [_data("{no_test}")], "has no test images"),
    # --- experts of other training data ---
    ("train_limit_differs", "distill", ["--config.dataset.train_limit=12"], "train_limit must"),
]


def _argv(stage, extra, inputs, workdir):
    values = {**inputs, "DATA": DATA}
    return [a.format(**values) for a in [*BASE[stage], *extra]] + ["--workdir", str(workdir)]


@pytest.mark.parametrize(
    ("stage", "extra", "message"),
    [
        pytest.param(stage, extra, message, id=f"{stage}-{name}")
        for name, stage, extra, message in ROWS
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    stage, extra, message, inputs, tmp_path, capsys
):
    refused(
        _argv(stage, extra, inputs, tmp_path / "run"), capsys, message, watch=[inputs["experts"]]
    )


def test_a_refusal_leaves_an_existing_workdir_untouched(inputs, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    refused(_argv("evaluate", ["--config.synset={nan}"], inputs, workdir), capsys, "not finite")
    assert (workdir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("stage", "recorded", "named"),
    [
        ("relabel", {"synset": "0", "teacher": "0"}, ["config.synset", "config.teacher"]),
        ("recover", {"teacher": "0"}, ["config.teacher"]),
        ("distill", {"experts": "0"}, ["config.experts_dir"]),
    ],
)
def test_a_rerun_on_inputs_changed_since_its_results_is_refused(
    stage, recorded, named, inputs, tmp_path, capsys
):
    """relabel, recover and distill record their inputs' fingerprints; other ones than recorded
    (a set, teacher or experts replaced in place) are refused, naming the input, and the workdir
    is kept."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "results.json").write_text(json.dumps({"inputs": recorded}))
    line = refused(_argv(stage, [], inputs, workdir), capsys, "changed since the results")
    assert all(name in line for name in named), line


def test_evaluate_recomputes_results_of_a_synthetic_set_replaced_in_place(inputs, tmp_path, capsys):
    """Replacing the set file and re-running evaluate gives the new set's results."""
    synset = tmp_path / "synset.npz"
    _write_set(synset)
    workdir = tmp_path / "run"
    argv = _argv(
        "evaluate",
        [
            f"--config.synset={synset}",
            "--config.eval.protocol=dc",  # no augmentation to compile
            "--config.eval.epochs=1",
            "--config.eval.num_models=1",
        ],
        inputs,
        workdir,
    )
    code, out, err = run(argv, capsys)
    assert code == 0, err
    first = json.loads((workdir / "results.json").read_text())
    again = run(argv, capsys)
    assert again[0] == 0 and "recomputing" not in again[1]
    assert json.loads((workdir / "results.json").read_text()) == first  # same input: kept

    rng = np.random.default_rng(7)
    _write_set(synset, images=10 * rng.normal(size=(2 * CLASSES, *SHAPE)).astype(np.float32))
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert f"synset {synset} changed since the results" in out
    second = json.loads((workdir / "results.json").read_text())
    assert second["inputs"]["synset"] != first["inputs"]["synset"]
    assert second["eval"][SMALL]["final_train_loss"] != first["eval"][SMALL]["final_train_loss"]
    events = [json.loads(line)["event"] for line in open(workdir / "metrics.jsonl")]
    assert events.count("eval") == 2 and "inputs_changed" in events
