"""docs/transformers.md's example runs as written and prints what the page shows."""
import re

import pytest

from conftest import REPO


@pytest.mark.slow
def test_transformers_example_runs_and_prints_what_the_page_shows(capsys):
  text = (REPO / "docs" / "transformers.md").read_text()
  (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
  shown = re.findall(r"It prints\n\n```\n(.*?)```", text, re.S)[0].strip().splitlines()
  exec(compile(code, "docs/transformers.md", "exec"), {"__name__": "docs_example"})
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == len(shown)
  for got, want in zip(out, shown):
    if "<file>" in want:  # the source location of the RMSNorm call
      got = re.sub(r"at \S+:(\d+:\d+)", r"at <file>:\1", got)
    assert got == want
