r"""AutoPrune weight pruning of the CIFAR VGG-like network (13 conv + BN, 2 dense).

Commands (from the repository root):

  # CIFAR-10 (TFDS; the authors report 75x compression at 23% of the FLOPs):
  python -m jaxprune.main --config configs/autoprune_vgg.py --workdir workdirs/autoprune_vgg
  # The offline CIFAR-10 subset of ../shared/data:
  python -m jaxprune.main --config configs/autoprune_vgg.py:dataset=cifar10_subset \
      --workdir workdirs/autoprune_vgg_subset
  # Reuse a dense VGG-like: --config.autoprune.init_from=<workdir>/pretrain/final
  # Smoke test on synthetic 32x32 data (a few minutes on 2 CPU cores):
  python -m jaxprune.main --config configs/autoprune_vgg.py:smoke --workdir /tmp/ap_vgg_smoke

Expected: the smoke run finishes with a report and a kept-fraction plot. The full
CIFAR-10 run (160 + 100 epochs) needs an accelerator; its hyper-parameters follow the
LeNet recipe scaled to CIFAR and were not tuned here (no full run on 2 CPU cores).
"""
from jaxprune import config_lib
from jaxprune.methods.autoprune import autoprune_config


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dataset="cifar10", surrogate="softplus", smoke=False)
  config = config_lib.base_config("autoprune")
  config.model = config_lib.model_config("vgg_like")
  config.dataset = config_lib.dataset_config(args.dataset)
  common = dict(warmup_epochs=0, batch_size=128, eval_batch_size=500, learning_rate=0.05,
                weight_decay=5e-4, nesterov=True, log_every_steps=100,
                checkpoint_every_steps=1000, eval_every_epochs=5)
  config.pretrain = config_lib.train_config(epochs=160, **common)
  config.train = config_lib.train_config(epochs=100, **{**common, "learning_rate": 0.02})
  config.autoprune = autoprune_config(prune_epochs=70, regularization=2e-5,
                                      m_learning_rate=2.0, surrogate=args.surrogate)
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.synthetic.update(num_train=128, num_test=64)
    config.report.inference_batch_size = 8
    small = dict(batch_size=32, eval_batch_size=64, log_every_steps=4, eval_every_epochs=1)
    config.pretrain.update(epochs=1, **small)
    config.train.update(epochs=2, **small)
    config.autoprune.update(prune_epochs=1, regularization=5e-2)
  return config
