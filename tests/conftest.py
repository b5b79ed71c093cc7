import sys
from pathlib import Path

# Test folders are not packages: shared helpers at this level (hf_fixtures) are imported by plain name.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
