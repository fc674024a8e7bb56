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

Expected results (full MNIST, 2 CPU cores; see README for the measured numbers):
LeNet-300-100 at >= 30x compression with <= 2% test error in a few minutes (measured 99.4x at
1.86%); LeNet-5 at >= 100x with <= 1% test error in about 4 minutes on a quiet CPU (measured
118.2x at 0.83% error and 8.2% of the FLOPs with seed 0; the authors report 310x at 7%).
"""
from jaxprune import config_lib
from jaxprune.methods.autoprune import autoprune_config

# arch -> model, weight lr, epochs of dense pretraining / pruning / fine-tuning, batch size
# of pruning and fine-tuning, lambda_m, M's lr, and whether the weight lr restarts for the
# fine-tuning (LeNet-5: batch 64 and a restart took the error from 1.12% to 0.83%).
ARCHS = {"lenet5": dict(model="lenet5", lr=0.01, pretrain=5, prune=8, tune=6, batch=64,
                        lam=2e-4, lr_m=2.0, finetune="restart"),
         "lenet300": dict(model="lenet300_100", lr=0.05, pretrain=10, prune=15, tune=5,
                          batch=128, lam=2e-4, lr_m=2.0, finetune="continue")}


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
      finetune_schedule=arch["finetune"], surrogate=args.surrogate,
      granularity=args.granularity, neuron_axis=args.neuron_axis)
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.augment = "none"
    config.dataset.synthetic.image_shape = (28, 28, 1)
    small = dict(batch_size=64, eval_batch_size=256, log_every_steps=8,
                 eval_every_epochs=1)
    config.pretrain.update(epochs=1, **small)
    config.train.update(epochs=2, **small)
    config.autoprune.update(prune_epochs=1, regularization=1e-2)
  return config
