"""ddjax.evaluate: the published protocols, K networks by vmap, devices don't change results."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ddjax import data, evaluate, select
from ddjax.errors import DDJaxError
from ddjax.synset import SyntheticSet


def test_mtt_protocol_schedule_matches_the_reference():
    # MTT utils.evaluate_synset: for ep in range(Epoch + 1): train; if ep == Epoch // 2 + 1:
    # lr *= 0.1 and the optimiser (momentum) is re-created.
    p = evaluate.get_protocol("mtt")
    assert (p.epochs, p.total_epochs, p.batch_size) == (1000, 1001, 256)
    assert (p.momentum, p.weight_decay, p.augment, p.lr) == (0.9, 5e-4, "dsa", None)
    lrs = [p.lr_schedule(0.02)(e) for e in range(p.total_epochs)]
    assert lrs[:502] == [0.02] * 502
    assert lrs[502:] == pytest.approx([0.002] * 499)
    assert p.reset_epochs == (502,)
    dsa = evaluate.get_protocol("dsa")
    assert dsa.lr == 0.01 and dsa.epochs == 1000
    dc = evaluate.get_protocol("dc")
    assert (dc.lr, dc.epochs, dc.augment) == (0.01, 300, "none")


def test_protocol_errors_name_the_field():
    with pytest.raises(DDJaxError, match="protocol='fast'"):
        evaluate.get_protocol("fast")
    with pytest.raises(DDJaxError, match="epochs=0"):
        evaluate.get_protocol("mtt", epochs=0)
    with pytest.raises(DDJaxError, match="unknown protocol settings"):
        evaluate.get_protocol("mtt", epoch=3)


@pytest.fixture(scope="module")
def synthetic():
    return data.load_dataset("synthetic")


def _coreset(dataset, ipc=2, lr=None):
    synset = select.select(dataset, "random", ipc, seed=0)
    if lr is not None:
        synset = SyntheticSet(synset.images, synset.labels, synset.num_classes, lr)
    return synset


def test_evaluate_is_deterministic_and_reports_per_class(synthetic):
    synset = _coreset(synthetic)
    kwargs = dict(model="ConvNet", num_models=2, epochs=4, model_overrides={"width": 8})
    a = evaluate.evaluate_synset(synset, synthetic, seed=0, **kwargs)
    b = evaluate.evaluate_synset(synset, synthetic, seed=0, **kwargs)
    c = evaluate.evaluate_synset(synset, synthetic, seed=1, **kwargs)
    assert a.accuracies.shape == (2,)
    assert a.per_class.shape == (2, synthetic.num_classes)
    np.testing.assert_array_equal(a.accuracies, b.accuracies)
    np.testing.assert_array_equal(a.final_train_loss, b.final_train_loss)
    assert not np.array_equal(a.final_train_loss, c.final_train_loss)
    # Overall accuracy is the class-size-weighted mean of the per-class accuracies.
    counts = np.bincount(synthetic.y_test, minlength=synthetic.num_classes)
    np.testing.assert_allclose(a.per_class @ counts / counts.sum(), a.accuracies, atol=1e-6)


def test_learning_rate_source(synthetic):
    kwargs = dict(num_models=1, epochs=1, model_overrides={"width": 4})
    learned = evaluate.evaluate_synset(_coreset(synthetic, lr=0.03), synthetic, **kwargs)
    assert (learned.learning_rate, learned.lr_source) == (0.03, "learned")
    default = evaluate.evaluate_synset(_coreset(synthetic), synthetic, **kwargs)
    assert (default.learning_rate, default.lr_source) == (0.01, "default")
    fixed = evaluate.evaluate_synset(
        _coreset(synthetic, lr=0.03), synthetic, protocol="dsa", **kwargs
    )
    assert (fixed.learning_rate, fixed.lr_source) == (0.01, "fixed")


def test_training_on_a_coreset_beats_chance(synthetic):
    result = evaluate.evaluate_synset(
        _coreset(synthetic, ipc=5),
        synthetic,
        num_models=2,
        epochs=30,
        model_overrides={"width": 16},
    )
    assert result.mean > 2.0 / synthetic.num_classes


def test_mismatched_synset_is_refused(synthetic):
    synset = _coreset(synthetic)
    wrong = SyntheticSet(synset.images[:, :8, :8], synset.labels, synset.num_classes)
    with pytest.raises(DDJaxError, match="shape"):
        evaluate.evaluate_synset(wrong, synthetic, epochs=1)


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys, jax, numpy as np
    from ddjax import data, evaluate, select
    ds = data.load_dataset("synthetic")
    synset = select.select(ds, "random", 2, seed=0)
    out = {"devices": jax.device_count()}
    for mode in sys.argv[1:]:
        # Two DSA groups instead of six: the property is the sharding, and every group
        # vmapped over 8 models is most of this test's compile time.
        r = evaluate.evaluate_synset(synset, ds, num_models=4, epochs=3, pool_mode=mode,
                                     model_overrides={"width": 8}, dsa_strategy="crop_flip")
        out[mode] = {"acc": r.accuracies.tolist(), "loss": r.final_train_loss.tolist()}
    print(json.dumps(out))
    """
)


