"""An inference timer that runs out of device memory: one line; the report's names the key."""
import numpy as np
import pytest

from jaxprune import latency
from jaxprune.engine import report
from jaxprune.errors import UserError


class _Exhausted:
  """A model whose forward fails as XLA does when a buffer does not fit."""

  def apply(self, variables, x, train=False):
    del variables, x, train
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes.")


class _Broken(_Exhausted):
  def apply(self, variables, x, train=False):
    raise RuntimeError("a bug in the model")


@pytest.mark.parametrize("timer", ["measure_inference", "compare_inference"])
def test_out_of_memory_is_one_line_and_only_the_report_names_the_config_key(timer):
  batch = int(np.random.default_rng().integers(2, 64))
  def call(module):
    fn = getattr(module, timer)
    if timer == "measure_inference":
      return fn(_Exhausted(), {}, (4,), batch, repeats=1)
    return fn({"a": (_Exhausted(), {})}, (4,), batch, rounds=1)
  with pytest.raises(latency.OutOfMemory) as lib:
    call(latency)
  assert lib.value.batch_size == batch and f"batch {batch}" in str(lib.value)
  assert "config" not in str(lib.value) and "\n" not in str(lib.value)
  with pytest.raises(UserError) as rep:
    call(report)
  assert f"batch {batch}" in str(rep.value) and "\n" not in str(rep.value)
  assert "--config.report.inference_batch_size" in str(rep.value)


def test_another_failure_is_not_reported_as_out_of_memory():
  with pytest.raises(RuntimeError, match="a bug in the model"):
    report.measure_inference(_Broken(), {}, (4,), 2, repeats=1)
