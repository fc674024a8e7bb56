"""distributed.json_from_main across two real processes (jax.distributed on 127.0.0.1):
every process gets process 0's object, whatever it passed itself."""
import json
import os
import socket
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from jaxprune.engine import distributed
mine = json.loads(sys.argv[3])
print("GOT " + json.dumps(distributed.json_from_main(mine)), flush=True)
"""


@pytest.mark.slow
def test_every_process_gets_process_0s_object():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  objs = [{"keep": {"3": [0, 2, 5]}, "after": {"flops": 12345}, "note": "process 0 é"},
          {"keep": {"3": [1, 2]}, "after": {"flops": 7}}]  # another selection, another size
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, f"127.0.0.1:{port}", str(i),
                             json.dumps(objs[i])], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
           for i in range(2)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  got = [json.loads(next(l for l in o.splitlines() if l.startswith("GOT "))[4:]) for o in outs]
  assert got == [objs[0], objs[0]], outs
