r"""DATM on scikit-learn's 8x8 digits, IPC 10: a small CPU configuration (not published).

  ddjax experts --config configs/experts/digits.py --workdir runs/experts_digits
  ddjax distill --config configs/distill/datm_digits_ipc10.py \
      --config.experts_dir=runs/experts_digits --workdir runs/datm_digits_ipc10

The digits MTT setting (configs/distill/digits_ipc10.py: ConvNetW64 experts, N = 20, M = 2,
lr_img 10, 100 iterations) with DATM's additions at CIFAR-10 IPC 10's values: start epochs
from T- = 0 with the upper bound growing from T = 10 to T+ = 20 over the 100 iterations
(sequential generation), learned soft labels initialised from the experts
(samples_predicted_correctly) with lr_y 2 and momentum 0.9, loss threshold 1.0, evaluation
with soft cross-entropy and batch 128. The quick start uses it. Measured on the 2-core CPU
(quick start's experts, 5 networks x 300 epochs): 92.58 % at the start, 94.56 ± 0.26 % after 100
iterations (random digits: 94.88; MTT: 95.91); about 5 s per iteration.
Fields: ddjax.distill.run.datm_config.
"""

from ddjax.distill.run import datm_config


def get_config():
    return datm_config(
        "digits",
        ipc=10,
        syn_steps=20,
        expert_epochs=2,
        min_start_epoch=0,
        max_start_epoch=20,
        current_max_start_epoch=10,
        expansion_end_iteration=100,
        lr_img=10.0,
        lr_lr=1e-5,
        lr_teacher=0.01,
        lr_y=2.0,
        threshold=1.0,
        zca=False,
        model="ConvNetW64",
        iterations=100,
        eval_every=100,
        eval_epochs=300,
        num_eval=5,
    )
