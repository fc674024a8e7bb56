r"""AutoPrune on MNIST LeNets: pretrain, prune with auxiliary parameters, fine-tune.

Commands (from the repository root; MNIST built offline from the original files):

  # LeNet-300-100, weight pruning:
  python -m jaxprune.main --config configs/autoprune_lenet.py:arch=lenet300 \
      --config.dataset.manual_dir=../shared/data/mnist \
      --config.dataset.data_dir=/tmp/tfds_mnist --workdir workdirs/autoprune_lenet300
  # LeNet-5, weight pruning (softplus surrogate):
  python -m jaxprune.main --config configs/autoprune_lenet.py:arch=lenet5 \
      --config.dataset.manual_dir=../shared/data/mnist \
      --config.dataset.data_dir=/tmp/tfds_mnist --workdir workdirs/autoprune_lenet5
  # Surrogate ablation: add surrogate=leaky_relu or surrogate=linear; reuse a finished
  # pretraining with --config.autoprune.init_from=workdirs/autoprune_lenet5/pretrain/final.
  # Neuron pruning (exports the physically smaller LeNet): add granularity=neuron, and
  # neuron_axis=in to gate units through their fan-out (see jaxprune.optim.autoprune).
  # Smoke test on synthetic 28x28 data (well under a minute):
  python -m jaxprune.main --config configs/autoprune_lenet.py:smoke --workdir /tmp/ap_smoke

Expected results (full MNIST, 2 CPU cores; tables, ablations and every earlier setting in
docs/methods/autoprune.md). LeNet-5, the default (16 epochs of pruning with lambda_m 3.5e-4
ramped in over 2, then 6 of fine-tuning without weight decay; measured 2026-12-07 on a
2-core Intel Xeon, each seed's dense start from this recipe's own pretraining):

  seed 0: 318.4x at 0.91% test error (dense 1.00%, -0.09 points), 4.0% of the FLOPs,
          kept conv1 94/500, conv2 331/25,000, fc1 757/400,000, fc2 170/5,000
  seed 1: 322.0x at 1.17% (dense 0.99%, +0.18), 3.9% of the FLOPs, kept 91/324/764/158
  seed 2: 319.6x at 1.01% (dense 1.00%, +0.01), 3.1% of the FLOPs, kept 66/264/826/191
  seed 3: 335.3x at 1.13% (dense 0.99%, +0.14), 3.8% of the FLOPs, kept 89/315/729/151
  seed 4: 323.2x at 1.14% (dense 0.96%, +0.18), 3.4% of the FLOPs, kept 78/280/810/164

The pruning + fine-tuning stage took 17.4-17.6 min with three runs sharing the 2 cores (one
run alone was not timed), after 4-15 min of pretraining. The authors report 310x at 7% of the
FLOPs with no accuracy drop; here two of five seeds are within 0.1 points of their dense
error, +0.08 points on average (issue 27's bar asks for three of three). Seeds 3 and 4 took
25.9 min each, side by side (5.4 min pretraining). One seed's difference carries a test-set
standard error of about 0.1 points (report.md: error_change_se); per-layer lambda_m
(regularization_scale) and a magnitude start for M (m_init_rule) did not lower it (docs).
The earlier default (8 epochs, flat 4e-4) gave 257.6x / 294.3x / 291.5x at +0.21 / +0.19 /
+0.14 points on 2026-12-06.
LeNet-300-100 at >= 30x with <= 2% test error in a few minutes (measured 99.4x at 1.86%,
dense 1.54%; kept fc1 1,985/235,200, fc2 515/30,000, fc3 179/1,000).
"""
from jaxprune import config_lib
from jaxprune.methods.autoprune import autoprune_config

# arch -> model, weight lr, epochs of dense pretraining / pruning / fine-tuning, batch size
# of pruning and fine-tuning, lambda_m, its linear ramp (epochs), the fine-tuning's weight
# decay (None: train.weight_decay), M's lr, and whether the weight lr restarts for the
# fine-tuning (LeNet-5: batch 64 and a restart took the error from 1.12% to 0.83% at
# lambda_m 2e-4; issue 27's passes chose the rest, docs/methods/autoprune.md).
ARCHS = {"lenet5": dict(model="lenet5", lr=0.01, pretrain=5, prune=16, tune=6, batch=64,
                        lam=3.5e-4, ramp=2, tune_decay=0.0, lr_m=2.0, finetune="restart"),
         "lenet300": dict(model="lenet300_100", lr=0.05, pretrain=10, prune=15, tune=5,
                          batch=128, lam=2e-4, ramp=0, tune_decay=None, lr_m=2.0,
                          finetune="continue")}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, arch="lenet5", dataset="mnist", surrogate="softplus",
                              granularity="weight", neuron_axis="out", smoke=False)
  if args.arch not in ARCHS:
    raise config_lib.UserError(f"arch={args.arch!r}: choose one of {', '.join(ARCHS)}.")
  arch = ARCHS[args.arch]
  config = config_lib.base_config("autoprune")
  config.model = config_lib.model_config(arch["model"])
  config.dataset = config_lib.dataset_config(args.dataset)
  config.dataset.augment = "none"
  common = dict(warmup_epochs=0, eval_batch_size=1000, learning_rate=arch["lr"],
                weight_decay=5e-4, nesterov=True, log_every_steps=100,
                checkpoint_every_steps=2000, eval_every_epochs=5)
  config.pretrain = config_lib.train_config(epochs=arch["pretrain"], batch_size=128, **common)
  config.train = config_lib.train_config(epochs=arch["prune"] + arch["tune"],
                                         batch_size=arch["batch"], **common)
  config.autoprune = autoprune_config(
      prune_epochs=arch["prune"], regularization=arch["lam"], m_learning_rate=arch["lr_m"],
      regularization_warmup_epochs=arch["ramp"], finetune_schedule=arch["finetune"],
      surrogate=args.surrogate, granularity=args.granularity, neuron_axis=args.neuron_axis)
  if arch["tune_decay"] is not None:
    config.autoprune.finetune_weight_decay = arch["tune_decay"]
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.augment = "none"
    config.dataset.synthetic.image_shape = (28, 28, 1)
    small = dict(batch_size=64, eval_batch_size=256, log_every_steps=8,
                 eval_every_epochs=1)
    config.pretrain.update(epochs=1, **small)
    config.train.update(epochs=2, **small)
    config.autoprune.update(prune_epochs=1, regularization=1e-2,
                            regularization_warmup_epochs=0, finetune_weight_decay=None)
  return config
