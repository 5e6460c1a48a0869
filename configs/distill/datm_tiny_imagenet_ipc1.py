r"""DATM on tiny_imagenet, IPC 1: DATM's configuration (Guo et al. 2024; brief §3.2).

  ddjax distill --config configs/distill/datm_tiny_imagenet_ipc1.py \
      --config.dataset.name=folder:/data/tiny-imagenet-200 \
      --config.experts_dir=runs/experts_tiny_imagenet_zca_100 \
      --workdir runs/distill_datm_tiny_imagenet_ipc1

N (syn_steps) = 40, M (expert_epochs) = 2, start epoch from T- = 0 up to T+ = 20 (exclusive),
sequential generation from T = 15 to T+ over 2,000 iterations, batch_syn = all (200 images;
published 1,000), ZCA = True, lr_img = 10000, lr_lr = 0.0001, lr_teacher = 0.01, lr_y = 10
(momentum 0.9), threshold = 1.0, init = samples_predicted_correctly, student ConvNetD4; 10,000
iterations, evaluation every 500 with 1 network x 1,000 epochs, soft cross-entropy, batch 128
(DATM's protocol).

Experts: DATM uses FTD's GSAM experts trained for 100 epochs; ddjax's are MTT's plain-SGD
experts (a deliberate difference). This run needs at least T+ + M = 22 epochs: `ddjax experts
--config configs/experts/tiny_imagenet.py --config.dataset.zca=True` (DATM whitens
Tiny-ImageNet; MTT does not). Same model and ZCA setting. Fields: ddjax.distill.run.datm_config.
"""

from ddjax.distill.run import datm_config


def get_config():
    config = datm_config(
        "folder:data/tiny-imagenet-200",
        ipc=1,
        syn_steps=40,
        expert_epochs=2,
        min_start_epoch=0,
        max_start_epoch=20,
        current_max_start_epoch=15,
        expansion_end_iteration=2000,
        batch_syn=None,
        zca=True,
        lr_img=10000,
        lr_lr=0.0001,
        lr_teacher=0.01,
        lr_y=10.0,
        threshold=1.0,
        init="samples_predicted_correctly",
        model="ConvNetD4",
    )
    config.dataset.normalisation = "tiny_imagenet"  # as the experts (unused with ZCA)
    return config
