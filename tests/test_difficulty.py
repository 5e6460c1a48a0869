"""ddjax.difficulty and the difficulty coresets of ddjax.select (forgetting, SelMatch's window).

Pure NumPy except the config-driven selection; no network is trained (the window search takes
an injected evaluation function).
"""

import numpy as np
import pytest

from ddjax import config as config_lib
from ddjax import data, difficulty, experts, select
from ddjax.errors import DDJaxError

DATA = "synthetic:classes=3,size=8,channels=1,train=60,test=6,seed=2"


@pytest.fixture(scope="module")
def dataset():
    return data.load_dataset(DATA)


def _integer_scores(n, seed=0, high=4):
    """Scores with many ties, as forgetting counts have."""
    return np.random.default_rng(seed).integers(0, high, size=n).astype(np.float64)


# --- ranking ------------------------------------------------------------------------------------


def test_ranking_is_selmatch_sorted_per_class_with_ties_in_train_order(dataset):
    labels = dataset.y_train
    scores = _integer_scores(len(labels))
    indices_class = [[i for i, y in enumerate(labels) if y == c] for c in range(3)]
    # SelMatch distill.py: sorted(indices_class[c], key=lambda i: score[i], reverse=reverse)
    # with reverse=True for forgetting counts (higher = harder) and False for C-scores.
    hard = difficulty.rank_per_class(difficulty.DifficultyScores(scores, "harder"), labels, 3)
    easy = difficulty.rank_per_class(difficulty.DifficultyScores(scores, "easier"), labels, 3)
    for c in range(3):
        published_forgetting = sorted(indices_class[c], key=lambda i: scores[i], reverse=True)
        published_cscore = sorted(indices_class[c], key=lambda i: scores[i], reverse=False)
        assert hard[c].tolist() == published_forgetting
        assert easy[c].tolist() == published_cscore
        # Ties keep ascending train order in both directions (Python's sort is stable).
        for ranking in (hard[c], easy[c]):
            for a, b in zip(ranking[:-1], ranking[1:], strict=True):
                if scores[a] == scores[b]:
                    assert a < b


def test_the_direction_is_explicit_and_validated():
    values = np.array([0.9, 0.1, 0.5])
    np.testing.assert_array_equal(difficulty.DifficultyScores(values, "harder").hardness, values)
    np.testing.assert_array_equal(difficulty.DifficultyScores(values, "easier").hardness, -values)
    with pytest.raises(DDJaxError, match="scores_higher='up'"):
        difficulty.DifficultyScores(values, "up")
    with pytest.raises(DDJaxError, match="non-finite"):
        difficulty.DifficultyScores(np.array([1.0, np.nan]), "harder")


# --- SelMatch's window --------------------------------------------------------------------------

# (ipc, alpha, beta) of SelMatch's scripts/distill (CIFAR-10 and CIFAR-100 rows).
PUBLISHED = [
    (250, 0.6, 0.5), (500, 0.2, 0.3), (1000, 0.1, 0.2), (1500, 0.1, 0.2),
    (25, 0.8, 0.8), (50, 0.6, 0.7), (100, 0.3, 0.6), (150, 0.2, 0.4),
]  # fmt: skip


@pytest.mark.parametrize("ipc, alpha, beta", PUBLISHED)
def test_window_split_is_the_published_formula(ipc, alpha, beta):
    split = difficulty.window_split(ipc, alpha, beta)
    # distill.py: args.cpc = int(args.ipc * args.alpha); args.spc = args.ipc - args.cpc;
    # args.ths = int(args.ipc * args.beta)
    assert split.distill_per_class == int(ipc * alpha)
    assert split.select_per_class == ipc - int(ipc * alpha)
    assert split.start == int(ipc * beta)
    ths, spc = split.start, split.select_per_class
    assert split.select_slice == slice(ths, ths + spc)
    assert split.distill_slice == slice(ths + spc, ths + ipc)


def test_window_split_floors_like_python_int():
    assert difficulty.window_split(100, 0.29, 0.0).distill_per_class == 28  # 28.999999999999996
    split = difficulty.window_split(10, 0.25, 0.35)
    assert (split.distill_per_class, split.select_per_class, split.start) == (2, 8, 3)
    with pytest.raises(DDJaxError, match="alpha=1.5"):
        difficulty.window_split(10, 1.5, 0.0)
    with pytest.raises(DDJaxError, match="beta=-0.1"):
        difficulty.window_split(10, 0.5, -0.1)


