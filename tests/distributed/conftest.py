import sys
from pathlib import Path

# Test folders are not packages: this lets every test here `from _spawn import run_distributed`, and spawned
# ranks inherit the parent's sys.path, so they can import the test module that holds their function.
_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
