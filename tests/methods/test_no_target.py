"""ISTA and AutoPrune have no FLOPs, params or latency target by design (their sparsity
decides the widths; issue 24 item 1): ``<method>.target`` is refused in one line that
says why and names the prune recipe, on the command line (where the key does not exist)
and in a config given to ``methods.run``, before any work."""
import pytest

from conftest import load_config
from jaxprune import config_lib, methods
from jaxprune.errors import UserError

CONFIGS = {"ista": "configs/ista_resnet.py", "autoprune": "configs/autoprune_lenet.py"}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cli_target_override_of_a_method_without_target_is_one_line(method):
  from jaxprune import main  # pylint: disable=g-import-not-at-top
  config = load_config(CONFIGS[method], "smoke")
  assert "target" not in config[method]
  message = main._missing_key(config, f"{method}.target")  # pylint: disable=protected-access
  assert "\n" not in message and "has no target" in message
  assert "prune.target=latency" in message and message == config_lib.no_target(
      f"{method}.target")
  # Other missing keys keep the generic message with the section's keys.
  other = main._missing_key(config, f"{method}.targets_x")  # pylint: disable=protected-access
  assert "has no target" not in other and "has no key" in other


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_run_refuses_a_target_key_before_any_work(tmp_path, method):
  config = load_config(CONFIGS[method], "smoke")
  config[method].target = "latency"
  with pytest.raises(UserError, match=f"config {method}.target: .* has no target"):
    methods.run(config, str(tmp_path))
  assert not list(tmp_path.iterdir())
  assert config_lib.no_target("prune.target") is None
