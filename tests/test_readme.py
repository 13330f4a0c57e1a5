"""The README's results table is generated from benchmarks/results/ and must match those files."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_table_matches_the_results_files():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_results.py"), "--check"])
    assert done.returncode == 0, "README.md's results table is stale: run python benchmarks/readme_results.py"
