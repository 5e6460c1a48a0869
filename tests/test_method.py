"""The trajectory-matching plug-in interface: the core calls a method's hooks, and only them.

A method written here (not one of ddjax's) changes the iteration exactly where its hooks say,
and the registry refuses unknown names in one line.
"""

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import models
from ddjax.config import load_config
from ddjax.distill import core, matching, registry
from ddjax.distill.method import Method
from ddjax.distill.mtt import MTT
from ddjax.errors import DDJaxError

IMAGE_SHAPE = (8, 8, 1)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
STEP = core.StepConfig(syn_steps=2, expert_epochs=1, max_start_epoch=3, lr_img=10.0, lr_lr=1e-3)


@dataclasses.dataclass(frozen=True)
class LastEpochOnly(MTT):
    """Always starts at T+ - 1, learns only the first two images, never accepts a loss > cap."""

    name: ClassVar[str] = "last_epoch_only"
    cap: float = 1e9

    def draw_start_epoch(self, key, iteration, max_start_epoch):
        bound = jnp.full((), max_start_epoch, jnp.int32)
        return bound - 1, bound

    def learnable(self, images):
        return images[:2]

    def merge(self, learned, images):
        return jnp.concatenate([learned, images[2:]])

    def within_bounds(self, loss):
        return loss <= self.cap


@functools.cache
def _model():
    return models.get_model("ConvNet", 3, IMAGE_SHAPE, width=3, depth=1, norm="none")


def _trajectories():
    snapshots = [models.init_variables(_model(), jax.random.key(e), IMAGE_SHAPE)["params"]
                 for e in range(5)]  # fmt: skip
    return jax.tree.map(lambda *s: jnp.stack(s)[None], *snapshots)


def _steps(method, count=3):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, *IMAGE_SHAPE)).astype(np.float32)
    state = core.init_state(images, np.arange(6) % 3, 0.01, jax.random.PRNGKey(0), STEP, method)
    step = core.make_distill_step(
        matching.InnerLoop(_model(), dsa_strategy="crop_flip"), STEP, method, donate=False,
        compiler_options=FAST_COMPILE,
    )  # fmt: skip
    first = state
    metrics = []
    for _ in range(count):
        state, m = step(state, _trajectories(), jnp.int32(0))
        metrics.append(jax.device_get(m))
    return first, state, metrics


def test_the_core_uses_the_hooks_of_a_method_it_does_not_know():
    first, last, metrics = _steps(LastEpochOnly())
    assert [int(m["start_epoch"]) for m in metrics] == [2, 2, 2]
    assert not any(m["skipped"] for m in metrics)
    np.testing.assert_array_equal(last.images[2:], first.images[2:])  # not learnable
    assert not np.array_equal(last.images[:2], first.images[:2])
    mtt_first, mtt_last, mtt_metrics = _steps(MTT())
    assert not np.array_equal(mtt_last.images[2:], mtt_first.images[2:])
    assert {int(m["start_epoch"]) for m in mtt_metrics} <= {0, 1, 2}


def test_an_acceptance_hook_that_refuses_keeps_the_state():
    first, last, metrics = _steps(LastEpochOnly(cap=0.0))
    assert all(m["skipped"] and m["over_threshold"] and not m["non_finite"] for m in metrics)
    np.testing.assert_array_equal(last.images, first.images)
    np.testing.assert_array_equal(last.inner_lr, first.inner_lr)
    assert int(last.step) == 3


def test_the_registry_names_every_method_and_refuses_others():
    assert set(registry.METHODS) == {"mtt", "datm", "selmatch", "pad"}
    for name, method in registry.METHODS.items():
        assert method.name == name and issubclass(method, Method)
    config = load_config("configs/distill/mtt.py:digits,ipc=1", ["method=dc"])
    with pytest.raises(DDJaxError, match="config.method='dc' is not known; valid:"):
        registry.method_class(config)
    tesla = load_config("configs/distill/mtt.py:digits,ipc=1", ["soft_labels=tesla"])
    assert registry.method_class(tesla).name == "mtt" and registry.method_class(tesla).float_labels


def test_family_configs_refuse_rows_they_do_not_have():
    with pytest.raises(DDJaxError, match="no published row 'cifar10,ipc=3'; rows: cifar10,ipc=1"):
        load_config("configs/distill/mtt.py:cifar10,ipc=3")
    with pytest.raises(DDJaxError, match="must look like DATASET,ipc=K"):
        load_config("configs/distill/datm.py:cifar10")
    with pytest.raises(DDJaxError, match="a config family: add :ARG"):
        load_config("configs/distill/mtt.py")
