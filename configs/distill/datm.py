r"""DATM (Guo et al., ICLR 2024): the published hyper-parameters as one config family.

  ddjax distill --config configs/distill/datm.py:cifar10,ipc=10 \
      --config.experts_dir=runs/experts_cifar10_zca --workdir runs/datm_cifar10_ipc10

MTT's fields (configs/distill/mtt.py) plus DATM's: the matching range [T-, T+) with sequential
generation from T (current_max_start_epoch) over expansion_end_iteration outer iterations
(DATM's expansion_end_epoch), learned soft labels initialised from the experts (init:
samples_predicted_correctly | real) with lr_y and momentum 0.9, the loss threshold; 10,000
iterations, evaluation every 500 with 1 network x 1,000 epochs, soft cross-entropy, batch 128
(DATM re-evaluates the best set with 5 afterwards: `ddjax evaluate` on synset_best.npz).

Rows (research/trajectory_matching.md §3.2; NUS-HPC-AI-Lab/DATM configs): CIFAR-10/100 and
Tiny-ImageNet as published (batch_syn None = all images). Fashion-MNIST (not published):
CIFAR-10's settings without ZCA. digits (not published): the digits MTT row with DATM's
CIFAR-10 IPC 10 additions, T = 10 -> T+ = 20 over the 100 iterations, lr_y 2, threshold 1;
measured on the 2-core CPU (quick start's experts, 5 networks x 300 epochs): 92.58 % at the
start, 94.56 ± 0.26 % after 100 iterations (random digits 94.88, MTT 95.91); about 5 s per
iteration. The quick start uses it.

Experts: DATM uses FTD's GSAM experts trained for 100 epochs; ddjax's are MTT's plain-SGD
experts (a deliberate difference). A run needs experts of at least T+ + M epochs, of the same
model and ZCA setting.
"""

import ml_collections

from ddjax.config import family_arg, import_config

mtt = import_config("distill/mtt.py")

