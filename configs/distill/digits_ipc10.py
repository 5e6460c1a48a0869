r"""MTT on scikit-learn's 8x8 digits, IPC 10: a small CPU configuration (not published).

  ddjax experts --config configs/experts/digits.py --workdir runs/experts_digits
  ddjax distill --config configs/distill/digits_ipc10.py \
      --config.experts_dir=runs/experts_digits --workdir runs/distill_digits_ipc10

ConvNet-3 of width 64 (ConvNetW64) as the digits experts; N = 10 inner steps on the full
synthetic set, M = 2, T+ = 10, lr_img 10 (100 as at IPC 1 moved the 100 images too far: 93.3 %
after 80 iterations against 94.4 % with 10); a few minutes on 2 CPU cores. The quick start
uses these. At IPC 10 MTT does not yet beat random digits (see README).
Fields: ddjax.distill.run.distill_config.
"""

from ddjax.distill.run import distill_config


def get_config():
    config = distill_config(
        "digits",
        ipc=10,
        syn_steps=10,
        expert_epochs=2,
        max_start_epoch=10,
        lr_img=10.0,
        lr_lr=1e-5,
        lr_teacher=0.01,
        model="ConvNetW64",
        iterations=80,
        eval_every=100,
        eval_epochs=300,
    )
    return config
