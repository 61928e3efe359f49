"""Plants plausible bugs one at a time into a copy of the package and checks that the test suite
catches each (a test fails). Re-run it after changing tests to see that they still pin what
they claim.

    python python_tests/mutants.py              # every mutant, its targeted test files
    python python_tests/mutants.py --all        # every mutant against the whole suite (slow)
    python python_tests/mutants.py gate_alpha   # named mutants only

Each mutant is an exact text replacement in one file of tubevit_ext/ (the script fails if the
text is not there, so a refactor cannot silently retire a mutant). The copy, compiled extension
included, is imported instead of the installed package: pytest runs from the copy's folder.
Exit status: 0 when every mutant was caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
F = "test_model_formulas.py::"
GATE = [F + "test_gate_adds_tanh_alpha_times_the_tube_tokens", F + "test_gated_block_receives_the_tokenizer_output"]

# name: (file under tubevit_ext/, original text, planted text, the tests that exercise it and must catch it)
MUTANTS = {
    "gate_alpha": ("models/blocks.py", "z = z + torch.tanh(self.gate_alpha) * z0",
                   "z = z + self.gate_alpha * z0", GATE),
    "gate_block_input": ("models/blocks.py", "z = z + torch.tanh(self.gate_alpha) * z0",
                         "z = z + torch.tanh(self.gate_alpha) * x", GATE),
    "gate_encode_input": ("models/tubevit.py", "z = z0 if i == self.scaling_layer else None",
                          "z = x if i == self.scaling_layer else None", GATE),
    "inflation_scale": ("models/convert.py", "* (ph * pw) / (kh * kw)", "* (ph * pw) / (kh * kh)",
                        [F + "test_inflation_formula_nonsquare_and_growing"]),
    "ln_swap": ("models/convert.py",
                '''(r"^encoder\\.layers\\.encoder_layer_(\\d+)\\.ln_1\\.", r"blocks.\\1.norm1."),
       (r"^encoder\\.layers\\.encoder_layer_(\\d+)\\.ln_2\\.", r"blocks.\\1.norm2."),''',
                '''(r"^encoder\\.layers\\.encoder_layer_(\\d+)\\.ln_1\\.", r"blocks.\\1.norm2."),
       (r"^encoder\\.layers\\.encoder_layer_(\\d+)\\.ln_2\\.", r"blocks.\\1.norm1."),''',
                [F + "test_image_vit_mapping_key_by_key"]),
    "joint_packing_order": ("models/tubevit.py", "        return feats[inverse.to(feats.device)]",
                            "        return feats", [F + "test_joint_loss_equals_each_sample_alone"]),
    "fake_width": ("_ops.py", "return x.new_empty((x.shape[0], n, weights[0].shape[0]))",
                   "return x.new_empty((x.shape[0], n, weights[0].shape[0] + 1))",
                   [F + "test_fake_kernels_give_the_real_shapes", "test_module.py"]),
    "model_without_pe": ("models/tube_tokenizer.py", "return tube_tokens(x, ws, bs or None, self.tubes, pe)",
                         "return tube_tokens(x, ws, bs or None, self.tubes, None)",
                         ["test_models.py::test_per_tube_matches_conv3d"]),
    "pe_centre": ("geometry.py", "return offset + stride * index + kernel // 2",
                  "return offset + stride * index + (kernel - 1) // 2", ["test_pos_embed.py", "test_tokens.py"]),
}


def run(name, all_tests, python):
    path, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, "tubevit_ext")
        shutil.copytree(os.path.join(ROOT, "tubevit_ext"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
        target = os.path.join(pkg, path)
        src = open(target).read()
        if src.count(old) != 1:
            return f"{name}: the original text occurs {src.count(old)} times in tubevit_ext/{path} (update the mutant)"
        open(target, "w").write(src.replace(old, new))
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        where = subprocess.run([python, "-c", "import tubevit_ext; print(tubevit_ext.__file__)"], cwd=tmp, env=env,
                               capture_output=True, text=True)
        if not where.stdout.startswith(tmp):
            return f"{name}: the copy is not what gets imported ({where.stdout.strip() or where.stderr[-300:]})"
        files = [HERE] if all_tests else [os.path.join(HERE, t) for t in tests]
        r = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files], cwd=tmp, env=env,
                           capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        return f"{name}: {'CAUGHT' if r.returncode != 0 else 'MISSED'} ({last})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutants to plant (default: all): " + ", ".join(MUTANTS))
    ap.add_argument("--all", action="store_true", help="run the whole suite for each mutant, not its targeted files")
    a = ap.parse_args(argv)
    unknown = set(a.names) - set(MUTANTS)
    if unknown:
        ap.error(f"unknown mutants {sorted(unknown)}; known: {', '.join(MUTANTS)}")
    lines = [run(n, a.all, sys.executable) for n in (a.names or MUTANTS)]
    print("\n".join(lines))
    return 0 if all(": CAUGHT" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
