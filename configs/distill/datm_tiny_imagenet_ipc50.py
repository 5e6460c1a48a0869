r"""DATM on tiny_imagenet, IPC 50: DATM's configuration (Guo et al. 2024; brief §3.2).

  ddjax distill --config configs/distill/datm_tiny_imagenet_ipc50.py \
      --config.dataset.name=folder:/data/tiny-imagenet-200 \
      --config.experts_dir=runs/experts_tiny_imagenet_zca_100 \
      --workdir runs/distill_datm_tiny_imagenet_ipc50

N (syn_steps) = 20, M (expert_epochs) = 2, start epoch from T- = 40 up to T+ = 70 (exclusive),
no sequential generation, batch_syn = 1,000, ZCA = True, lr_img = 100, lr_lr = 0.0001,
lr_teacher = 0.01, lr_y = 10 (momentum 0.9), threshold = 1.0, init =
samples_predicted_correctly, student ConvNetD4; 10,000 iterations, evaluation every 500 with 1
network x 1,000 epochs, soft cross-entropy, batch 128 (DATM's protocol).

Experts: DATM uses FTD's GSAM experts trained for 100 epochs; ddjax's are MTT's plain-SGD
experts (a deliberate difference). This run needs at least T+ + M = 72 epochs (more than the
default 50): `ddjax experts --config configs/experts/tiny_imagenet.py --config.epochs=100
--config.dataset.zca=True` (DATM whitens Tiny-ImageNet; MTT does not). Same model and ZCA
setting. Fields: ddjax.distill.run.datm_config.
"""

from ddjax.distill.run import datm_config


def get_config():
    config = datm_config(
        "folder:data/tiny-imagenet-200",
        ipc=50,
        syn_steps=20,
        expert_epochs=2,
        min_start_epoch=40,
        max_start_epoch=70,
        batch_syn=1000,
        zca=True,
        lr_img=100,
        lr_lr=0.0001,
        lr_teacher=0.01,
        lr_y=10.0,
        threshold=1.0,
        init="samples_predicted_correctly",
        model="ConvNetD4",
    )
    config.dataset.normalisation = "tiny_imagenet"  # as the experts (unused with ZCA)
    return config
