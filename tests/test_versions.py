"""The tested versions are stated once (tram_dist/versions.py) and pyproject's test extra pins them."""
from __future__ import annotations

import os
import re

from tram_dist.versions import TESTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_and_makefile_state_the_tested_versions():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    for package, version in TESTED.items():
        assert f"{package} {version}" in text, package  # stated in the comment
        if package != "torch":  # the Makefile installs torch (TORCH ?= torch==2.13.0)
            assert re.search(rf'"{package}=={re.escape(version)}"', text), package
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert f"torch=={TESTED['torch']}" in f.read()
