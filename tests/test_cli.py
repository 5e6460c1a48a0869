"""The ddjax command: stages, overrides, work directories, resume, one-line errors (exit 2)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddjax import cli
from ddjax.synset import load_synset

FAST = ["--config.eval.epochs=2", "--config.eval.num_models=2"]


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_select_then_evaluate_writes_the_work_directory(tmp_path, capsys):
    work = tmp_path / "sel"
    argv = [
        "select",
        "--config",
        "configs/select/digits.py",
        "--config.ipc=2",
        "--workdir",
        str(work),
        *FAST,
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    synset = load_synset(work / "synset.npz")
    assert synset.images.shape == (20, 8, 8, 1)
    assert (work / "synset.png").stat().st_size > 0
    results = json.loads((work / "results.json").read_text())
    assert len(results["eval"]["ConvNet"]["accuracies"]) == 2
    assert json.loads((work / "config.json").read_text())["ipc"] == 2
    lines = (work / "metrics.jsonl").read_text().splitlines()

    # Re-running the same command resumes: nothing is recomputed.
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert (work / "metrics.jsonl").read_text().splitlines() == lines
    np.testing.assert_array_equal(load_synset(work / "synset.npz").images, synset.images)

    code, _, err = run(
        [
            "evaluate",
            "--config",
            "configs/evaluate/digits.py",
            f"--config.synset={work / 'synset.npz'}",
            "--workdir",
            str(tmp_path / "ev"),
            "--config.eval.protocol=dsa",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())["eval"]["ConvNet"]
    assert ev["lr_source"] == "fixed"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.ipc=1000"], "ipc=1000"),
        (["--config.method=best"], "config.method='best'"),
        (["--config.ipcs=3"], "unknown field 'ipcs'"),
        (["--config.ipc=three"], "--config.ipc='three': expected int"),
        (["--config.dataset.name=nope"], "nope"),
        (["--config.eval.protocol=fast"], "protocol='fast'"),
        (["--config.dataset.train_limit=0"], "train_limit=0 must be an integer >= 1"),
        (["--config.eval=3"], "'eval' is a section, not a value"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, extra, message):
    argv = [
        "select",
        "--config",
        "configs/select/digits.py",
        "--workdir",
        str(tmp_path / "w"),
        *FAST,
        *extra,
    ]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("ddjax: error: ") and err.count("\n") == 1, err
    assert message in err


def test_a_different_config_in_the_same_workdir_is_refused(tmp_path, capsys):
    base = [
        "select",
        "--config",
        "configs/select/digits.py",
        "--workdir",
        str(tmp_path),
        "--config.ipc=1",
        "--config.evaluate=False",
    ]
    assert run(base, capsys)[0] == 0
    code, _, err = run([*base, "--config.seed=5"], capsys)
    assert code == 2 and "seed: 0 -> 5" in err


def test_train_limit_draws_from_the_limited_set_and_old_workdirs_resume(tmp_path, capsys):
    from ddjax import data

    base = [
        "select",
        "--config",
        "configs/select/digits.py",
        "--workdir",
        str(tmp_path),
        "--config.ipc=5",
        "--config.evaluate=False",
    ]
    assert run([*base, "--config.dataset.train_limit=50"], capsys)[0] == 0
    pool = data.load_dataset("digits", train_limit=50).x_train.reshape(50, -1)
    chosen = load_synset(tmp_path / "synset.npz").images.reshape(50, -1)
    distance = np.abs(chosen[:, None] - pool[None]).max(-1).min(-1)
    assert distance.max() < 1e-6  # every chosen image is one of the 50 kept ones

    # A workdir written before dataset.train_limit existed resumes when the field is unset...
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["dataset"]["train_limit"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert run(base, capsys)[0] == 0
    # ...and setting it is a different config.
    code, _, err = run([*base, "--config.dataset.train_limit=60"], capsys)
    assert code == 2 and "dataset.train_limit: '<missing>' -> 60" in err


def test_combined_augmentation_on_a_set_without_a_distilled_part_writes_nothing(tmp_path, capsys):
    select = ["select", "--config", "configs/select/digits.py", "--config.ipc=1"]
    argv = [*select, "--config.evaluate=False", "--workdir", str(tmp_path / "sel")]
    assert run(argv, capsys)[0] == 0
    code, _, err = run(
        [
            "evaluate",
            "--config",
            "configs/evaluate/digits.py",
            f"--config.synset={tmp_path / 'sel' / 'synset.npz'}",
            "--config.eval.protocol=selmatch",
            "--workdir",
            str(tmp_path / "ev"),
        ],
        capsys,
    )
    assert code == 2 and "meta['num_distilled']" in err and "selmatch_dsa" in err, err
    assert not (tmp_path / "ev").exists()


def test_missing_files_are_named(tmp_path, capsys):
    code, _, err = run(
        [
            "evaluate",
            "--config",
            "configs/evaluate/digits.py",
            "--config.synset=/no/such.npz",
            "--workdir",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 2 and "/no/such.npz" in err
    code, _, err = run(["select", "--config", "nope.py", "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "nope.py" in err


def test_later_stages_are_refused_clearly(capsys):
    code, _, err = run(["bench", "--config", "x.py", "--workdir", "w"], capsys)
    assert code == 2 and "'bench'" in err and "not implemented" in err


def test_sre2l_stages_reject_a_missing_teacher(tmp_path, capsys):
    argv = [
        "recover",
        "--config",
        "configs/recover/sre2l.py:digits",
        "--workdir",
        str(tmp_path / "r"),
    ]
    code, _, err = run([*argv, f"--config.teacher={tmp_path / 'missing'}"], capsys)
    assert code == 2 and "teacher" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_help_lists_the_stages():
    out = subprocess.run(
        [sys.executable, "-m", "ddjax.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    stages = ["quickstart", "select", "evaluate", "experts", "distill", "squeeze", "teacher"]
    for stage in [*stages, "recover", "relabel"]:
        assert stage in out


def test_every_stage_resolves_to_its_run_function():
    # The CLI imports the stages lazily through one table; each entry must name a function.
    assert set(cli.STAGES) == set(cli.AVAILABLE.split(", "))
    for stage, target in cli.STAGES.items():
        assert callable(cli.resolve(target)), stage


def test_select_window_from_a_scores_file_and_refusals(tmp_path, capsys):
    from ddjax import data

    labels = data.load_dataset("digits").y_train
    scores = np.arange(labels.shape[0], dtype=np.float32)  # higher index = harder
    np.save(tmp_path / "scores.npy", scores)
    base = ["select", "--config", "configs/select/digits.py", "--config.ipc=2"]
    base += ["--config.evaluate=False"]
    work = tmp_path / "win"
    argv = [*base, "--config.method=window", f"--config.scores={tmp_path / 'scores.npy'}"]
    code, out, err = run([*argv, "--config.beta=0.5", "--workdir", str(work)], capsys)
    assert code == 0, err
    synset = load_synset(work / "synset.npz")
    # Per class, hardest first = largest index first; the window starts at floor(2 * 0.5) = 1.
    for c in range(10):
        ranked = np.flatnonzero(labels == c)[::-1]
        picked = synset.images[synset.labels == c]
        expected = data.load_dataset("digits").x_train[ranked[1:3]]
        np.testing.assert_array_equal(np.sort(picked.ravel()), np.sort(expected.ravel()))

    # Forgetting scores without an experts directory: one line, exit 2, nothing written.
    bad = tmp_path / "bad"
    code, _, err = run([*base, "--config.method=forgetting", "--workdir", str(bad)], capsys)
    assert code == 2 and "experts_dir" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()
    np.save(tmp_path / "short.npy", scores[:10])
    argv = [*base, "--config.method=window", f"--config.scores={tmp_path / 'short.npy'}"]
    code, _, err = run([*argv, "--workdir", str(bad)], capsys)
    assert code == 2 and "short.npy" in err and not bad.exists()


@pytest.mark.parametrize(
    "family, rows",
    [
        ("experts/mtt.py", "cifar10, cifar100, fashion_mnist, mnist, tiny_imagenet, digits"),
        ("squeeze/sre2l.py", "cifar100, cifar10, tiny_imagenet, fashion_mnist, digits"),
        ("recover/sre2l.py", "imagenet, tiny_imagenet, cifar100, cifar10, fashion_mnist, digits"),
        ("relabel/sre2l.py", "imagenet, tiny_imagenet, cifar100, digits, fashion_mnist"),
    ],
)
def test_stage_config_families_load_every_row_and_refuse_others(family, rows):
    from ddjax.config import load_config
    from ddjax.errors import DDJaxError

    for row in rows.split(", "):
        assert load_config(f"configs/{family}:{row}", ["seed=3"]).seed == 3
    with pytest.raises(DDJaxError, match=f"no published row 'svhn'; rows: {rows}$"):
        load_config(f"configs/{family}:svhn")
    with pytest.raises(DDJaxError, match="a config family: add :ARG"):
        load_config(f"configs/{family}")


def test_bad_work_directories_are_one_line_and_nothing_is_written(tmp_path, capsys):
    """A file, a path under a file, a read-only parent and a corrupt config.json: exit 2."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    (tmp_path / "locked").mkdir()
    cases = {
        tmp_path / "file": "is a file, not a directory",
        tmp_path / "file" / "sub": "lies under the file",
        tmp_path / "corrupt": "config.json cannot be read",
    }
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a user
        (tmp_path / "locked").chmod(0o500)
        cases[tmp_path / "locked" / "run"] = "is not writable"
    for workdir, message in cases.items():
        argv = ["select", "--config", "configs/select/digits.py", "--workdir", str(workdir)]
        code, _, err = run([*argv, *FAST], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["config.json"]
    assert not list((tmp_path / "locked").iterdir())
