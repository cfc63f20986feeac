"""The README's first command: `python -m src demo` starts a worker on the tiny model and the RL
loop raises the reward."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import REPO


def test_demo_reward_rises(tmp_path):
    env = {**os.environ, "TINK_HOME": str(tmp_path / "home"), "TINKER_TELEMETRY": "0"}
    env.pop("TINKER_BASE_URL", None)
    done = subprocess.run([sys.executable, "-m", "src", "demo", "--steps", "15"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, last = map(float, re.search(r"first 3 steps ([\d.]+) -> last 3 steps ([\d.]+)", done.stdout).groups())
    assert last > first + 0.3
