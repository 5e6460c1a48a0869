r"""MTT (Cazenavette et al., CVPR 2022): the published hyper-parameters as one config family.

  ddjax experts --config configs/experts/mtt.py:cifar10 --workdir runs/experts_cifar10_zca
  ddjax distill --config configs/distill/mtt.py:cifar10,ipc=10 \
      --config.experts_dir=runs/experts_cifar10_zca --workdir runs/distill_cifar10_ipc10

The argument picks a row of PUBLISHED: `DATASET,ipc=K`. TESLA's labels are this family with
--config.soft_labels=tesla; TESLA's gradient is --config.mode=tesla. Every field is
overridable with --config.FIELD=VALUE. The other trajectory-matching families (datm.py,
selmatch.py, pad.py) build on `mtt_fields` below.

Rows (research/trajectory_matching.md §1.8, MTT's Table 6 and README):
* CIFAR-10/100, Tiny-ImageNet: MTT's published settings; batch_syn None = all images.
* Fashion-MNIST: not published by MTT; MNIST-like settings (FRePo's table reports MTT's
  Fashion-MNIST numbers without hyper-parameters): CIFAR-10's without ZCA.
* digits (scikit-learn 8x8, not published): a CPU configuration found by a search on an H100
  (5 networks, 300 epochs; random start 94.88 %): at IPC 10, 95.82 / 96.09 / 96.18 / 96.36 %
  after 50 / 100 / 150 / 250 iterations (lr_img 3 or 30, batch_syn 20, M = 4 or T+ = 10 were
  worse). ConvNet-3 of width 64 as the digits experts (configs/experts/mtt.py:digits); about 10
  minutes on 2 CPU cores. The quick start uses both rows.
* Tiny-ImageNet reads the raw folder layout from data/tiny-imagenet-200 with ImageNet's
  normalisation, as MTT (and the experts).
"""

import ml_collections

from ddjax.config import dataset_section, eval_section, family_arg

#: (dataset, ipc) -> N (syn_steps), M (expert_epochs), T+ (max_start_epoch), batch_syn, ZCA,
#: lr_img, lr_lr, alpha_0 (lr_teacher), student; plus run-length overrides for small rows.
PUBLISHED = {
    ("cifar10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, batch_syn=None,
                         zca=True, lr_img=100, lr_lr=1e-07, lr_teacher=0.01),
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, batch_syn=None,
                          zca=True, lr_img=100, lr_lr=1e-05, lr_teacher=0.001),
    ("cifar10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, batch_syn=None,
                          zca=False, lr_img=1000, lr_lr=1e-05, lr_teacher=0.001),
    ("cifar100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, batch_syn=None,
                          zca=True, lr_img=1000, lr_lr=1e-05, lr_teacher=0.01),
    ("cifar100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, batch_syn=None,
                           zca=False, lr_img=1000, lr_lr=1e-05, lr_teacher=0.01),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, batch_syn=125,
                           zca=True, lr_img=1000, lr_lr=1e-05, lr_teacher=0.01),
    ("tiny_imagenet", 1): dict(syn_steps=10, expert_epochs=2, max_start_epoch=10,
                               batch_syn=None, zca=False, lr_img=10000, lr_lr=0.0001,
                               lr_teacher=0.01, model="ConvNetD4"),
    ("tiny_imagenet", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40,
                                batch_syn=200, zca=False, lr_img=10000, lr_lr=0.0001,
                                lr_teacher=0.01, model="ConvNetD4"),
    ("tiny_imagenet", 50): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40,
                                batch_syn=300, zca=False, lr_img=10000, lr_lr=0.0001,
                                lr_teacher=0.01, model="ConvNetD4"),
    ("fashion_mnist", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2,
                               batch_syn=None, zca=False, lr_img=100, lr_lr=1e-07,
                               lr_teacher=0.01),
    ("fashion_mnist", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20,
                                batch_syn=None, zca=False, lr_img=100, lr_lr=1e-05,
                                lr_teacher=0.001),
    ("fashion_mnist", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40,
                                batch_syn=None, zca=False, lr_img=1000, lr_lr=1e-05,
                                lr_teacher=0.001),
    ("digits", 1): dict(syn_steps=10, expert_epochs=2, max_start_epoch=10, lr_img=100.0,
                        lr_lr=1e-05, lr_teacher=0.01, model="ConvNetW64", iterations=200,
                        eval_every=100, eval_epochs=300),
    ("digits", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=10.0,
                         lr_lr=1e-05, lr_teacher=0.01, model="ConvNetW64", iterations=100,
                         eval_every=100, eval_epochs=300),
}  # fmt: skip

