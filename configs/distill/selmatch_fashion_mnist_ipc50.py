r"""SelMatch on fashion_mnist, IPC 50: not published for Fashion-MNIST; ddjax's choice is
CIFAR-10's smallest-ratio setting (IPC 250, 5 %: alpha 0.6, beta 0.5) and SelMatch's defaults.

  ddjax distill --config configs/distill/selmatch_fashion_mnist_ipc50.py \
      --config.experts_dir=runs/experts_fashion_mnist_convnetbn \
      --workdir runs/distill_selmatch_fashion_mnist_ipc50

alpha = 0.6 (cpc = 30 distilled, spc = 20 selected real images per class), beta = 0.5 (window
start ths = 25: D_select = s[25:45], D_distill = s[45:75] of each class's hardest-first
ranking); N = 55, M = 2, T+ = 80, batch_syn = 125, lr_img = 1000, lr_lr = 1e-05, lr_teacher =
0.001, student ConvNetBN, no ZCA, 10,000 iterations; evaluation at iterations 0, 500, 1000,
2500, 5000, 7500, 10000 with 5 ResNet18BN networks x 1000 epochs (protocol 'selmatch'; IPC 50
is 0.83 % of a class, below SelMatch's 5 %, where ddjax.evaluate.selmatch_epochs caps the
epochs at 1000).

Scores: the experts' forgetting counts (higher = harder; C-scores do not exist for
Fashion-MNIST), from the same experts directory.

Experts: SelMatch's are ConvNetBN, 100 epochs, no ZCA (this run needs T+ + M = 82 epochs):
`ddjax experts --config configs/experts/fashion_mnist.py --config.model=ConvNetBN
--config.epochs=100`. Fields: ddjax.distill.run.selmatch_config.
"""

from ddjax.distill.run import selmatch_config


def get_config():
    return selmatch_config(
        "fashion_mnist",
        ipc=50,
        alpha=0.6,
        beta=0.5,
        eval_epochs=1000,
        scores="forgetting",
        scores_higher="harder",
        batch_syn=125,
    )
