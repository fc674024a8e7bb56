"""The README's "Your own model" examples run as written."""
import re

from conftest import REPO


def _section_code(title):
  text = (REPO / "README.md").read_text()
  section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_your_own_model_examples_run(capsys):
  blocks = _section_code("Your own model")
  assert len(blocks) == 3
  for code in blocks:
    exec(compile(code, "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "{'flops': 5644298, 'params': 60458}" in out
  assert "16 4096" in out
  assert "['bn0/scale']" in out
  assert "{'conv0': 24} ['head/kernel']" in out  # the printed comments are what runs
  assert ("['Conv_0', 'Block_0/Conv_0', 'Block_1/Conv_0', 'Block_2/Conv_0', 'Conv_1']"
          in out)
  assert "['Block_0..Block_2'] [(1, 2, 3)]" in out
  assert out.rstrip().endswith("True")
