r"""Baseline LeNets on MNIST / Fashion-MNIST (the AutoPrune references).

Commands (from the repository root):

  # LeNet-5 (Caffe variant) on MNIST. With no network, build MNIST from the original files:
  python -m jaxprune.main --config configs/baseline_lenet.py:arch=lenet5 \
      --config.dataset.manual_dir=../shared/data/mnist --workdir workdirs/lenet5
  # LeNet-300-100:
  python -m jaxprune.main --config configs/baseline_lenet.py:arch=lenet300 \
      --config.dataset.manual_dir=../shared/data/mnist --workdir workdirs/lenet300
  # Fashion-MNIST: add dataset=fashion_mnist (and its own manual_dir offline).
  # Smoke test on synthetic 28x28 data:
  python -m jaxprune.main --config configs/baseline_lenet.py:smoke --workdir /tmp/lenet_smoke

Expected results (MNIST, 2 CPU cores): LeNet-5 (20 epochs, lr 0.01) >= 99.0% test accuracy;
LeNet-300-100 (30 epochs, lr 0.05) about 98.5% in under a minute.
"""
from jaxprune import config_lib

# arch argument -> (model name, learning rate, epochs). LeNet-5 diverges above lr ~0.02.
ARCHS = {"lenet5": ("lenet5", 0.01, 20), "lenet300": ("lenet300_100", 0.05, 30)}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, arch="lenet5", dataset="mnist", epochs=0, smoke=False)
  if args.arch not in ARCHS:
    raise config_lib.UserError(f"arch={args.arch!r}: choose one of {', '.join(ARCHS)}.")
  config = config_lib.base_config("baseline")
  model, learning_rate, epochs = ARCHS[args.arch]
  config.model = config_lib.model_config(model)
  config.dataset = config_lib.dataset_config(args.dataset)
  config.dataset.augment = "none"
  config.train = config_lib.train_config(
      epochs=args.epochs or epochs, warmup_epochs=0, batch_size=128, eval_batch_size=1000,
      learning_rate=learning_rate, weight_decay=5e-4, nesterov=True, log_every_steps=100,
      checkpoint_every_steps=1000)
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.augment = "none"
    config.dataset.synthetic.image_shape = (28, 28, 1)
    config.train.update(epochs=2, batch_size=64, eval_batch_size=256, log_every_steps=8)
  return config
