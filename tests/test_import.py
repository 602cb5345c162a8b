"""Importing vinn stays light: no torchvision, scikit-learn or matplotlib."""

import subprocess
import sys


def test_import_is_light():
    code = "import sys, vinn; print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'sklearn', 'matplotlib'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
