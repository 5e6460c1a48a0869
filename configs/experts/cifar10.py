r"""MTT expert trajectories on CIFAR-10 (Cazenavette et al. 2022, buffer.py defaults).

  ddjax experts --config configs/experts/cifar10.py --workdir runs/experts_cifar10

100 ConvNet-3 experts (width 128, instance norm, avg-pool), 50 epochs each, SGD lr 0.01 without
momentum or weight decay, batch 256, DSA on every batch; params saved at init and after every
epoch. ZCA whitening is on, as in MTT's main CIFAR-10 settings (IPC 1 and 10; MTT's IPC 50 runs
use --config.dataset.zca=False). ZCA must match between the experts and the distillation run:
ZCA and non-ZCA experts are different experts (ddjax refuses to mix them).

Storage: about 65 MB per expert (51 snapshots x 320,010 params x 4 bytes), 6.5 GB for 100.
Host memory while training: experts_at_once trajectories (650 MB at 10).

Fields: dataset.{name,data_dir,zca}, model (a ddjax.models name), num_experts, epochs, lr,
momentum, weight_decay, batch_size, augment (dsa | crop_flip | none), seed, experts_at_once
(trained side by side; does not change the results), pool_mode (auto | vmap | loop),
test_every, test_limit (first N test images; unset: all), checkpoint_every (epochs between
resume points).
"""

from ddjax.config import experts_config


def get_config():
    return experts_config("cifar10", zca=True)