#: (dataset, ipc) -> MTT's fields and DATM's (T-, T+, T, expansion end, lr_y, threshold, init).
PUBLISHED = {
    ("cifar10", 1): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=4,
                         batch_syn=None, zca=True, lr_img=100, lr_lr=1e-07, lr_teacher=0.01,
                         lr_y=5.0, threshold=1.1),
    ("cifar10", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=20,
                          current_max_start_epoch=10, expansion_end_iteration=1000,
                          batch_syn=None, zca=True, lr_img=100, lr_lr=1e-05, lr_teacher=0.01,
                          lr_y=2.0, threshold=1.0),
    ("cifar10", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=40,
                          current_max_start_epoch=20, expansion_end_iteration=2000,
                          batch_syn=None, zca=True, lr_img=1000, lr_lr=1e-05, lr_teacher=0.01,
                          lr_y=2.0, threshold=1.0),
    ("cifar100", 1): dict(syn_steps=40, expert_epochs=3, min_start_epoch=0, max_start_epoch=20,
                          current_max_start_epoch=10, expansion_end_iteration=1000,
                          batch_syn=None, zca=True, lr_img=1000, lr_lr=1e-05, lr_teacher=0.01,
                          lr_y=10.0, threshold=1.0),
    ("cifar100", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=50,
                           current_max_start_epoch=30, expansion_end_iteration=2000,
                           batch_syn=None, zca=True, lr_img=1000, lr_lr=1e-05,
                           lr_teacher=0.01, lr_y=10.0, threshold=1.0),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=20,
                           max_start_epoch=70, batch_syn=1000, zca=True, lr_img=1000,
                           lr_lr=1e-05, lr_teacher=0.01, lr_y=10.0, threshold=1.0,
                           init="real"),
    ("tiny_imagenet", 1): dict(syn_steps=40, expert_epochs=2, min_start_epoch=0,
                               max_start_epoch=20, current_max_start_epoch=15,
                               expansion_end_iteration=2000, batch_syn=None, zca=True,
                               lr_img=10000, lr_lr=0.0001, lr_teacher=0.01, lr_y=10.0,
                               threshold=1.0, model="ConvNetD4"),
    ("tiny_imagenet", 10): dict(syn_steps=40, expert_epochs=2, min_start_epoch=10,
                                max_start_epoch=50, batch_syn=500, zca=True, lr_img=100,
                                lr_lr=0.0001, lr_teacher=0.01, lr_y=10.0, threshold=1.0,
                                model="ConvNetD4"),
    ("tiny_imagenet", 50): dict(syn_steps=20, expert_epochs=2, min_start_epoch=40,
                                max_start_epoch=70, batch_syn=1000, zca=True, lr_img=100,
                                lr_lr=0.0001, lr_teacher=0.01, lr_y=10.0, threshold=1.0,
                                model="ConvNetD4"),
    ("fashion_mnist", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0,
                                max_start_epoch=20, current_max_start_epoch=10,
                                expansion_end_iteration=1000, batch_syn=None, zca=False,
                                lr_img=100, lr_lr=1e-05, lr_teacher=0.01, lr_y=2.0,
                                threshold=1.0),
    ("fashion_mnist", 50): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0,
                                max_start_epoch=40, current_max_start_epoch=20,
                                expansion_end_iteration=2000, batch_syn=None, zca=False,
                                lr_img=1000, lr_lr=1e-05, lr_teacher=0.01, lr_y=2.0,
                                threshold=1.0),
    ("digits", 10): dict(syn_steps=20, expert_epochs=2, min_start_epoch=0, max_start_epoch=20,
                         current_max_start_epoch=10, expansion_end_iteration=100, lr_img=10.0,
                         lr_lr=1e-05, lr_teacher=0.01, lr_y=2.0, threshold=1.0, zca=False,
                         model="ConvNetW64", iterations=100, eval_every=100, eval_epochs=300,
                         num_eval=5),
}  # fmt: skip


def datm_fields(
    dataset: str,
    ipc: int,
    *,
    min_start_epoch: int,
    lr_y: float,
    threshold: float,
    current_max_start_epoch: int | None = None,
    expansion_end_iteration: int | None = None,
    zca: bool = True,
    init: str = "samples_predicted_correctly",
    iterations: int = 10000,
    eval_every: int = 500,
    num_eval: int = 1,
    **mtt_row,
) -> ml_collections.ConfigDict:
    """MTT's fields with DATM's run defaults, plus DATM's own (PAD builds on these too)."""
    config = mtt.mtt_fields(
        dataset,
        ipc,
        zca=zca,
        iterations=iterations,
        eval_every=eval_every,
        num_eval=num_eval,
        eval_batch_size=128,
        **mtt_row,
    )
    config.method = "datm"
    config.init = init  # samples_predicted_correctly | real
    config.soft_labels = "learned"  # DATM's learnable label logits
    config.min_start_epoch = min_start_epoch  # T-: start epoch drawn from T-..upper bound - 1
    # Sequential generation: the upper bound grows from T to T+ over expansion_end_iteration
    # outer iterations (DATM's expansion_end_epoch); unset: off.
    config.current_max_start_epoch = ml_collections.config_dict.placeholder(int)
    config.current_max_start_epoch = current_max_start_epoch
    config.expansion_end_iteration = ml_collections.config_dict.placeholder(int)
    config.expansion_end_iteration = expansion_end_iteration
    config.lr_y = float(lr_y)  # learned labels' learning rate
    config.momentum_y = 0.9  # learned labels' SGD momentum
    config.threshold = ml_collections.config_dict.placeholder(float)  # skip if loss > it
    config.threshold = float(threshold)
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset, ipc = family_arg(arg, PUBLISHED, "configs/distill/datm.py")
    return datm_fields(dataset, ipc, **PUBLISHED[dataset, ipc])
