r"""DATM on cifar100, IPC 10: DATM's configuration (Guo et al. 2024; brief §3.2).

  ddjax distill --config configs/distill/datm_cifar100_ipc10.py \
      --config.experts_dir=runs/experts_cifar100_zca_100 \
      --workdir runs/distill_datm_cifar100_ipc10

N (syn_steps) = 80, M (expert_epochs) = 2, start epoch from T- = 0 up to T+ = 50 (exclusive),
sequential generation from T = 30 to T+ over 2,000 iterations, batch_syn = all (1,000 images;
published 1,000), ZCA = True, lr_img = 1000, lr_lr = 1e-05, lr_teacher = 0.01, lr_y = 10
(momentum 0.9), threshold = 1.0, init = samples_predicted_correctly, student ConvNet; 10,000
iterations, evaluation every 500 with 1 network x 1,000 epochs, soft cross-entropy, batch 128
(DATM's protocol).

Experts: DATM uses FTD's GSAM experts trained for 100 epochs; ddjax's are MTT's plain-SGD
experts (a deliberate difference). This run needs at least T+ + M = 52 epochs (more than the
default 50): `ddjax experts --config configs/experts/cifar100.py --config.epochs=100`. Same
model and ZCA setting. Fields: ddjax.distill.run.datm_config.
"""

from ddjax.distill.run import datm_config


def get_config():
    return datm_config(
        "cifar100",
        ipc=10,
        syn_steps=80,
        expert_epochs=2,
        min_start_epoch=0,
        max_start_epoch=50,
        current_max_start_epoch=30,
        expansion_end_iteration=2000,
        batch_syn=None,
        zca=True,
        lr_img=1000,
        lr_lr=1e-05,
        lr_teacher=0.01,
        lr_y=10.0,
        threshold=1.0,
        init="samples_predicted_correctly",
        model="ConvNet",
    )
