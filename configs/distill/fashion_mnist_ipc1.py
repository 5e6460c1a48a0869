r"""MTT on fashion_mnist, IPC 1: not published for Fashion-MNIST; CIFAR-10 IPC 1's values without
ZCA (DC/DSA/KIP/FRePo use no ZCA on F-MNIST).

  ddjax distill --config configs/distill/fashion_mnist_ipc1.py \
      --config.experts_dir=runs/experts_fashion_mnist --workdir runs/distill_fashion_mnist_ipc1

N (syn_steps) = 50, M (expert_epochs) = 2, T+ (max_start_epoch) = 2, batch_syn = all,
ZCA = False, lr_img = 100, lr_lr = 1e-07, lr_teacher = 0.01, student ConvNet; 5,000
iterations, evaluation every 100 with 5 networks x 1,000 epochs (MTT's protocol, learned lr).
The experts (`ddjax experts --config configs/experts/fashion_mnist.py`) must use the same model and
ZCA setting. Fields: ddjax.distill.run.distill_config.
"""

from ddjax.distill.run import distill_config


def get_config():
    return distill_config(
        "fashion_mnist",
        ipc=1,
        syn_steps=50,
        expert_epochs=2,
        max_start_epoch=2,
        batch_syn=None,
        zca=False,
        lr_img=100,
        lr_lr=1e-07,
        lr_teacher=0.01,
        model="ConvNet",
    )
