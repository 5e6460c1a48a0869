"""``ddjax quickstart``'s budgets and options (the runs themselves are measured in the README)."""

import jax
import pytest

from ddjax import cli, quickstart
from ddjax.config import load_config

EXPERTS = "configs/experts/mtt.py:digits"


def test_full_budget_is_the_configs_as_they_are():
    # --full reproduces the README's published table: every config unchanged (the experts'
    # test_every only sets when test accuracy is logged), 5 networks x 300 epochs, width 64.
    full = quickstart.BUDGETS["full"]
    assert (full.epochs, full.num_models, full.width, full.feature_epochs) == (300, 5, 64, 20)
    assert full.experts == {"test_every": 20}
    assert full.squeeze == full.recover == full.relabel == {}
    for method, ipc, config_file in quickstart.QUICKSTART_DISTILL:
        assert full.distill[(method, ipc)] == {}
        assert quickstart.budget_config(config_file, {}) == load_config(config_file)
    mtt10 = load_config("configs/distill/mtt.py:digits,ipc=10")
    assert (mtt10.syn_steps, mtt10.iterations, mtt10.model, mtt10.loop) == (
        20,
        100,
        "ConvNetW64",
        "auto",
    )


def test_fast_budget_is_the_default_and_its_rows_fit_its_experts():
    fast = quickstart.BUDGETS["fast"]
    assert quickstart.FAST is fast
    assert (fast.epochs, fast.num_models, fast.width) == (100, 3, 32)
    experts = quickstart.budget_config(EXPERTS, fast.experts)
    assert (experts.model, experts.num_experts, experts.epochs) == ("ConvNetW32", 2, 22)
    for method, ipc, config_file in quickstart.QUICKSTART_DISTILL:
        config = quickstart.budget_config(config_file, fast.distill[(method, ipc)])
        # The students are the experts' networks, in the rolled loop, short runs.
        assert (config.model, config.loop, config.syn_steps) == ("ConvNetW32", "rolled", 10)
        assert config.iterations <= 100
        assert config.max_start_epoch + config.expert_epochs <= experts.epochs
        if method == "datm":
            assert config.expansion_end_iteration <= config.iterations
    relabel = quickstart.budget_config("configs/relabel/sre2l.py:digits", fast.relabel)
    assert relabel.eval.model_overrides.width == fast.width


@pytest.fixture
def no_rows(monkeypatch):
    """quickstart's checks, workdir and cache without its rows: the calls' arguments."""
    calls = []

    def rows(work, budget, epochs, num_models, distill):
        calls.append((work.path, budget.name, epochs, num_models, distill))
        assert jax.config.jax_compilation_cache_dir == str(work.file("jax_cache"))
        return {}

    monkeypatch.setattr(quickstart, "_quickstart", rows)
    return calls


def test_cli_passes_the_budget_and_its_defaults(tmp_path, monkeypatch, capsys, no_rows):
    monkeypatch.chdir(tmp_path)
    cache_dir = jax.config.jax_compilation_cache_dir
    assert cli.main(["quickstart"]) == 0
    assert cli.main(["quickstart", "--full", "--no-distill"]) == 0
    assert cli.main(["quickstart", "--full", "--epochs=7", "--workdir=w"]) == 0
    assert [call[1:] for call in no_rows] == [
        ("fast", 100, 3, True),
        ("full", 300, 5, False),
        ("full", 7, 5, True),
    ]
    # Each budget has its own default workdir; the cache setting is put back afterwards.
    assert [call[0].name for call in no_rows] == ["quickstart", "quickstart_full", "w"]
    assert jax.config.jax_compilation_cache_dir == cache_dir


def test_help_says_what_full_runs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quickstart", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--full" in text and "about an hour" in text and "300 epochs" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--full", "--epochs=0"], "--epochs=0 must be an integer >= 1"),
        (["--num-models=-1"], "--num-models=-1 must be an integer >= 1"),
    ],
)
def test_bad_values_are_refused_before_any_work(tmp_path, capsys, no_rows, argv, message):
    code = cli.main(["quickstart", f"--workdir={tmp_path / 'q'}", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists() and not no_rows


def test_a_workdir_of_the_other_budget_is_refused(tmp_path, capsys, no_rows):
    work = str(tmp_path / "q")
    assert cli.main(["quickstart", f"--workdir={work}"]) == 0
    assert cli.main(["quickstart", f"--workdir={work}", "--full"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config" in err and "budget" in err
    assert len(no_rows) == 1  # the fast rows are not mixed with --full's


def test_compilation_cache_keys_do_not_depend_on_its_directory(tmp_path):
    # A cache copied from another workdir (or shared between them) must be hit: the same
    # program compiled under two directories is written under the same key.
    def compile_once(directory):
        with quickstart.persistent_compilation_cache(directory):
            jax.jit(lambda x: jax.numpy.sin(x) * 3.0)(jax.numpy.ones(5)).block_until_ready()
        return sorted(path.name for path in directory.iterdir() if "lambda" in path.name)

    first = compile_once(tmp_path / "a")
    assert first and compile_once(tmp_path / "b") == first
