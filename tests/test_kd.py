"""ddjax.sre2l.kd: the KD loss, the published recipes, and students on stored or online labels.

PyTorch (a test-only dependency) is the reference for the loss, the schedules and the
optimisers: the published scripts use ``nn.KLDivLoss``, ``LambdaLR``/``CosineAnnealingLR``/
``SequentialLR`` and ``torch.optim.AdamW``/``SGD``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from ddjax import data, models, train
from ddjax.config import import_config
from ddjax.errors import DDJaxError
from ddjax.evaluate import EvalResult
from ddjax.sre2l import kd, label_store
from ddjax.sre2l.teacher import Teacher
from ddjax.synset import SyntheticSet

DATASET = "synthetic:classes=4,size=8,train=2,test=4"
STUDENT = {"width": 8, "depth": 2}


def test_kd_loss_equals_its_formula_and_pytorch():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(5, 7)).astype(np.float32) * 3
    teacher = rng.normal(size=(5, 7)).astype(np.float32) * 3
    for temperature in (1.0, 4.0, 20.0):
        log_p_s = student / temperature - np.log(
            np.exp(student / temperature).sum(1, keepdims=True)
        )
        p_t = np.exp(teacher / temperature) / np.exp(teacher / temperature).sum(1, keepdims=True)
        formula = np.sum(p_t * (np.log(p_t) - log_p_s)) / 5
        ours = kd.kd_loss(student, teacher, temperature, t_squared=False)
        np.testing.assert_allclose(ours, formula, rtol=1e-5)
        squared = kd.kd_loss(student, teacher, temperature, t_squared=True)
        np.testing.assert_allclose(squared, formula * temperature**2, rtol=1e-5)
        # FKD / CIFAR: KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)).
        reference = F.kl_div(
            F.log_softmax(torch.from_numpy(student) / temperature, 1),
            F.softmax(torch.from_numpy(teacher) / temperature, 1),
            reduction="batchmean",
        )
        np.testing.assert_allclose(ours, reference.item(), rtol=1e-5)
        # Tiny-ImageNet: KLDivLoss(batchmean, log_target=True)(...) * T².
        tiny = F.kl_div(
            F.log_softmax(torch.from_numpy(student) / temperature, 1),
            F.log_softmax(torch.from_numpy(teacher) / temperature, 1),
            reduction="batchmean",
            log_target=True,
        )
        np.testing.assert_allclose(squared, tiny.item() * temperature**2, rtol=1e-5)
    # Stored fp16 logits are used as float32; equal logits give zero loss.
    half = teacher.astype(np.float16)
    np.testing.assert_allclose(
        kd.kd_loss(student, half, 20.0, t_squared=False),
        kd.kd_loss(student, half.astype(np.float32), 20.0, t_squared=False),
    )
    assert abs(float(kd.kd_loss(teacher, teacher, 3.0, t_squared=True))) < 1e-6


def test_published_recipes():
    imagenet = kd.get_recipe("imagenet")
    assert (imagenet.optimizer, imagenet.lr, imagenet.weight_decay, imagenet.decay) == (
        "adamw", 1e-3, 0.01, "kernels"
    )  # fmt: skip
    assert (imagenet.epochs, imagenet.batch_size, imagenet.temperature) == (300, 1024, 20.0)
    assert (imagenet.t_squared, imagenet.crop, imagenet.mix, imagenet.flip) == (
        False, "rrc", "cutmix", True
    )  # fmt: skip
    assert (imagenet.min_scale, imagenet.cutmix_alpha, imagenet.teacher_mode) == (
        0.08, 1.0, "eval"
    )  # fmt: skip
    tiny = kd.get_recipe("tiny_imagenet")
    assert (tiny.optimizer, tiny.lr, tiny.momentum, tiny.weight_decay, tiny.decay) == (
        "sgd", 0.2, 0.9, 1e-4, "all"
    )  # fmt: skip
    assert (tiny.epochs, tiny.batch_size, tiny.warmup_epochs, tiny.warmup_start) == (
        100, 256, 5, 0.01
    )  # fmt: skip
    assert (tiny.temperature, tiny.t_squared, tiny.crop, tiny.mix) == (20.0, True, "rrc", "none")
    cifar = kd.get_recipe("cifar")
    assert (cifar.optimizer, cifar.lr, cifar.weight_decay, cifar.decay) == (
        "adamw", 1e-3, 0.01, "all"
    )  # fmt: skip
    assert (cifar.epochs, cifar.batch_size, cifar.temperature, cifar.t_squared) == (
        400, 128, 30.0, False
    )  # fmt: skip
    assert (cifar.crop, cifar.padding, cifar.flip, cifar.mix, cifar.mixup_alpha) == (
        "random_crop", 4, True, "mixup", 0.8
    )  # fmt: skip
    assert cifar.teacher_mode == "train"  # relabel_cifar.py never calls model_teacher.eval()
    assert kd.get_recipe("cifar", teacher_mode="eval", epochs=10).teacher_mode == "eval"
    assert kd.get_recipe("imagenet", epochs=None).epochs == 300  # None: the recipe's own

    with pytest.raises(DDJaxError, match=r"recipe='fkd' is not known; valid: \['cifar'"):
        kd.get_recipe("fkd")
    with pytest.raises(DDJaxError, match=r"unknown recipe settings \['temp'\]"):
        kd.get_recipe("imagenet", temp=4)
    with pytest.raises(DDJaxError, match="optimizer='adam' is not known"):
        kd.get_recipe("imagenet", optimizer="adam")
    with pytest.raises(DDJaxError, match=r"warmup_epochs=5 must be an integer in \[0, epochs=5\)"):
        kd.get_recipe("tiny_imagenet", epochs=5)
    with pytest.raises(DDJaxError, match="teacher_mode='frozen'"):
        kd.get_recipe("cifar", teacher_mode="frozen")
    with pytest.raises(DDJaxError, match="mix='cutout'"):
        kd.get_recipe("cifar", mix="cutout")
    with pytest.raises(DDJaxError, match="temperature=0"):
        kd.get_recipe("cifar", temperature=0)

    relabel_fields = import_config("relabel/sre2l.py").relabel_fields
    config = relabel_fields("cifar100", "cifar", labels="online", epochs=800)
    assert kd.recipe_from_config(config.recipe) == kd.get_recipe("cifar", epochs=800)


def _torch_lrs(recipe, make_scheduler):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=recipe.lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(recipe.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_learning_rate_schedules_equal_pytorch():
    imagenet = kd.get_recipe("imagenet")
    fkd = _torch_lrs(
        imagenet,
        lambda o: torch.optim.lr_scheduler.LambdaLR(
            o, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / 300)) if step <= 300 else 0
        ),
    )
    np.testing.assert_allclose([imagenet.lr_at(e) for e in range(300)], fkd, rtol=1e-6)
    cifar = kd.get_recipe("cifar")
    cosine = _torch_lrs(cifar, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 400))
    np.testing.assert_allclose([cifar.lr_at(e) for e in range(400)], cosine, rtol=1e-6, atol=1e-12)
    tiny = kd.get_recipe("tiny_imagenet")

    def warmup_then_cosine(optimizer):
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=5)
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=95, eta_min=0.0)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[5])

    reference = _torch_lrs(tiny, warmup_then_cosine)
    np.testing.assert_allclose(
        [tiny.lr_at(e) for e in range(100)], reference, rtol=1e-6, atol=1e-12
    )
    assert tiny.lr_at(0) == pytest.approx(0.002) and tiny.lr_at(5) == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["imagenet", "tiny_imagenet", "cifar"])
def test_optimizers_equal_pytorch(name):
    """AdamW (decay on kernels only for FKD, on everything for CIFAR) and SGD with momentum."""
    recipe = kd.get_recipe(name, lr=0.05)  # a large rate makes any difference visible
    rng = np.random.default_rng(1)
    params = {
        "kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
    }
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}]
    grads.append({k: np.zeros_like(v) for k, v in params.items()})  # decay alone
    grads.append({k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()})

    kernel = torch.nn.Parameter(torch.from_numpy(params["kernel"].copy()))
    bias = torch.nn.Parameter(torch.from_numpy(params["bias"].copy()))
    if recipe.optimizer == "adamw":
        if recipe.decay == "kernels":  # FKD's get_parameters: 'weight' in name and ndim > 1
            groups = [{"params": [kernel]}, {"params": [bias], "weight_decay": 0.0}]
        else:
            groups = [{"params": [kernel, bias]}]
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            [kernel, bias], lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    tx = recipe.make_optimizer()
    update = jax.jit(tx.update)
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    for g in grads:
        kernel.grad, bias.grad = torch.from_numpy(g["kernel"]), torch.from_numpy(g["bias"])
        optimizer.step()
        updates, state = update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = optax.apply_updates(ours, updates)
    np.testing.assert_allclose(ours["kernel"], kernel.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["bias"], bias.detach().numpy(), rtol=1e-5, atol=1e-6)


def tiny_teacher(net, image_shape, seed=0):
    """A BatchNorm teacher with random weights and running statistics (NumPy: no compiling)."""
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
        if name in ("scale", "mean", "bias"):
            return (float(name == "scale") + 0.3 * rng.normal(size=shape.shape)).astype(np.float32)
        fan_in = int(np.prod(shape.shape[:-1]))
        return (rng.normal(size=shape.shape) / np.sqrt(fan_in)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, models.variable_shapes(net, image_shape))
    return Teacher(model=net, variables=jax.tree.map(jnp.asarray, variables), meta={})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    dataset = data.load_dataset(DATASET)
    net = models.get_model("ConvNet", 4, dataset.image_shape, width=8, depth=2, norm="batch")
    teacher = tiny_teacher(net, dataset.image_shape)
    synset = SyntheticSet(dataset.x_train, dataset.y_train, 4)  # 8 images: 2 batches of 4
    path = tmp_path_factory.mktemp("kd") / "labels"
    label_store.write_store(
        path, synset, teacher, dataset, spec=kd.get_recipe("imagenet").augment_spec(dataset),
        epochs=2, batch_size=4, seed=42,
    )  # fmt: skip
    return dataset, teacher, synset, label_store.open_store(path)


def test_stored_and_online_students_agree_with_the_same_keys(setup):
    """Online KD draws the store's batches when given the store's seed (by design of the keys).

    Views are identical and the online fp32 logits round to the stored fp16 ones, so the two
    students differ only by that rounding -- far less than a student whose online views come
    from another seed.
    """
    dataset, teacher, synset, store = setup
    recipe = kd.get_recipe("imagenet", epochs=2, batch_size=4)
    spec = recipe.augment_spec(dataset)
    stored = kd.stored_batches(store, synset.images)
    online = kd.online_batches(
        teacher, synset.images, spec, teacher_mode="eval", batch_size=4, seed=store.seed
    )
    for epoch in range(2):
        pairs = list(zip(stored(epoch), online(epoch), strict=True))
        assert len(pairs) == 2
        for (stored_views, stored_logits), (online_views, online_logits) in pairs:
            np.testing.assert_array_equal(stored_views, online_views)
            np.testing.assert_array_equal(
                stored_logits, np.asarray(online_logits).astype(np.float16).astype(np.float32)
            )

    student = models.get_model("ConvNet", 4, dataset.image_shape, **STUDENT)
    common = dict(image_shape=dataset.image_shape, num_models=1, seed=0, pool_mode="loop")
    from_store, history = kd.train_kd(student, recipe, stored, **common)
    from_teacher, _ = kd.train_kd(student, recipe, online, **common)
    other_views = kd.online_batches(
        teacher, synset.images, spec, teacher_mode="eval", batch_size=4, seed=7
    )
    other, _ = kd.train_kd(student, recipe, other_views, **common)
    assert history.shape == (2, 1) and np.all(np.isfinite(history))
    # The student step compiled once for the three runs (one batch shape, lr injected).
    _, step = kd._steps(student, recipe)
    assert train.driver._step_programs(step).one._cache_size() == 1

    def distance(a, b):
        return max(
            float(jnp.abs(x - y).max())
            for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True)
        )

    same_keys, other_keys = distance(from_store, from_teacher), distance(from_store, other)
    assert same_keys < 2e-4
    assert other_keys > 20 * same_keys


def test_evaluate_kd_results_and_pool_modes(setup):
    dataset, teacher, synset, store = setup
    kwargs = dict(
        recipe="imagenet", store=store, model="ConvNet", model_overrides=STUDENT, num_models=2,
        epochs=2, batch_size=4, seed=3,
    )  # fmt: skip
    loop = kd.evaluate_kd(synset, dataset, teacher, pool_mode="loop", **kwargs)
    vmap = kd.evaluate_kd(synset, dataset, None, pool_mode="vmap", **kwargs)
    assert isinstance(loop, EvalResult)
    assert loop.accuracies.shape == (2,) and loop.per_class.shape == (2, 4)
    assert (loop.model, loop.learning_rate, loop.lr_source) == ("ConvNet", 1e-3, "fixed")
    # 4 classes: every class is among the top 5, so no top-5 is reported; no eval_every.
    assert loop.top5 is None and loop.by_epoch is None
    assert not {"top5", "top5_mean", "by_epoch"} & set(loop.to_json())
    np.testing.assert_allclose(loop.final_train_loss, vmap.final_train_loss, rtol=1e-4)
    np.testing.assert_array_equal(loop.accuracies, vmap.accuracies)
    assert loop.final_train_loss[0] != loop.final_train_loss[1]  # students differ in init


def test_bad_inputs_give_one_line_errors(setup):
    dataset, teacher, synset, store = setup
    kwargs = dict(recipe="imagenet", store=store, model="ConvNet", model_overrides=STUDENT)
    with pytest.raises(DDJaxError, match="batch_size=8 differs from the relabel store's batch"):
        kd.evaluate_kd(synset, dataset, teacher, epochs=2, batch_size=8, **kwargs)
    with pytest.raises(DDJaxError, match="epochs=3 needs labels for epochs 0-2, .* lacks 1"):
        kd.evaluate_kd(synset, dataset, teacher, epochs=3, batch_size=4, **kwargs)
    with pytest.raises(DDJaxError, match="has mix='mixup' but the relabel store .* mix='cutmix'"):
        kd.evaluate_kd(synset, dataset, teacher, epochs=2, batch_size=4, mix="mixup", **kwargs)
    with pytest.raises(DDJaxError, match="teacher_mode='train' but the relabel store"):
        kd.evaluate_kd(
            synset, dataset, teacher, epochs=2, batch_size=4, teacher_mode="train", **kwargs
        )
    other = SyntheticSet(synset.images[::-1].copy(), synset.labels[::-1].copy(), 4)
    with pytest.raises(DDJaxError, match="another synthetic set"):
        kd.evaluate_kd(other, dataset, teacher, epochs=2, batch_size=4, **kwargs)
    bumped = Teacher(teacher.model, jax.tree.map(lambda x: x + 1e-3, teacher.variables), {})
    with pytest.raises(DDJaxError, match="another teacher"):
        kd.evaluate_kd(synset, dataset, bumped, epochs=2, batch_size=4, **kwargs)
    with pytest.raises(DDJaxError, match="has no labels for epoch|not a relabel store"):
        kd.evaluate_kd(
            synset, dataset, teacher, store=store.path / "missing", recipe="imagenet", epochs=2
        )
    with pytest.raises(DDJaxError, match="online KD needs a teacher"):
        kd.evaluate_kd(synset, dataset, None, recipe="imagenet", epochs=1)
    small = SyntheticSet(synset.images[:, :4, :4], synset.labels, 4)
    with pytest.raises(DDJaxError, match=r"synthetic images have shape \(4, 4, 3\)"):
        kd.evaluate_kd(small, dataset, teacher, recipe="imagenet")
