r"""DATM on fashion_mnist, IPC 50: not published for Fashion-MNIST; CIFAR-10 IPC 50's
values without ZCA.

  ddjax distill --config configs/distill/datm_fashion_mnist_ipc50.py \
      --config.experts_dir=runs/experts_fashion_mnist \
      --workdir runs/distill_datm_fashion_mnist_ipc50

N (syn_steps) = 80, M (expert_epochs) = 2, start epoch from T- = 0 up to T+ = 40 (exclusive),
sequential generation from T = 20 to T+ over 2,000 iterations, batch_syn = all (500 images;
published 500), ZCA = False, lr_img = 1000, lr_lr = 1e-05, lr_teacher = 0.01, lr_y = 2 (momentum
0.9), threshold = 1.0, init = samples_predicted_correctly, student ConvNet; 10,000 iterations,
evaluation every 500 with 1 network x 1,000 epochs, soft cross-entropy, batch 128 (DATM's
protocol). ZCA off as ddjax's Fashion-MNIST experts and MTT configs (DC/DSA/KIP use none for
grayscale).

Experts: DATM uses FTD's GSAM experts trained for 100 epochs; ddjax's are MTT's plain-SGD
experts (a deliberate difference). This run needs at least T+ + M = 42 epochs: `ddjax experts
--config configs/experts/fashion_mnist.py`. Same model and ZCA setting. Fields:
ddjax.distill.run.datm_config.
"""

from ddjax.distill.run import datm_config


def get_config():
    return datm_config(
        "fashion_mnist",
        ipc=50,
        syn_steps=80,
        expert_epochs=2,
        min_start_epoch=0,
        max_start_epoch=40,
        current_max_start_epoch=20,
        expansion_end_iteration=2000,
        batch_syn=None,
        zca=False,
        lr_img=1000,
        lr_lr=1e-05,
        lr_teacher=0.01,
        lr_y=2.0,
        threshold=1.0,
        init="samples_predicted_correctly",
        model="ConvNet",
    )
