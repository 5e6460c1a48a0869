r"""MTT on cifar10, IPC 10: MTT's table; lr_img 100 (the README's 1e5 is a confirmed typo, mtt#31).

  ddjax distill --config configs/distill/cifar10_ipc10.py \
      --config.experts_dir=runs/experts_cifar10_zca --workdir runs/distill_cifar10_ipc10

N (syn_steps) = 30, M (expert_epochs) = 2, T+ (max_start_epoch) = 20, batch_syn = all,
ZCA = True, lr_img = 100, lr_lr = 1e-05, lr_teacher = 0.001, student ConvNet; 5,000
iterations, evaluation every 100 with 5 networks x 1,000 epochs (MTT's protocol, learned lr).
The experts (`ddjax experts --config configs/experts/cifar10.py`) must use the same model and
ZCA setting. Fields: ddjax.distill.run.distill_config.
"""

from ddjax.distill.run import distill_config


def get_config():
    return distill_config(
        "cifar10",
        ipc=10,
        syn_steps=30,
        expert_epochs=2,
        max_start_epoch=20,
        batch_syn=None,
        zca=True,
        lr_img=100,
        lr_lr=1e-05,
        lr_teacher=0.001,
        model="ConvNet",
    )
