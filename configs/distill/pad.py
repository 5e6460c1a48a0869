r"""PAD (Li et al. 2024, "Prioritize Alignment in Dataset Distillation"): one config family.

  ddjax distill --config configs/distill/pad.py:cifar10,ipc=10 \
      --config.experts_dir=runs/experts_cifar10_zca --workdir runs/pad_cifar10_ipc10

DATM's fields (configs/distill/datm.py; PAD is DATM plus filtering) and depth_ratio, the
fraction of parameters (the shallowest, in PyTorch's flat order) left out of the matching loss
(ddjax.distill.pad). Rows: NUS-HPC-AI-Lab/PAD configs/CIFAR-10/ConvIN/IPC{1,10,50,500,1000}.yaml
(the distillation half; sequential generation where the release's default
Sequential_Generation=True applies, batch_syn None where the published 500/1000 cover all
images, ZCA on: the later `zca: True` of each file wins). 10,000 iterations, evaluation every
500 (1000 at IPC 500/1000) with one ConvNet, soft cross-entropy, batch 128.

PAD's experts are trained on an easy-to-hard schedule of the examples (buffer_CL.py:
init_ratio 0.75, add_end_epoch 20, rm_epoch_first 40, rm_epoch_second 60, rm_easy_ratio_first
0.1, rm_easy_ratio_second 0.2 over 100 epochs; ddjax.distill.pad.ExampleSchedule), by GraNd
scores in the paper. ddjax's experts are MTT's plain-SGD ones unless trained with that schedule
(README, "PAD").
"""

import ml_collections

from ddjax.config import family_arg, import_config

datm = import_config("distill/datm.py")

#: (dataset, ipc) -> DATM's fields and depth_ratio (PAD's CIFAR-10 configs).
PUBLISHED = {
    ("cifar10", 1): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=4,
                         lr_img=100, lr_lr=1e-07, lr_teacher=0.01, lr_y=5.0, threshold=1.1,
                         depth_ratio=0.0),
    ("cifar10", 10): dict(syn_steps=80, expert_epochs=2, min_start_epoch=0, max_start_epoch=20,
                          current_max_start_epoch=10, expansion_end_iteration=1000,
                          lr_img=100, lr_lr=1e-05, lr_teacher=0.01, lr_y=2.0, threshold=1.0,
                          depth_ratio=0.5),
    ("cifar10", 50): dict(syn_steps=80, expert_epochs=3, min_start_epoch=0, max_start_epoch=40,
                          current_max_start_epoch=20, expansion_end_iteration=2000,
                          lr_img=1000, lr_lr=1e-05, lr_teacher=0.01, lr_y=2.0, threshold=1.0,
                          depth_ratio=0.25),
    ("cifar10", 500): dict(syn_steps=40, expert_epochs=2, min_start_epoch=40,
                           max_start_epoch=70, current_max_start_epoch=60,
                           expansion_end_iteration=2000, batch_syn=1000, lr_img=50,
                           lr_lr=1e-05, lr_teacher=0.01, lr_y=10.0, threshold=1.0,
                           eval_every=1000, depth_ratio=0.5),
    ("cifar10", 1000): dict(syn_steps=100, expert_epochs=2, min_start_epoch=40,
                            max_start_epoch=60, batch_syn=1000, lr_img=50, lr_lr=1e-05,
                            lr_teacher=0.01, lr_y=10.0, threshold=1.0, eval_every=1000,
                            depth_ratio=0.5),
}  # fmt: skip


def get_config(arg: str) -> ml_collections.ConfigDict:
    dataset, ipc = family_arg(arg, PUBLISHED, "configs/distill/pad.py")
    row = dict(PUBLISHED[dataset, ipc])
    depth_ratio = row.pop("depth_ratio")
    config = datm.datm_fields(dataset, ipc, **row)
    config.method = "pad"
    config.depth_ratio = float(depth_ratio)  # masked shallow fraction of the parameters
    return config
