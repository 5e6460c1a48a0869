r"""torchvision's ImageNet-1K networks as SRe2L teachers: ``ddjax teacher``'s config family.

  ddjax teacher --config configs/teacher/torchvision.py:resnet18 \
      --config.state_dict=/models/resnet18-f37072fd.pth --workdir runs/teacher_resnet18
  ddjax recover --config configs/recover/sre2l.py:imagenet \
      --config.teacher=runs/teacher_resnet18/teacher --workdir runs/recover_imagenet

The argument picks a row of PUBLISHED: the torchvision network. ``state_dict`` is left empty and
must be given: a ``.pth`` file holding the network's ``state_dict`` (torchvision's download, or
``torch.save(net.state_dict(), FILE)``; nothing is downloaded). Every field is overridable with
--config.FIELD=VALUE.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) does not squeeze on ImageNet-1K: recover and relabel use
torchvision's pretrained networks, loaded with ``pretrained=True``, i.e. the ``IMAGENET1K_V1``
weights (research/sre2l.md §1-§2). Shared by the rows: 1,000 classes, 224x224 RGB inputs,
torchvision's ImageNet normalisation mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)
(``normalisation='imagenet'``), torchvision's state_dict keys (``key_style='torchvision'``).

``dataset_name`` is the data the teacher is recorded for: recover and relabel with
``dataset.name`` set check the teacher against it (name, shape, classes, mean/std), and without
it use the recorded contract and read no images. The default is ImageNet streamed from TFDS
(``stream:imagenet2012``); to check the teacher against an ImageNet folder, record that name
instead, e.g. --config.dataset_name=stream:folder:/data/imagenet (the same string later given as
--config.dataset.name).

Rows:
* resnet18 -- torchvision ``resnet18`` (11,689,512 parameters): ddjax ``ResNet18BN`` with the
  ImageNet stem (7x7/2 conv, 3x3/2 max-pool: ``small_stem=False``) and torchvision's
  initialisation recorded (``conv_init``; it does not change imported weights). SRe2L's ImageNet
  teacher. IMAGENET1K_V1 weights: ``resnet18-f37072fd.pth``.
* resnet50 -- torchvision ``resnet50`` (25,557,032 parameters): ddjax ``ResNet50BNImageNet``
  (torchvision's "v1.5" bottleneck, stride in the 3x3 conv): the larger recovery and relabel
  model of SRe2L's ablations and its successors.
  IMAGENET1K_V1 weights: ``resnet50-0676ba61.pth``.
"""

import ml_collections

from ddjax.config import dataset_arg

#: torchvision network -> ddjax model name and the model fields that make it torchvision's.
PUBLISHED = {
    "resnet18": dict(model="ResNet18BN", model_overrides=dict(small_stem=False,
                                                              conv_init="torchvision")),
    "resnet50": dict(model="ResNet50BNImageNet", model_overrides=dict()),
}  # fmt: skip


def teacher_fields(model: str, model_overrides: dict) -> ml_collections.ConfigDict:
    """The fields of a ``ddjax teacher`` config (ddjax.sre2l.teacher_import)."""
    config = ml_collections.ConfigDict()
    config.model = model  # a ddjax.models name
    config.model_overrides = ml_collections.ConfigDict(model_overrides)
    config.state_dict = ""  # the .pth file (required)
    config.key_style = "torchvision"  # torchvision | mtt: the state_dict's key names
    config.dataset_name = "stream:imagenet2012"  # what the teacher is recorded for
    config.num_classes = 1000
    config.image_size = 224  # square RGB inputs
    config.normalisation = "imagenet"  # a ddjax.data.NORMALISATION key
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    network = dataset_arg(arg, PUBLISHED, "configs/teacher/torchvision.py")
    return teacher_fields(**PUBLISHED[network])