#: Datasets that are read from a folder (name -> (dataset.name, dataset.normalisation)).
FOLDERS = {"tiny_imagenet": ("folder:data/tiny-imagenet-200", "tiny_imagenet")}


def mtt_fields(
    dataset: str,
    ipc: int,
    *,
    syn_steps: int,
    expert_epochs: int,
    max_start_epoch: int,
    lr_img: float,
    lr_lr: float,
    lr_teacher: float,
    batch_syn: int | None = None,
    zca: bool = False,
    model: str = "ConvNet",
    iterations: int = 5000,
    eval_every: int = 100,
    eval_epochs: int = 1000,
    num_eval: int = 5,
    eval_batch_size: int = 256,
) -> ml_collections.ConfigDict:
    """The fields every trajectory-matching run has (MTT's arguments, by MTT's names)."""
    name, normalisation = FOLDERS.get(dataset, (dataset, None))
    config = ml_collections.ConfigDict()
    config.dataset = dataset_section(name, zca=zca)
    if normalisation is not None:
        config.dataset.normalisation = normalisation
    config.method = "mtt"  # the plug-in (ddjax.distill.registry): mtt | datm | selmatch | pad
    config.model = model  # the student; must be the experts' architecture
    config.experts_dir = ""  # a `ddjax experts` work directory (required)
    config.experts_in_memory = 10  # experts loaded at once (MTT: one buffer file of 10)
    config.ipc = ipc
    config.init = "real"  # real (random real images per class) | noise
    config.iterations = iterations
    config.syn_steps = syn_steps  # N
    config.expert_epochs = expert_epochs  # M
    config.max_start_epoch = max_start_epoch  # T+ (start epoch drawn from 0..T+-1)
    config.batch_syn = ml_collections.config_dict.placeholder(int)  # None: all images
    config.batch_syn = batch_syn
    config.lr_img = lr_img
    config.lr_lr = lr_lr
    config.lr_teacher = lr_teacher  # initial learnable step size alpha
    config.momentum = 0.5  # outer SGD momentum (images and alpha)
    config.soft_labels = "none"  # none: hard labels | tesla: TESLA's soft-label assignment
    config.mode = "remat"  # remat | unroll | tesla
    config.remat_every = ml_collections.config_dict.placeholder(int)
    # auto: rolled (compile time independent of N), except unrolled on CPU for mode=unroll or a
    # student whose convolutions are not all on ddjax's fast CPU gradient
    # (ddjax.distill.matching.resolve_loop); or unrolled | rolled | a chunk length such as '5'.
    config.loop = "auto"
    # CPU convolution gradients: fast (ddjax's conv_nhwc VJP, 1.4-1.6x faster first- and
    # second-order ConvNet gradients on XLA:CPU) | xla (XLA's own); no effect on GPU/TPU.
    config.conv_grad = "fast"
    config.dsa = True
    config.dsa_strategy = "color_crop_cutout_flip_scale_rotate"
    config.lr_floor = ml_collections.config_dict.placeholder(float)  # alpha >= lr_floor
    config.shard_batch = True  # split the inner minibatch over all devices (data axis)
    config.seed = 0
    config.eval_every = eval_every
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    config.log_every = 10
    config.eval = eval_section(epochs=eval_epochs, num_models=num_eval, models=(model,))
    config.eval.batch_size = eval_batch_size
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset, ipc = family_arg(arg, PUBLISHED, "configs/distill/mtt.py")
    return mtt_fields(dataset, ipc, **PUBLISHED[dataset, ipc])
