r"""MTT on fashion_mnist, IPC 10: not published for Fashion-MNIST; CIFAR-10 IPC 10's values without
ZCA.

  ddjax distill --config configs/distill/fashion_mnist_ipc10.py \
      --config.experts_dir=runs/experts_fashion_mnist --workdir runs/distill_fashion_mnist_ipc10

N (syn_steps) = 30, M (expert_epochs) = 2, T+ (max_start_epoch) = 20, batch_syn = all,
ZCA = False, lr_img = 100, lr_lr = 1e-05, lr_teacher = 0.001, student ConvNet; 5,000
iterations, evaluation every 100 with 5 networks x 1,000 epochs (MTT's protocol, learned lr).
The experts (`ddjax experts --config configs/experts/fashion_mnist.py`) must use the same model and
ZCA setting. Fields: ddjax.distill.run.distill_config.
"""

from ddjax.distill.run import distill_config


def get_config():
    return distill_config(
        "fashion_mnist",
        ipc=10,
        syn_steps=30,
        expert_epochs=2,
        max_start_epoch=20,
        batch_syn=None,
        zca=False,
        lr_img=100,
        lr_lr=1e-05,
        lr_teacher=0.001,
        model="ConvNet",
    )
