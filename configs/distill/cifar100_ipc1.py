r"""MTT on cifar100, IPC 1: MTT's table.

  ddjax distill --config configs/distill/cifar100_ipc1.py \
      --config.experts_dir=runs/experts_cifar100_zca --workdir runs/distill_cifar100_ipc1

N (syn_steps) = 20, M (expert_epochs) = 3, T+ (max_start_epoch) = 20, batch_syn = all,
ZCA = True, lr_img = 1000, lr_lr = 1e-05, lr_teacher = 0.01, student ConvNet; 5,000
iterations, evaluation every 100 with 5 networks x 1,000 epochs (MTT's protocol, learned lr).
The experts (`ddjax experts --config configs/experts/cifar100.py`) must use the same model and
ZCA setting. Fields: ddjax.distill.run.distill_config.
"""

from ddjax.distill.run import distill_config


def get_config():
    return distill_config(
        "cifar100",
        ipc=1,
        syn_steps=20,
        expert_epochs=3,
        max_start_epoch=20,
        batch_syn=None,
        zca=True,
        lr_img=1000,
        lr_lr=1e-05,
        lr_teacher=0.01,
        model="ConvNet",
    )