def test_window_indices_follow_the_ranking():
    ranking = [np.arange(100, 130)[::-1], np.arange(0, 30)]
    split = difficulty.window_split(10, 0.3, 0.5)  # cpc 3, spc 7, ths 5
    selected, distilled = difficulty.window_indices(ranking, split)
    for c in range(2):
        np.testing.assert_array_equal(selected[c], ranking[c][5:12])  # s[ths : ths+spc]
        np.testing.assert_array_equal(distilled[c], ranking[c][12:15])  # s[ths+spc : ths+IPC]
    with pytest.raises(DDJaxError, match="class 1 has 14 train images.*needs .* = 15"):
        difficulty.window_indices([np.arange(20), np.arange(14)], split)


# --- score files --------------------------------------------------------------------------------


def test_scores_files_npy_and_npz_with_label_check(tmp_path, dataset):
    labels = dataset.y_train
    values = _integer_scores(len(labels)) / 4
    np.save(tmp_path / "scores.npy", values)
    np.savez(tmp_path / "cscores.npz", scores=values, labels=labels)
    from_npy = difficulty.load_scores(tmp_path / "scores.npy", higher="harder", train_labels=labels)
    from_npz = difficulty.load_scores(
        tmp_path / "cscores.npz", higher="easier", train_labels=labels
    )
    np.testing.assert_array_equal(from_npy.values, values)
    np.testing.assert_array_equal(from_npz.hardness, -values)

    shuffled = labels.copy()
    shuffled[[0, 5]] = labels[[5, 0]] if labels[0] != labels[5] else (labels[[0, 5]] + 1) % 3
    np.savez(tmp_path / "other_order.npz", scores=values, labels=shuffled)
    np.savez(tmp_path / "no_scores.npz", values=values)
    np.save(tmp_path / "short.npy", values[:-1])
    np.save(tmp_path / "nan.npy", np.where(np.arange(len(values)) == 3, np.nan, values))
    (tmp_path / "scores.txt").write_text("1 2 3")
    cases = [
        ("other_order.npz", "'labels' differ from the dataset's train labels at 2 positions"),
        ("no_scores.npz", "has no 'scores' array"),
        ("short.npy", f"has {len(values) - 1} scores, the dataset has {len(values)}"),
        ("nan.npy", "non-finite values \\(first at index 3\\)"),
        ("scores.txt", "expected .npy"),
        ("missing.npy", "does not exist"),
    ]
    for name, message in cases:
        with pytest.raises(DDJaxError, match=message):
            difficulty.load_scores(tmp_path / name, higher="harder", train_labels=labels)


def test_forgetting_source_reads_the_experts_counts_and_refuses_the_wrong_direction(
    tmp_path, dataset
):
    labels = dataset.y_train
    counts = _integer_scores(len(labels), seed=3)
    # The experts stage's file: per-expert counts and their mean (ddjax.experts).
    np.savez(tmp_path / experts.FORGETTING_FILE, mean=counts.astype(np.float32))
    scores = difficulty.scores_from_source(
        "forgetting", higher="harder", train_labels=labels, experts_dir=tmp_path
    )
    assert scores.higher == "harder"
    np.testing.assert_array_equal(scores.values, counts)
    with pytest.raises(DDJaxError, match="forgetting counts are higher for harder"):
        difficulty.scores_from_source(
            "forgetting", higher="easier", train_labels=labels, experts_dir=tmp_path
        )
    with pytest.raises(DDJaxError, match="needs the ddjax experts directory"):
        difficulty.scores_from_source("forgetting", higher="harder", train_labels=labels)
    with pytest.raises(DDJaxError, match="scores is empty"):
        difficulty.scores_from_source("", higher="harder", train_labels=labels)


# --- coresets -----------------------------------------------------------------------------------


