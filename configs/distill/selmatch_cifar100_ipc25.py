r"""SelMatch on cifar100, IPC 25 (5 % of the data): SelMatch's published setting (Lee & Chung
2024; ``scripts/distill/CIFAR100.sh``; brief §4.3).

  ddjax distill --config configs/distill/selmatch_cifar100_ipc25.py \
      --config.experts_dir=runs/experts_cifar100_convnetbn \
      --config.scores=PATH/TO/cscores.npz --workdir runs/distill_selmatch_cifar100_ipc25

alpha = 0.8 (cpc = floor(IPC * alpha) = 20 distilled, spc = 5 selected real images per class),
beta = 0.8 (window start ths = floor(IPC * beta) = 20 in each class's hardest-first ranking:
D_select = s[20:25], D_distill = s[25:45]); N = 55, M = 2, T+ = 80, batch_syn = 125, lr_img =
1000, lr_lr = 1e-05, lr_teacher = 0.001, student ConvNetBN, no ZCA, 10,000 iterations;
evaluation at iterations 0, 500, 1000, 2500, 5000, 7500, 10000 with 5 ResNet18BN networks x
1000 epochs (protocol 'selmatch': lr 0.1 cosine to 0.001, momentum 0.9, wd 5e-4, batch 128,
combined augmentation).

Scores: SelMatch ranks CIFAR by C-scores (Jiang et al. 2021; higher = easier), which ddjax does
not ship: pass a .npz with 'scores' (and 'labels', checked against the train order) or .npy via
--config.scores (scores_higher = easier). `--config.scores=forgetting
--config.scores_higher=harder` uses the experts' forgetting counts instead.

Experts: SelMatch's are ConvNetBN, 100 epochs, no ZCA (this run needs T+ + M = 82 epochs):
`ddjax experts --config configs/experts/cifar100.py --config.model=ConvNetBN
--config.epochs=100`. Fields: ddjax.distill.run.selmatch_config.
"""

from ddjax.distill.run import selmatch_config


def get_config():
    return selmatch_config(
        "cifar100",
        ipc=25,
        alpha=0.8,
        beta=0.8,
        eval_epochs=1000,
        scores="",
        scores_higher="easier",
    )
