r"""MTT on tiny_imagenet, IPC 1: MTT's table (ConvNetD4, 64 px).

  ddjax distill --config configs/distill/tiny_imagenet_ipc1.py \
      --config.dataset.name=folder:/data/tiny-imagenet-200 \
      --config.experts_dir=runs/experts_tiny_imagenet --workdir runs/distill_tiny_imagenet_ipc1

N (syn_steps) = 10, M (expert_epochs) = 2, T+ (max_start_epoch) = 10, batch_syn = all,
ZCA = False, lr_img = 10000, lr_lr = 0.0001, lr_teacher = 0.01, student ConvNetD4; 5,000
iterations, evaluation every 100 with 5 networks x 1,000 epochs (MTT's protocol, learned lr).
The experts (`ddjax experts --config configs/experts/tiny_imagenet.py`) must use the same model and
ZCA setting. Fields: ddjax.distill.run.distill_config.
"""

from ddjax.distill.run import distill_config


def get_config():
    config = distill_config(
        "folder:data/tiny-imagenet-200",
        ipc=1,
        syn_steps=10,
        expert_epochs=2,
        max_start_epoch=10,
        batch_syn=None,
        zca=False,
        lr_img=10000,
        lr_lr=0.0001,
        lr_teacher=0.01,
        model="ConvNetD4",
    )
    config.dataset.normalisation = "tiny_imagenet"  # ImageNet statistics, as MTT (and the experts)
    return config
