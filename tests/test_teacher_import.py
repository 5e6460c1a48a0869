"""``ddjax teacher``: torchvision's ImageNet ResNet-18/50 imported from a ``.pth`` state_dict.

The files are written by torchvision_nets.py's re-statements of torchvision's networks (same
module names, hence torchvision's keys) at random initialisation with random BatchNorm
statistics, at the rows' 1,000 classes; images are 32 px instead of 224 to keep the forward
passes fast (the networks pool globally, so nothing but speed depends on the size).
"""

import hashlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import cli
from ddjax.config import load_config
from ddjax.errors import DDJaxError
from ddjax.sre2l import teacher as teacher_lib
from ddjax.sre2l.contract import DataContract

torch = pytest.importorskip("torch")
import torchvision_nets  # noqa: E402  (imports torch)

IMAGE_SIZE = 32
# Less XLA optimisation: the forward passes run once, so compiling dominates (as test_datm.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# sum(p.numel() for p in torchvision.models.resnet{18,50}().parameters())
TORCHVISION_PARAMS = {18: 11_689_512, 50: 25_557_032}


def _imagenet_contract(name: str = "stream:imagenet2012") -> DataContract:
    return DataContract.named(name, (IMAGE_SIZE, IMAGE_SIZE, 3), 1000, "imagenet")


def _trained_looking(depth: int) -> torch.nn.Module:
    torch.manual_seed(depth)
    net = torchvision_nets.ResNet(depth, 1000)
    return torchvision_nets.randomise_batchnorm(net, seed=depth).eval()


@pytest.fixture(scope="module")
def pth_files(tmp_path_factory):
    """{depth: (file, net)}: each network's state_dict saved as torchvision ships it."""
    directory = tmp_path_factory.mktemp("weights")
    files = {}
    for depth in (18, 50):
        net = _trained_looking(depth)
        file = directory / f"resnet{depth}.pth"
        torch.save(net.state_dict(), file)
        files[depth] = (file, net)
    return files


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))


