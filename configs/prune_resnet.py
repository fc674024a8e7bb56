r"""Criterion pruning of a trained CIFAR ResNet to a FLOPs target, then fine-tuning.

The Torch-Pruning-style baseline every structured-pruning method is compared with:
train (or load) the dense ResNet, score every channel group of its dependency graph
(jaxprune.graph) by a criterion (L1 by default), remove the lowest channels until the
network has ``ratio`` of the dense FLOPs (every group the same share; ``global`` ranks
across groups), fine-tune, and train the same architecture from scratch as the control.

Commands (from the repository root):

  # CIFAR-10 ResNet-56, L1 to 50% FLOPs, one shot; TFDS downloads CIFAR-10.
  python -m jaxprune.main --config configs/prune_resnet.py:depth=56 --workdir workdirs/p56
  # Iterative (5 prune + fine-tune steps), global ranking, widths multiples of 16 (default
  # round_to=0: the backend's multiple for the model, 8 or 16 on a CPU; round_to=1: any width):
  python -m jaxprune.main --config configs/prune_resnet.py:depth=56,steps=5,global,round_to=16 \
      --workdir workdirs/p56_iter
  # From a finished baseline run instead of training one:
  python -m jaxprune.main --config configs/prune_resnet.py \
      --config.prune.init_from=workdirs/r20/baseline/final --workdir workdirs/p20
  # Twice as fast on this device (a per-op latency table, measured once, cached in the
  # workdir's latency/ directory; the report gives its predicted speed-up and the measured one):
  python -m jaxprune.main --config configs/prune_resnet.py:depth=56,target=latency \
      --config.prune.ratio=0.5 --workdir workdirs/p56_latency
  # ... removing whole residual blocks too (what buys time at batch 1; surgery.prune_to's
  # depth=True; every stage keeps its first block):
  python -m jaxprune.main --config configs/prune_resnet.py:depth=56,target=latency \
      --config.prune.depth=true --config.report.inference_batch_size=1 --workdir workdirs/p56_blocks
  # Offline, on the CIFAR-10 subset (4000/1000 images) beside the repository:
  python -m jaxprune.main --config configs/prune_resnet.py:dataset=cifar10_subset \
      --workdir workdirs/p20_subset
  # Smoke test on synthetic data, about 2 minutes on 2 CPU cores:
  python -m jaxprune.main --config configs/prune_resnet.py:smoke --workdir /tmp/jaxprune_prune

Expected results: see docs/results.md, "The prune recipe", for the measured CIFAR-10 subset
run (dense vs L1-pruned vs the same architecture from scratch). The smoke run writes
report.md with the pruned network at <= 50% of the dense FLOPs.
"""
import ml_collections

from jaxprune import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, depth=20, dataset="cifar10", ratio=0.5, criterion="l1",
                              steps=1, round_to=0, epochs=160, finetune_epochs=40,
                              target="flops", smoke=False, **{"global": False})
  config = config_lib.base_config("prune")
  config.model = config_lib.model_config("cifar_resnet", depth=args.depth)
  config.dataset = config_lib.dataset_config(args.dataset)
  config.train = config_lib.train_config(epochs=args.epochs)
  # Fine-tuning: a short cosine schedule from a lower peak (the kept weights are trained).
  config.finetune = config_lib.train_config(epochs=args.finetune_epochs, learning_rate=0.01,
                                            warmup_epochs=0)
  config.scratch = config_lib.train_config(epochs=args.epochs + args.finetune_epochs)
  config.prune = ml_collections.ConfigDict({
      "criterion": args.criterion,       # l1 | l2 | bn_scale | taylor (one batch) | random
      "target": args.target,             # flops | params | latency (this device's)
      "latency_batch": 0,                # latency table's batch (0: report's inference batch)
      "latency_grid": 8,                 # latency-table candidate widths per group
      "calibrate": True,                 # latency: time the whole network, tighten to meet
      "calibration_rounds": 4,           # latency: most selections timed per step
      "depth": False,                    # latency: also remove whole residual blocks
      "ratio": args.ratio,               # kept share of the dense network's target
      "steps": args.steps,               # prune + fine-tune rounds (1: one shot)
      "global_ranking": args["global"],
      "round_to": args.round_to,         # kept widths a multiple of this (0: the backend's,
                                         # 8 or 16 on a CPU; a group not wider whole while
                                         # the target allows, else at a finer multiple)
      "ignore": (),                      # leaf-path patterns of groups to keep whole
      "init_from": "",                   # variables of a trained dense network
      "scratch_comparison": True,
  })
  if args.dataset == "cifar10_subset":
    for section in (config.train, config.finetune, config.scratch):
      section.update(batch_size=128, eval_batch_size=500)
    config.train.update(epochs=30, warmup_epochs=1)
    config.finetune.update(epochs=15)
    config.scratch.update(epochs=45, warmup_epochs=1)
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.synthetic.update(num_train=512, num_test=256)
    small = dict(batch_size=64, eval_batch_size=256, warmup_epochs=0, log_every_steps=4,
                 checkpoint_every_steps=16)
    config.train.update(epochs=2, **small)
    config.finetune.update(epochs=1, **small)
    config.scratch.update(epochs=1, **small)
    config.report.inference_batch_size = 16
  return config
