"""The training engine shared by every method: mesh, state, steps, the resumable stage
loop, checkpoints, metrics, the workdir and the report."""
from jaxprune.engine.checkpoint import Checkpointer, load_variables, save_variables
from jaxprune.engine.loop import Interrupted, StageResult, run_stage
from jaxprune.engine.mesh import make_mesh
from jaxprune.engine.state import TrainState