def test_forgetting_coreset_takes_the_hardest_or_easiest_per_class(dataset):
    scores = difficulty.DifficultyScores(_integer_scores(len(dataset.y_train), high=10), "harder")
    ranking = difficulty.rank_per_class(scores, dataset.y_train, 3)
    hardest = select.select(dataset, "forgetting", 4, scores=scores)
    easiest = select.select(dataset, "forgetting", 4, scores=scores, end="easiest")
    for synset, expected in (
        (hardest, np.concatenate([s[:4] for s in ranking])),
        (easiest, np.concatenate([s[::-1][:4] for s in ranking])),
    ):
        np.testing.assert_array_equal(synset.meta["indices"], expected)
        np.testing.assert_array_equal(synset.images, dataset.x_train[expected])
        np.testing.assert_array_equal(synset.labels, np.repeat(np.arange(3), 4))
        assert synset.meta["num_distilled"] == 0 and synset.meta["scores_higher"] == "harder"
    hard_values = scores.values[hardest.meta["indices"]]
    easy_values = scores.values[easiest.meta["indices"]]
    assert hard_values.min() >= easy_values.max()
    with pytest.raises(DDJaxError, match="needs per-example difficulty scores"):
        select.select(dataset, "forgetting", 4)
    with pytest.raises(DDJaxError, match="end='middle'"):
        select.select(dataset, "forgetting", 4, scores=scores, end="middle")


def test_window_coreset_is_selmatch_eval_window(dataset):
    scores = difficulty.DifficultyScores(_integer_scores(len(dataset.y_train)), "easier")
    ranking = difficulty.rank_per_class(scores, dataset.y_train, 3)
    synset = select.select(dataset, "window", 5, scores=scores, beta=0.5)
    # eval.py --method window: sorted(...)[ths:ths + ipc] with ths = int(ipc * beta) = 2.
    expected = np.concatenate([s[2:7] for s in ranking])
    np.testing.assert_array_equal(synset.meta["indices"], expected)
    np.testing.assert_array_equal(synset.images, dataset.x_train[expected])
    assert (synset.meta["beta"], synset.meta["window_start"]) == (0.5, 2)


def test_window_search_returns_the_best_window(dataset):
    """A constructed case: the score peaks at β = 0.3, and tied scores keep the first β."""
    scores = difficulty.DifficultyScores(_integer_scores(len(dataset.y_train), high=50), "harder")
    calls = []

    def evaluate(synset):
        calls.append(synset.meta["beta"])
        return {0.0: 0.2, 0.1: 0.5, 0.3: 0.9, 0.5: 0.4, 0.7: 0.9}[synset.meta["beta"]]

    search = select.search_window(dataset, scores, 4, (0.0, 0.1, 0.3, 0.5, 0.7), evaluate=evaluate)
    assert calls == [0.0, 0.1, 0.3, 0.5, 0.7]
    assert search.best_beta == 0.3  # 0.7 ties at 0.9 and comes later
    assert search.accuracies == {0.0: 0.2, 0.1: 0.5, 0.3: 0.9, 0.5: 0.4, 0.7: 0.9}
    best = select.select(dataset, "window", 4, scores=scores, beta=0.3)
    np.testing.assert_array_equal(search.synset.images, best.images)
    assert search.synset.meta["window_search"]["0.3"] == 0.9
    assert select.SELMATCH_BETAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    # Every window is built before any evaluation: a β that does not fit costs no training.
    calls.clear()
    with pytest.raises(DDJaxError, match="beta=20.0 needs floor"):
        select.search_window(dataset, scores, 4, (0.0, 20.0), evaluate=evaluate)
    assert calls == []


def test_select_from_config_runs_the_difficulty_methods(tmp_path, dataset):
    labels = dataset.y_train
    values = _integer_scores(len(labels), high=20)
    np.savez(tmp_path / "cscores.npz", scores=values, labels=labels)
    config = select.difficulty_fields(config_lib.select_config(DATA))
    assert select.difficulty_fields(config) is config  # idempotent
    config.ipc = 3
    config.method = "window"
    config.scores = str(tmp_path / "cscores.npz")
    config.scores_higher = "easier"
    config.betas = (0.0, 1.0, 2.0)
    seen = []

    def evaluate(synset):
        seen.append(synset.meta["beta"])
        return -abs(synset.meta["beta"] - 1.0)

    synset = select.select_from_config(dataset, config, evaluate=evaluate)
    assert seen == [0.0, 1.0, 2.0] and synset.meta["beta"] == 1.0
    expected = select.select(
        dataset, "window", 3, scores=difficulty.DifficultyScores(values, "easier"), beta=1.0
    )
    np.testing.assert_array_equal(synset.images, expected.images)
    config.method = "forgetting"
    config.end = "easiest"
    synset = select.select_from_config(dataset, config)
    assert synset.meta["end"] == "easiest" and synset.meta["scores"] == config.scores
    bare = config_lib.select_config(DATA)
    bare.method = "window"
    with pytest.raises(DDJaxError, match="needs the difficulty fields"):
        select.select_from_config(dataset, bare)
