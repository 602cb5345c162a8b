import sys
from pathlib import Path

# the examples are scripts, not a package: make them importable for the tests that run them
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