def _run_on_devices(count, modes):
    # float64 (the networks follow jax_enable_x64): see the test below. XLA_FLAGS is extended,
    # not replaced, so a flag such as --xla_cpu_max_isa=AVX2 reaches the subprocess.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    out = subprocess.run(
        [sys.executable, "-c", _DEVICE_SCRIPT, *modes],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_give_the_same_results_as_one():
    # The pool of 4 networks is spread over 4 devices (one model each), in both pool modes,
    # against one device's loop (vmap equals loop on one device: tests/test_train.py). Four,
    # not eight: the looped pool compiles once per device, and four show the sharding as well.
    one, four = _run_on_devices(1, ["loop"]), _run_on_devices(4, ["loop", "vmap"])
    assert (one["devices"], four["devices"]) == (1, 4)
    # Both in float64: sharding and vmap reorder sums only (~1e-16 relative; three epochs of
    # SGD grow that to ~1e-13 at most), so every test prediction, hence every accuracy, is the
    # same, and the losses, rounded once to float32 when reported, are at most one float32 ulp
    # (2^-23 relative) apart. In float32 the same reordering (~1e-7, grown to ~1e-5) could
    # flip a near-tie prediction depending on the CPU's instruction set.
    reference = one["loop"]
    for run in (four["loop"], four["vmap"]):
        np.testing.assert_allclose(run["loss"], reference["loss"], rtol=2**-22)
        np.testing.assert_array_equal(run["acc"], reference["acc"])


def test_eval_settings_read_a_config_section_once_and_refuse_bad_fields(synthetic):
    from ddjax.config import eval_section

    section = eval_section(epochs=20, num_models=2, models=("ConvNet", "ConvNetBN"))
    settings = evaluate.EvalSettings.from_config(section)
    assert settings == evaluate.EvalSettings(
        protocol="mtt", models=("ConvNet", "ConvNetBN"), num_models=2, epochs=20, batch_size=256
    )
    assert evaluate.EvalSettings.from_config(settings) is settings
    assert settings.get_protocol().epochs == 20
    settings.validate(synthetic)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_models = 3
    refusals = {
        "protocol='nope' is not known": {"protocol": "nope"},
        "config.eval.num_models=0 must be at least 1": {"num_models": 0},
        "config.eval.models is empty": {"models": ()},
        "unknown model 'Nope'": {"models": ("Nope",)},
    }
    for message, change in refusals.items():
        with pytest.raises(DDJaxError, match=re.escape(message)):
            dataclasses.replace(settings, **change).validate(synthetic)
    # SelMatch's combined augmentation needs the set's distilled/real split.
    with pytest.raises(DDJaxError, match="num_distilled"):
        evaluate.EvalSettings(protocol="selmatch").validate(synthetic, _coreset(synthetic))
