"""PyPI's torchvision beside a CPU torch: importing kscu first makes it (and diffusers) import."""

import importlib.util
import os
import subprocess
import sys

import pytest


@pytest.fixture
def torchvision_installed():
    if importlib.util.find_spec("torchvision") is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it with the dev extras
            pytest.fail("CI=true but torchvision is not installed")
        pytest.skip("torchvision is not installed here (pip install 'kscu[eval]')")


def test_torchvision_models_import(torchvision_installed):
    from kscu.torchvision_compat import ensure_torchvision

    assert ensure_torchvision()
    from torchvision.models.inception import InceptionA

    assert InceptionA(8, pool_features=4) is not None


def test_importing_kscu_first_keeps_diffusers_and_transformers_working(torchvision_installed):
    """transformers and diffusers import torchvision when it is installed; kscu makes that work."""
    code = (
        "import kscu\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from transformers import CLIPImageProcessor\n"
        "import torchvision.transforms\n"
        "print(CLIPImageProcessor().crop_size)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
