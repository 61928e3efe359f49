"""The suite catches every planted bug of python_tests/mutants.py (each mutant against the test
files that must catch it)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_planted_bug_is_caught():
    r = subprocess.run([sys.executable, os.path.join(HERE, "mutants.py")], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.count(": CAUGHT") >= 9, r.stdout
