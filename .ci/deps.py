"""pyproject's requirements for CI's install lines, one per line: `pip install $(python .ci/deps.py ...)`.

--floors: the declared lower bounds, pinned (a>=1.2 -> a==1.2), for dependencies and the test extra. torch is left
out: only one build is on these machines' disk. --no-torch: the newest of everything that runs without torch, for
the extraction check on Pythons that have no torch build here.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
NEEDS_TORCH = {"torch", "timm", "transformers", "tensorboard"}  # tensorboard: only torch's writer uses it
NEEDS_TORCH |= {"s3fs", "moto", "webdataset"}  # only tests/test_store.py uses them, and it pretrains
for req in requirements:
    name, extras, floor = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(?:>=\s*([^,\s]+))?", req).groups()
    if name in NEEDS_TORCH and "--no-torch" in sys.argv or name == "torch" and "--floors" in sys.argv:
        continue
    if "--floors" in sys.argv:
        assert floor, f"{req}: a requirement without a lower bound has no floor to test"
        print(f"{name}{extras or ''}=={floor}")
    else:
        print(f"{name}{extras or ''}")
