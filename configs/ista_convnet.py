r"""ISTA on batch-norm gamma for the 4-layer CIFAR ConvNet of the paper, then channel surgery.

The ConvNet (docs/methods/ista.md §5): conv5x5-96, conv5x5-192, conv3x3-192 (each with BN,
ReLU, 2x2 max pool), fc-384, classifier (jaxprune.models.convnet). All three conv BNs are
sparsified with the memory-priority rho_l of §2; the fc layer has no BN. The reference gives
no separate schedule for this network, so the stages follow the ResNet recipe: warmup
(lambda 0.001, 30k steps) -> sparsify (lambda 0.005, 50k steps) -> prune -> finetune
(lambda 0, lr 0.01, 50k steps); SGD without momentum, lr 0.1, weight decay 5e-4 on conv
kernels.

Commands (from the repository root):

  # Smoke test: synthetic data, tiny stages and widths, about 1-2 minutes on 2 CPU cores.
  python -m jaxprune.main --config configs/ista_convnet.py:smoke --workdir /tmp/ista_cnn_smoke
  # CIFAR-10 (TFDS downloads it); GPU hours:
  python -m jaxprune.main --config configs/ista_convnet.py --workdir workdirs/ista_convnet
  # With a dense ConvNet narrowed to the pruned parameter count, trained from scratch for
  # the same number of steps (the reviewer's question):
  python -m jaxprune.main --config configs/ista_convnet.py:dense --workdir workdirs/ista_cnn_d
  # Offline on the CIFAR-10 subset (short schedule, larger lambdas as configs/ista_resnet.py):
  python -m jaxprune.main --config configs/ista_convnet.py:dataset=cifar10_subset \
      --workdir /tmp/ista_cnn_subset
  # Fashion-MNIST (28x28x1) built offline from ../shared/data:
  python -m jaxprune.main --config configs/ista_convnet.py:dataset=fashion_mnist \
      --config.dataset.manual_dir=../shared/data/fashion-mnist \
      --config.dataset.data_dir=/tmp/tfds_fashion_mnist --workdir /tmp/ista_cnn_fmnist

Expected: on CIFAR-10 the paper reports the ConvNet losing channels in every conv layer
with accuracy close to the unpruned one; the smoke run only shows the pipeline working
(a report with base / pruned / fine-tuned rows and the equivalence check).
"""
import importlib.util
import os

from jaxprune import config_lib


def _resnet_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ista_resnet.py")
  spec = importlib.util.spec_from_file_location("_ista_resnet_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dataset="cifar10", dense=False, rho="memory", smoke=False)
  base = _resnet_config()
  dataset = "cifar10" if args.dataset == "fashion_mnist" else args.dataset
  config = base.get_config(f"dataset={dataset},dense={args.dense},rho={args.rho},"
                           f"smoke={args.smoke}")
  config.model = config_lib.model_config("convnet", features=(96, 192, 192), kernels=(5, 5, 3),
                      hidden=(384,))
  if args.dataset == "fashion_mnist":
    config.dataset = config_lib.dataset_config("fashion_mnist")
  if args.smoke:
    config.model.features = (24, 32, 32)
    config.model.hidden = (64,)
  return config
