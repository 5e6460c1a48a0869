r"""MTT on scikit-learn's 8x8 digits, IPC 10: a small CPU configuration (not published).

  ddjax experts --config configs/experts/digits.py --workdir runs/experts_digits
  ddjax distill --config configs/distill/digits_ipc10.py \
      --config.experts_dir=runs/experts_digits --workdir runs/distill_digits_ipc10

ConvNet-3 of width 64 (ConvNetW64) as the digits experts; N = 20 inner steps on the full
synthetic set, M = 2, T+ = 20 (later segments of the 40-epoch experts: with T+ = 10 and N = 10
the set did not improve on its random start), lr_img 10, 100 iterations. Found by a search on an
H100 (5 networks, 300 epochs; random start 94.88 %): 95.82 / 96.09 / 96.18 / 96.36 % after
50 / 100 / 150 / 250 iterations; lr_img 3 or 30, batch_syn 20, M = 4 or T+ = 10 were worse.
About 10 minutes on 2 CPU cores. The quick start uses these.
Fields: ddjax.distill.run.distill_config.
"""

from ddjax.distill.run import distill_config


def get_config():
    config = distill_config(
        "digits",
        ipc=10,
        syn_steps=20,
        expert_epochs=2,
        max_start_epoch=20,
        lr_img=10.0,
        lr_lr=1e-5,
        lr_teacher=0.01,
        model="ConvNetW64",
        iterations=100,
        eval_every=100,
        eval_epochs=300,
    )
    return config
