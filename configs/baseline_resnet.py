r"""Baseline CIFAR ResNet: the unpruned network that methods compare against and distil from.

Commands (from the repository root):

  # CIFAR-10 ResNet-20, the reference's retraining recipe (300 + 5 warm-up epochs,
  # SGD Nesterov 0.9, lr 0.1 cosine, wd 5e-4, batch 256). TFDS downloads CIFAR-10.
  python -m jaxprune.main --config configs/baseline_resnet.py --workdir workdirs/r20
  # Other depths / CIFAR-100: depth in {20, 32, 56, 110, 164}.
  python -m jaxprune.main --config configs/baseline_resnet.py:depth=56,dataset=cifar100 \
      --workdir workdirs/r56_c100
  # Offline, on the CIFAR-10 subset (4000/1000 images) shipped beside the repository:
  python -m jaxprune.main --config configs/baseline_resnet.py:dataset=cifar10_subset,epochs=30 \
      --workdir workdirs/r20_subset
  # Smoke test: synthetic CIFAR-shaped data generated in-process, under 3 minutes on 2 CPU cores.
  python -m jaxprune.main --config configs/baseline_resnet.py:smoke --workdir /tmp/jaxprune_smoke

Expected results: ResNet-20 on CIFAR-10 about 92% test accuracy (40.81M FLOPs, 0.27M params);
ResNet-56 about 93-94%. Wall time on one modern GPU: about an hour for ResNet-20. The smoke
run reaches well above chance (10%) on its synthetic data and writes report.md.
"""
from jaxprune import config_lib



def get_config(arg=None):
  args = config_lib.parse_arg(arg, depth=20, dataset="cifar10", epochs=300, smoke=False)
  config = config_lib.base_config("baseline")
  config.model = config_lib.model_config("cifar_resnet", depth=args.depth)
  config.train = config_lib.train_config(epochs=args.epochs)
  config.dataset = config_lib.dataset_config(args.dataset)
  if args.dataset == "cifar10_subset":
    config.train.batch_size = 128
    config.train.warmup_epochs = 1
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.train.update(epochs=4, warmup_epochs=0, batch_size=64, eval_batch_size=256,
                        log_every_steps=8, checkpoint_every_steps=32)
  return config