def _torch_logits(net, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        example = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return net(example.to(next(net.parameters()).dtype)).numpy()


def _eval_logits(teacher, images) -> np.ndarray:
    apply = jax.jit(
        lambda variables, x: teacher.model.apply(variables, x, train=False),
        compiler_options=FAST_COMPILE,
    )
    return np.asarray(apply(teacher.variables, images))


def _teacher_argv(row: str, file, workdir, *extra: str) -> list[str]:
    return [
        "teacher",
        "--config",
        f"configs/teacher/torchvision.py:{row}",
        f"--config.state_dict={file}",
        f"--config.image_size={IMAGE_SIZE}",
        "--workdir",
        str(workdir),
        *extra,
    ]


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("depth", "model"), [(18, "ResNet18BN"), (50, "ResNet50BNImageNet")], ids=["18", "50"]
)
def test_cli_import_gives_torchs_eval_logits_and_a_recover_command(
    pth_files, tmp_path, capsys, depth, model
):
    source, net = pth_files[depth]
    file = tmp_path / source.name  # a copy, changed at the end
    file.write_bytes(source.read_bytes())
    work = tmp_path / "teacher"
    argv = _teacher_argv(f"resnet{depth}", file, work)
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert out.count("\n") == 1 and f"{model} ({TORCHVISION_PARAMS[depth]:,} parameters)" in out
    assert (
        "next: ddjax recover --config configs/recover/sre2l.py:imagenet "
        f"--config.teacher={work / 'teacher'}"
    ) in out

    teacher = teacher_lib.load_teacher(work / "teacher")
    images = _images()
    expected = _torch_logits(net, images)
    scale = float(np.abs(expected).max())
    logits = _eval_logits(teacher, jnp.asarray(images, jnp.float32))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)

    # The contract the config gives is recorded, and read back it is the same contract.
    assert DataContract.of_teacher(teacher.meta) == _imagenet_contract()
    teacher_lib.check_teacher(teacher, _imagenet_contract())
    with pytest.raises(DDJaxError, match="dataset='stream:imagenet2012'"):
        teacher_lib.check_teacher(teacher, _imagenet_contract("stream:folder:/data/imagenet"))
    results = json.loads((work / "results.json").read_text())
    assert results["num_params"] == TORCHVISION_PARAMS[depth]
    assert results["num_params"] == sum(p.numel() for p in net.parameters())
    assert results["source"] == str(file.absolute())
    assert results["source_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (results["num_classes"], results["image_shape"]) == (1000, [IMAGE_SIZE, IMAGE_SIZE, 3])
    assert json.loads((work / "config.json").read_text())["stage"] == "teacher"

    # The same command again reports the teacher and rewrites nothing; another config, or the
    # same one after the file changed, is refused.
    written = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    code, again, err = _run(argv, capsys)
    assert code == 0 and again == out, err
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == written
    code, _, err = _run([*argv, "--config.num_classes=999"], capsys)
    assert code == 2 and "different config" in err
    changed = net.state_dict()
    changed["fc.bias"] = changed["fc.bias"] + 1.0
    torch.save(changed, file)
    code, _, err = _run(argv, capsys)
    assert code == 2 and "that file now has" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == written


def _import_resnet18(state_dict, **options) -> teacher_lib.Teacher:
    return teacher_lib.import_torch_teacher(
        state_dict,
        model_name="ResNet18BN",
        model_overrides={"small_stem": False},
        dataset=_imagenet_contract(),
        **options,
    )


def _dtypes(teacher: teacher_lib.Teacher) -> set[str]:
    return {leaf.dtype.name for leaf in jax.tree.leaves(teacher.variables)}


def test_float64_state_dict_stays_float64_under_x64(pth_files):
    """With jax_enable_x64, a ``net.double()`` state_dict imports as float64 and the logits
    equal PyTorch's float64 ones to rounding; float32 ones stay float32 (the default)."""
    _, net = pth_files[18]
    net64 = _trained_looking(18).double()
    with jax.enable_x64(True):
        teacher = _import_resnet18(net64.state_dict())
        assert _dtypes(teacher) == {"float64"}
        images = _images(seed=1)
        expected = _torch_logits(net64, images)
        logits = _eval_logits(teacher, jnp.asarray(images, jnp.float64))
        assert logits.dtype == np.float64
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(logits, expected, rtol=1e-10, atol=1e-10 * scale)

        assert _dtypes(_import_resnet18(net.state_dict())) == {"float32"}
        assert _dtypes(_import_resnet18(net.state_dict(), dtype="float64")) == {"float64"}
    # Without x64 JAX has no float64: the same file gives float32 variables, as always.
    assert _dtypes(_import_resnet18(net64.state_dict())) == {"float32"}
    assert jnp.ones(()).dtype == jnp.float32  # x64 is off again


def _junk(directory):
    file = directory / "junk.pth"
    file.write_bytes(b"not a checkpoint")
    return file


def _tensor(directory):
    file = directory / "tensor.pth"
    torch.save(torch.zeros(3), file)
    return file


@pytest.mark.parametrize(
    ("row", "make_file", "extra", "message"),
    [
        ("resnet18", lambda d, files: d / "nope.pth", [], r"state_dict=.*nope\.pth.*no such file"),
        ("resnet18", lambda d, files: _junk(d), [], "cannot read PyTorch checkpoint"),
        ("resnet18", lambda d, files: _tensor(d), [], "holds a Tensor, not a state_dict"),
        (
            "resnet50",
            lambda d, files: files[18][0],
            [],
            r"not a ResNet50BNImageNet state_dict: .*missing keys: layer1\.0\.conv3\.weight",
        ),
        (
            "resnet18",
            lambda d, files: files[18][0],
            ["--config.num_classes=10"],
            r"fc\.weight'\] has shape \(1000, 512\), expected \(10, 512\)",
        ),
        ("resnet18", lambda d, files: "", [], "config.state_dict is empty"),
        ("resnet18", lambda d, files: files[18][0], ["--config.normalisation=nope"], "nope"),
        (
            "resnet18",
            lambda d, files: files[18][0],
            ["--config.model=ResNet18BNImageNet"],
            r"^ddjax: error: unknown model 'ResNet18BNImageNet'",
        ),
    ],
    ids=[
        "missing",
        "junk",
        "tensor",
        "resnet18-as-50",
        "classes",
        "empty",
        "normalisation",
        "model",
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    pth_files, tmp_path, capsys, row, make_file, extra, message
):
    file = make_file(tmp_path, pth_files)
    work = tmp_path / "work"
    code, out, err = _run(_teacher_argv(row, file, work, *extra), capsys)
    assert code == 2 and out == ""
    assert err.startswith("ddjax: error: ") and err.count("\n") == 1, err
    assert len(err) < 600, err  # a whole ResNet-50's key list would be thousands of characters
    assert re.search(message, err), err
    assert not work.exists()


def test_config_rows_and_data_contract():
    for row, model in (("resnet18", "ResNet18BN"), ("resnet50", "ResNet50BNImageNet")):
        config = load_config(f"configs/teacher/torchvision.py:{row}", ["state_dict=x.pth"])
        assert (config.model, config.num_classes, config.image_size) == (model, 1000, 224)
        assert (config.normalisation, config.key_style) == ("imagenet", "torchvision")
    assert load_config("configs/teacher/torchvision.py:resnet18").model_overrides.to_dict() == {
        "small_stem": False,
        "conv_init": "torchvision",
    }
    with pytest.raises(DDJaxError, match="no published row 'vgg11'; rows: resnet18, resnet50$"):
        load_config("configs/teacher/torchvision.py:vgg11")

    contract = DataContract.named("stream:imagenet2012", [224, 224, 3], np.int64(1000), "imagenet")
    assert contract.image_shape == (224, 224, 3) and type(contract.num_classes) is int
    assert contract.mean == (0.485, 0.456, 0.406) and contract.zca is None
    with pytest.raises(DDJaxError, match="normalisation='imagenet1k' is unknown"):
        DataContract.named("x", (224, 224, 3), 1000, "imagenet1k")
    with pytest.raises(DDJaxError, match="DataContract.mean has 3 values for 1-channel images"):
        DataContract.named("x", (28, 28, 1), 10, "imagenet")
    with pytest.raises(DDJaxError, match="DataContract.num_classes must be a positive integer"):
        DataContract("x", (8, 8, 1), 0, (0.5,), (0.5,))


def test_matches_real_torchvision_where_it_imports(tmp_path, capsys):
    """torchvision's own resnet18 file imports to its logits (skipped without torchvision)."""
    torchvision = pytest.importorskip("torchvision")
    net = torchvision_nets.randomise_batchnorm(torchvision.models.resnet18(), seed=3).eval()
    file = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), file)
    code, _, err = _run(_teacher_argv("resnet18", file, tmp_path / "work"), capsys)
    assert code == 0, err
    teacher = teacher_lib.load_teacher(tmp_path / "work" / "teacher")
    images = _images(seed=2)
    expected = _torch_logits(net, images)
    scale = float(np.abs(expected).max())
    logits = _eval_logits(teacher, jnp.asarray(images, jnp.float32))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)
