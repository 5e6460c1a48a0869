r"""DATM on cifar10, IPC 1: DATM's configuration (Guo et al. 2024; brief §3.2).

  ddjax distill --config configs/distill/datm_cifar10_ipc1.py \
      --config.experts_dir=runs/experts_cifar10_zca \
      --workdir runs/distill_datm_cifar10_ipc1

N (syn_steps) = 80, M (expert_epochs) = 2, start epoch from T- = 0 up to T+ = 4 (exclusive), no
sequential generation, batch_syn = all (10 images; published 10), ZCA = True, lr_img = 100,
lr_lr = 1e-07, lr_teacher = 0.01, lr_y = 5 (momentum 0.9), threshold = 1.1, init =
samples_predicted_correctly, student ConvNet; 10,000 iterations, evaluation every 500 with 1
network x 1,000 epochs, soft cross-entropy, batch 128 (DATM's protocol).

Experts: DATM uses FTD's GSAM experts trained for 100 epochs; ddjax's are MTT's plain-SGD
experts (a deliberate difference). This run needs at least T+ + M = 6 epochs: `ddjax experts
--config configs/experts/cifar10.py`. Same model and ZCA setting. Fields:
ddjax.distill.run.datm_config.
"""

from ddjax.distill.run import datm_config


def get_config():
    return datm_config(
        "cifar10",
        ipc=1,
        syn_steps=80,
        expert_epochs=2,
        min_start_epoch=0,
        max_start_epoch=4,
        batch_syn=None,
        zca=True,
        lr_img=100,
        lr_lr=1e-07,
        lr_teacher=0.01,
        lr_y=5.0,
        threshold=1.1,
        init="samples_predicted_correctly",
        model="ConvNet",
    )
