r"""TAS: search the widths and depths of a CIFAR or ImageNet ResNet for a FLOPs target, then
retrain it.

Pipeline (docs/methods/tas.md): teacher (the unpruned ResNet, 300 + 5 epochs) -> search
(600 epochs on a per-class 50/50 split, weights SGD / architecture Adam, tau cosine 5 -> 0.1,
code cost loss with tolerance 0.05, lambda_cost 2) -> derive (argmax of the last epoch,
architecture.json) -> retrain from scratch with KD from the teacher (a = 0.9, T = 4, 300 + 5
epochs) -> report.md/json and plots/.

Commands (from the repository root):

  # The embedded default: the whole pipeline on synthetic data; 72-101 s on 2 quiet CPU
  # cores, about 7.5 min when other jobs share them (load 7-12; docs/results.md).
  python -m jaxprune.main --config configs/tas_resnet.py:smoke --workdir /tmp/tas_smoke
  # ResNet-56 on CIFAR-100 at the authors' 0.47 FLOPs target (TFDS downloads CIFAR-100):
  python -m jaxprune.main --config configs/tas_resnet.py:depth=56,dataset=cifar100,ratio=0.47 \
      --workdir workdirs/tas_r56_c100
  # Without knowledge distillation (the users' no-KD baseline):
  python -m jaxprune.main --config configs/tas_resnet.py:depth=110,kd=false --workdir ...
  # Paper variants: --config.tas.cost_mode=paper --config.tas.tau_schedule=linear
  #   --config.tas.tau_max=10
  # Reuse a trained baseline as the teacher: --config.tas.teacher_dir=<baseline workdir>/baseline/final
  # Derive from the best in-band epoch instead of the last: --config.tas.derive_epoch=best
  # Search and derive only (architecture.json; no teacher, no retraining):
  #   --config.tas.search_only=true
  # Price widths by their measured latency on this device instead of FLOPs (the graph
  # space; a per-op table timed once, ~20 s for a ResNet-56 at batch 128 on 2 CPU cores):
  #   --config.tas.cost=latency
  # Retrain a shape the authors released (no search), e.g. their CIFAR-10 ResNet-56:
  python -m jaxprune.main --config configs/tas_resnet.py:depth=56,shape=C010-ResNet56 \
      --workdir workdirs/tas_r56_released   # the shapes ship with jaxprune (resources/)
  # Your own Linen or NNX model (a factory on PYTHONPATH; the graph search space, one width
  # per channel group, candidates rounded to multiples of 8; the smoke's short search says
  # it ends outside the cost band and derives from its last epoch):
  PYTHONPATH=tests python -m jaxprune.main --config configs/tas_resnet.py:smoke \
      --config.model.name=user_models:nnx_cnn "--config.model.kwargs={'spatial': 16}" \
      --config.tas.round_to=8 --workdir /tmp/tas_user
  # ImageNet ResNet-18 (or depth=50) in the dedicated ImageNet search space (TFDS
  # imagenet2012 needs its manual download: --config.dataset.manual_dir=...):
  python -m jaxprune.main --config configs/tas_resnet.py:dataset=imagenet2012,depth=18 \
      --workdir workdirs/tas_r18_in
  # ... and its whole pipeline on synthetic 224x224 images (104 s on 2 CPU cores; derived
  # net 838M FLOPs, 0.46 of 1.81G, measured 1.86x faster than the base at batch 8):
  python -m jaxprune.main --config configs/tas_resnet.py:dataset=imagenet2012,smoke \
      --workdir /tmp/tas_in_smoke
  # Offline on the CIFAR-10 subset in ../shared/data (this machine's offline data, 4000/1000
  # images); epochs=E shortens the schedule to E teacher / 2E search / E retrain epochs:
  python -m jaxprune.main --config configs/tas_resnet.py:dataset=cifar10_subset,epochs=15 \
      --workdir workdirs/tas_subset

Expected (the paper, CIFAR-100 ResNet-56 at 0.47): 72.25% top-1 with KD at about 59M FLOPs
(52.7% reduction). Full runs take GPU hours (the authors: 3.83 h search for ResNet-32 on a V100).
The smoke run only shows the pipeline working: a derived network inside the FLOPs band and a
report with base vs derived numbers.

Measured on the CIFAR-10 subset, `dataset=cifar10_subset,epochs=15` (ResNet-20, 2 shared CPU
cores, 77 min wall): teacher 52.0%, derived 46.2% with KD, 15.86M FLOPs (0.39 of 40.81M),
70k params (0.26). 30 search epochs are 210 architecture steps: the logits barely leave their
initial values, and the argmax FLOPs swing between 15.9M and 19.9M from epoch to epoch around
the band [17.1M, 19.2M]; the last epoch fell below it. For short searches add
`--config.tas.derive_epoch=best` (the best in-band epoch).
"""
from jaxprune import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, depth=0, dataset="cifar10", ratio=0.47, kd=True,
                              shape="", epochs=0, smoke=False)
  imagenet = args.dataset == "imagenet2012"
  depth = args.depth or (18 if imagenet else 20)
  config = config_lib.base_config("tas")
  # ImageNet: the torchvision-layout ResNets and their dedicated TASResNet search space.
  config.model = config_lib.model_config("imagenet_resnet" if imagenet else "cifar_resnet",
                                         depth=depth)
  config.dataset = config_lib.dataset_config(args.dataset)
  config.teacher = config_lib.train_config()  # the unpruned network, full training set
  config.train = config_lib.train_config()    # retraining the derived network (§7)
  config.kd = dict(enabled=args.kd, alpha=0.9, temperature=4.0)
  config.tas = config_lib.train_config(epochs=600, warmup_epochs=0, batch_size=256)
  config.tas.update(dict(
      # space: "resnet" = the dedicated TASResNet supernet (per-conv widths, per-candidate
      # BN, depth search), "graph" = any model's channel groups (jaxprune.search), "auto":
      # resnet for cifar_resnet and imagenet_resnet, graph otherwise
      # (--config.model.name=mod:fn). round_to: widths a multiple of this (both spaces
      # round their width candidates up to it, so the band holds for the derived network);
      # 0 = the backend's default for the model, jaxprune.engine.runtime.default_round_to():
      # on a CPU 8, or 16 for a model of dense convs on an AVX-512 CPU at XLA's stock conv
      # settings (the smoke's ResNet-20 on this machine), where such widths run faster for
      # the same FLOPs; 1 = the reference's widths.
      # depth: the graph space also searches the depth of every stage of skippable
      # residual blocks it finds (x + f(x), each block a module of its own).
      space="auto", round_to=0, depth=True,
      teacher_dir="", split_seed=0, num_picks=2, derive_epoch="last", search_only=False,
      released_shape=args.shape, released_shapes_file="",  # "": the package's copy
      arch_learning_rate=1e-3, arch_beta1=0.5, arch_beta2=0.999, arch_weight_decay=1e-3,
      tau_max=5.0, tau_min=0.1, tau_schedule="cosine",
      ratio=args.ratio, tolerance=0.05, cost_mode="code", lambda_cost=2.0,
      # cost: "flops" (the reference) or "latency": the cost loss uses a per-op latency
      # table measured once on this run's device (cached in <workdir>/search/; needs the
      # graph space, which "auto" then picks); ratio is then a fraction of the full
      # network's table latency. latency_batch: the batch the table is timed at (the
      # report's inference batch; set both to change both). remeasure_latency: a search
      # with progress keeps its table; true measures again and restarts the search when
      # the table was measured for another setting (e.g. resumed on another machine).
      cost="flops", latency_batch=config.report.inference_batch_size,
      remeasure_latency=False))
  if imagenet:
    # The reference's ImageNet search options (tas.md §6): 115 + 5 warm-up epochs, weight
    # decay 1e-4 (the arch optimizer as on CIFAR). It gives no ImageNet teacher or
    # retraining recipe; jaxprune uses the same schedule for both.
    for section in (config.teacher, config.train, config.tas):
      section.update(epochs=115, warmup_epochs=5, weight_decay=1e-4)
  if args.epochs:
    # A shortened schedule (same 1:2:1 teacher:search:retrain proportions, 1 warm-up epoch).
    if args.epochs < 2:
      raise config_lib.UserError(f"epochs={args.epochs}: use at least 2 (or 0 for the "
                                 "reference's 300/600/300).")
    config.teacher.update(epochs=args.epochs, warmup_epochs=1)
    config.train.update(epochs=args.epochs, warmup_epochs=1)
    config.tas.update(epochs=2 * args.epochs)
  if args.smoke and imagenet:
    # The whole pipeline on synthetic ImageNet-shaped images (224x224x3) in 8 classes
    # (the search splits every class 50/50, so 1000 classes would need thousands of
    # images): a few batches per stage, to show it runs.
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.synthetic.update(num_train=64, num_test=16, image_shape=(224, 224, 3),
                                    num_classes=8)
    small = dict(warmup_epochs=0, batch_size=8, eval_batch_size=16, log_every_steps=2,
                 checkpoint_every_steps=1000)
    config.teacher.update(epochs=1, **small)
    config.train.update(epochs=1, **small)
    config.tas.update(epochs=2, derive_epoch="best", **small)
    config.report.inference_batch_size = config.tas.latency_batch = 8
  elif args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.synthetic.update(num_train=2048, num_test=256, image_shape=(16, 16, 3))
    small = dict(warmup_epochs=0, batch_size=64, eval_batch_size=256, log_every_steps=8,
                 checkpoint_every_steps=32)
    config.teacher.update(epochs=3, **small)
    config.train.update(epochs=3, **small)
    # 90 architecture steps barely move the logits: the argmax FLOPs of the last
    # epoch are a coin flip around the band, so the smoke derives from the best
    # in-band epoch (the last one if none is in the band).
    config.tas.update(epochs=6, derive_epoch="best", **small)
  return config
