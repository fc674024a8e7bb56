r"""DNW MobileNetV1-like network on ImageNet (Wortsman et al., 2019; docs/methods/dnw.md §2).

Each block is one DAG over all its layers' channels; its edge count equals the
pointwise edges of MobileNetV1 x width in that block, (in*out + (L-1)*out^2) * width^2.

Commands (from the repository root):

  # The reference recipe: 250 epochs, batch 512, cosine lr 0.1, wd 5e-5, momentum 0.9.
  # ImageNet needs the TFDS manual download (the two ILSVRC2012 tars in manual_dir).
  python -m jaxprune.main --config configs/dnw_mobilenet.py:width=0.225 \
      --config.dataset.manual_dir=/data/imagenet --workdir workdirs/dnw_mbv1_x225
  # width in {0.225, 0.3, 0.49}; graph=random for the random-graph baseline.
  # Smoke test on small synthetic 32x32 inputs (a couple of minutes on 2 CPU cores):
  python -m jaxprune.main --config configs/dnw_mobilenet.py:smoke --workdir /tmp/dnw_mbv1_smoke

Expected results (reference README): x0.225 42.1M FLOPs 60.9% top-1; x0.49 154M FLOPs
70.4% top-1 (MobileNetV1 x0.25: 41M, 50.6%; x0.5: 149M, 63.7%). Wall time: days on one
GPU; not run here. The smoke run only checks that the pipeline runs end to end.
"""
import ml_collections

from jaxprune import config_lib

WIDTHS = (0.225, 0.3, 0.49)


def get_config(arg=None):
  args = config_lib.parse_arg(arg, width=0.225, graph="dnw", epochs=250, baseline="none",
                              smoke=False)
  if args.width not in WIDTHS:
    raise config_lib.UserError(f"width={args.width}: choose one of "
                               f"{', '.join(map(str, WIDTHS))}.")
  if args.graph not in ("dnw", "random", "complete"):
    raise config_lib.UserError(f"graph={args.graph!r}: choose dnw, random or complete.")
  config = config_lib.base_config("dnw")
  config.model = config_lib.model_config("dnw_mobilenet", width=args.width, graph=args.graph)
  # "random": also the random graph of the same edge budget, scored on the same images.
  config.dnw = ml_collections.ConfigDict({"baseline": args.baseline})
  config.dataset = config_lib.dataset_config("imagenet2012")
  config.train = config_lib.train_config(
      epochs=args.epochs, warmup_epochs=0, batch_size=512, eval_batch_size=500,
      learning_rate=0.1, schedule="cosine", momentum=0.9, nesterov=False,
      weight_decay=5e-5, log_every_steps=100, checkpoint_every_steps=2000)
  if args.smoke:
    config.dataset = config_lib.dataset_config("synthetic")
    config.dataset.synthetic.num_train = 128
    config.dataset.synthetic.num_test = 64
    config.dataset.synthetic.image_shape = (32, 32, 3)
    config.train.update(epochs=1, batch_size=32, eval_batch_size=64, log_every_steps=2,
                        checkpoint_every_steps=4)
    config.report.inference_batch_size = 16
  return config
