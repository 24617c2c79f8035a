# Make `import train_gpt` work from the tests (the repository root is not a package).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
