"""The GPU recipes in scripts/device: each is valid bash and listed in run.sh's usage header with a
line that says what it runs, so a device call (minutes of a limited budget) does not fail on a
typo or an unknown name."""

import re
import subprocess
from pathlib import Path

DEVICE = Path(__file__).resolve().parents[2] / "scripts" / "device"


def test_every_recipe_parses_and_is_listed():
    header = (DEVICE / "run.sh").read_text().split("set -u")[0]
    listed = set(re.findall(r"^#   ([a-z0-9-]+) ", header, flags=re.M))
    recipes = {p.stem for p in DEVICE.glob("*.sh")} - {"run", "env"}
    assert recipes == listed, (recipes - listed, listed - recipes)
    for path in DEVICE.glob("*.sh"):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (path.name, proc.stderr)
    # the usage printout (sed -n '2,Np') covers the whole header
    last = int(re.search(r"sed -n '2,(\d+)p'", (DEVICE / "run.sh").read_text()).group(1))
    assert last == header.rstrip("\n").count("\n") + 1
