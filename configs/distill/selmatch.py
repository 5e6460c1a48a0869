r"""SelMatch (Lee & Chung, ICML 2024): the published hyper-parameters as one config family.

  ddjax experts --config configs/experts/mtt.py:cifar10 --config.model=ConvNetBN \
      --config.epochs=100 --workdir runs/experts_cifar10_convnetbn
  ddjax distill --config configs/distill/selmatch.py:cifar10,ipc=250 \
      --config.experts_dir=runs/experts_cifar10_convnetbn \
      --config.scores=PATH/TO/cscores.npz --workdir runs/selmatch_cifar10_ipc250

MTT's fields (configs/distill/mtt.py) at SelMatch's distill.py defaults (ConvNet-BN student,
N = 55, M = 2, T+ = 80, batch_syn 125, lr_img 1000, lr_lr 1e-5, alpha_0 (lr_teacher) 0.001,
10,000 iterations, no ZCA) plus SelMatch's: alpha, the distilled fraction (cpc = floor(IPC *
alpha) images per class are learned, spc = IPC - cpc stay real); beta, the window start (ths =
floor(IPC * beta) in each class's hardest-first ranking: D_select = s[ths:ths+spc], D_distill =
s[ths+spc:ths+IPC]); the difficulty scores; evaluation at iterations 0, 500, 1000, 2500, 5000,
7500, 10000 with 5 ResNet18BN networks under protocol 'selmatch' (lr 0.1 cosine to 0.001,
momentum 0.9, wd 5e-4, batch 128, combined augmentation) for eval epochs scaled with IPC
(ddjax.evaluate.selmatch_epochs). The evaluation's DSA uses the inner loop's dsa_strategy.

Scores: SelMatch ranks CIFAR by C-scores (Jiang et al. 2021; higher = easier), which ddjax does
not ship: pass a .npz with 'scores' (and 'labels', checked against the train order) or .npy via
--config.scores (scores_higher = easier). `--config.scores=forgetting
--config.scores_higher=harder` uses the experts' forgetting counts instead.

Rows: CIFAR-10 IPC 250/500/1000/1500 and CIFAR-100 IPC 25/50/100/150 (5-30 % of the data) as in
scripts/distill/CIFAR10.sh and CIFAR100.sh (brief §4.3). Fashion-MNIST (not published):
CIFAR-10's smallest-ratio setting (alpha 0.6, beta 0.5) with the experts' forgetting counts;
at IPC 10 batch_syn = all (100 images). Experts: SelMatch's are ConvNetBN, 100 epochs, no ZCA
(a run needs T+ + M = 82 epochs).
"""

import ml_collections

from ddjax.config import family_arg, import_config

mtt = import_config("distill/mtt.py")

#: SelMatch's ``eval_it_pool``: the iterations at which distill.py evaluates its set.
EVAL_ITERATIONS = (0, 500, 1000, 2500, 5000, 7500, 10000)

#: (dataset, ipc) -> alpha, beta, evaluation epochs, scores, and any changed MTT field.
PUBLISHED = {
    ("cifar10", 250): dict(alpha=0.6, beta=0.5, eval_epochs=1000),
    ("cifar10", 500): dict(alpha=0.2, beta=0.3, eval_epochs=500),
    ("cifar10", 1000): dict(alpha=0.1, beta=0.2, eval_epochs=250, lr_img=10000.0),
    ("cifar10", 1500): dict(alpha=0.1, beta=0.2, eval_epochs=167, lr_img=10000.0),
    ("cifar100", 25): dict(alpha=0.8, beta=0.8, eval_epochs=1000),
    ("cifar100", 50): dict(alpha=0.6, beta=0.7, eval_epochs=500),
    ("cifar100", 100): dict(alpha=0.3, beta=0.6, eval_epochs=250),
    ("cifar100", 150): dict(alpha=0.2, beta=0.4, eval_epochs=167),
    ("fashion_mnist", 10): dict(alpha=0.6, beta=0.5, eval_epochs=1000, scores="forgetting",
                                scores_higher="harder", batch_syn=None),
    ("fashion_mnist", 50): dict(alpha=0.6, beta=0.5, eval_epochs=1000, scores="forgetting",
                                scores_higher="harder", batch_syn=125),
}  # fmt: skip


def selmatch_fields(
    dataset: str,
    ipc: int,
    *,
    alpha: float,
    beta: float,
    eval_epochs: int,
    scores: str = "",
    scores_higher: str = "easier",
    syn_steps: int = 55,
    expert_epochs: int = 2,
    max_start_epoch: int = 80,
    lr_img: float = 1000.0,
    lr_lr: float = 1e-5,
    lr_teacher: float = 0.001,
    batch_syn: int | None = 125,
    model: str = "ConvNetBN",
    eval_model: str = "ResNet18BN",
    iterations: int = 10000,
    eval_iterations: tuple[int, ...] = EVAL_ITERATIONS,
    num_eval: int = 5,
) -> ml_collections.ConfigDict:
    """MTT's fields at SelMatch's defaults, plus SelMatch's own."""
    config = mtt.mtt_fields(
        dataset,
        ipc,
        syn_steps=syn_steps,
        expert_epochs=expert_epochs,
        max_start_epoch=max_start_epoch,
        lr_img=lr_img,
        lr_lr=lr_lr,
        lr_teacher=lr_teacher,
        batch_syn=batch_syn,
        zca=False,
        model=model,
        iterations=iterations,
        eval_every=500,  # unused while eval_iterations is set
        eval_epochs=eval_epochs,
        num_eval=num_eval,
        eval_batch_size=128,
    )
    config.method = "selmatch"
    config.init = "window"  # window (SelMatch's default) | random
    config.alpha = float(alpha)  # distilled fraction: cpc = floor(ipc * alpha)
    config.beta = float(beta)  # window start: ths = floor(ipc * beta), hardest first
    config.scores = scores  # 'forgetting' (experts_dir's counts) | a .npy/.npz scores file
    config.scores_higher = scores_higher  # harder (forgetting) | easier (C-scores)
    config.eval_iterations = tuple(int(i) for i in eval_iterations)  # empty: every eval_every
    config.eval.protocol = "selmatch"
    config.eval.models = (eval_model,)
    return config


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset, ipc = family_arg(arg, PUBLISHED, "configs/distill/selmatch.py")
    return selmatch_fields(dataset, ipc, **PUBLISHED[dataset, ipc])
