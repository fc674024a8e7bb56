"""The training engine shared by every method.

mesh (devices, shardings) -> state (the train-state pytree) -> steps (jitted train
and eval steps) -> loop (a resumable stage) with checkpoint (orbax), metrics
(jsonl, TensorBoard, progress) and report (report.json/md, measured inference).
"""
from jaxprune.engine.checkpoint import Checkpointer, load_variables, save_variables
from jaxprune.engine.loop import Interrupted, StageResult, run_stage, train_classifier
from jaxprune.engine.mesh import make_mesh
from jaxprune.engine.state import TrainState
