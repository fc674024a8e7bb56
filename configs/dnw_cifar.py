r"""DNW tiny neural graphs on CIFAR-10 (Wortsman et al., NeurIPS 2019; docs/methods/dnw.md §2).

Commands (from the repository root):

  # The reference recipe (160 epochs, batch 512, lr 0.1 x0.1 at epochs 80 and 120,
  # momentum 0.9, wd 1e-4); TFDS downloads CIFAR-10. variant: static|discrete|continuous.
  python -m jaxprune.main --config configs/dnw_cifar.py:variant=static --workdir workdirs/dnw_static
  # The random-graph baseline with the same edge budget (32,000 edges):
  python -m jaxprune.main --config configs/dnw_cifar.py:variant=static,graph=random \
      --workdir workdirs/dnw_static_random
  # Offline, on the CIFAR-10 subset beside the repository (4000/1000 images, batch 128):
  python -m jaxprune.main --config configs/dnw_cifar.py:dataset=cifar10_subset,epochs=8 \
      --workdir /tmp/dnw/subset_static_dnw   # and graph=random for the baseline
  # Both graphs in one run, scored on the same test images (DNW minus random, with its
  # standard error): baseline=random (it doubles the training time).
  python -m jaxprune.main --config configs/dnw_cifar.py:dataset=cifar10_subset,epochs=8,baseline=random \
      --workdir /tmp/dnw/subset_vs_random
  # Smoke test on synthetic CIFAR-shaped data (about 30 s on 2 quiet CPU cores; the
  # continuous variant's smoke uses a 64-node graph):
  python -m jaxprune.main --config configs/dnw_cifar.py:smoke --workdir /tmp/dnw_smoke

Expected results (reference README, full CIFAR-10, 160 epochs): random graph vs DNW
static 76.1 vs 80.9%, discrete 77.3 vs 82.3%, continuous 78.5 vs 83.1%. On the subset,
8 epochs (4.4 min per static run on 2 quiet CPU cores, 2026-12-06): DNW 44.9% vs random 47.8%
(seed 0; the code of 2026-11-21 gave 47.7% vs 47.2%, and 45.5% vs 44.1% at seed 1: 8 epochs on
4k images cannot rank them; docs/results.md, DNW). On the Intel Xeon (2026-12-07,
baseline=random): DNW 46.3% vs random 47.2%, DNW minus random -0.9 points, standard
error 1.3. Each run writes wiring.json, plots/dnw_wiring.png and report.md (FLOPs executed
after dead-node removal next to the dense-masked FLOPs).
"""
import ml_collections

from jaxprune import config_lib

VARIANTS = {"static": "dnw_static", "discrete": "dnw_discrete",
            "continuous": "dnw_continuous"}
GRAPHS = ("dnw", "random", "complete")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="static", graph="dnw", dataset="cifar10",
                              epochs=160, baseline="none", smoke=False)
  if args.variant not in VARIANTS:
    raise config_lib.UserError(f"variant={args.variant!r}: choose one of "
                               f"{', '.join(VARIANTS)}.")
  if args.graph not in GRAPHS:
    raise config_lib.UserError(f"graph={args.graph!r}: choose one of {', '.join(GRAPHS)}.")
  config = config_lib.base_config("dnw")
  config.model = config_lib.model_config(VARIANTS[args.variant], graph=args.graph, prune_rate=0.95)
  # "random": also train the random graph of the same edge budget (same recipe and seed)
  # and report DNW minus it on the same test images, with its standard error.
  config.dnw = ml_collections.ConfigDict({"baseline": args.baseline})
  # Step schedule x0.1 at 1/2 and 3/4 of training (epochs 80 and 120 of 160).
  config.train = config_lib.train_config(
      epochs=args.epochs, warmup_epochs=0, batch_size=512, eval_batch_size=500,
      learning_rate=0.1, schedule="step", decay_epochs=(args.epochs // 2,
                                                        3 * args.epochs // 4),
      momentum=0.9, nesterov=False, weight_decay=1e-4, log_every_steps=50,
      checkpoint_every_steps=500)
  config.dataset = config_lib.dataset_config(args.dataset)
  if args.dataset == "cifar10_subset":
    config.dataset.augment = "cifar"
    config.train.batch_size = 128
    config.train.log_every_steps = 31
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.synthetic.num_train = 512
    config.dataset.synthetic.num_test = 256
    config.train.update(epochs=2, batch_size=64, eval_batch_size=128, decay_epochs=(1,),
                        log_every_steps=4, checkpoint_every_steps=8)
    config.report.inference_batch_size = 32
    if args.variant == "continuous":
      # An ODE solve over 800 nodes costs tens of graph evaluations per step (>15 min for
      # 4 steps on 2 CPU cores): the smoke run checks the pipeline on 64 nodes.
      config.model.update(nodes=64, stem_width=16, num_outputs=16)
  return config
