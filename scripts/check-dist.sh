#!/usr/bin/env bash
# The distributions as a user gets them (CI, after the tests):
#   1. python -m build makes the sdist and, from it, the wheel, without a warning;
#   2. every file of the package (what git sees under mocolab/) is in the wheel, py.typed
#      included;
#   3. the sdist holds every file of tests/, benchmarks/ and scripts/, and the test suite is
#      collected from it unpacked;
#   4. the wheel is installed into a fresh virtual environment outside the tree, which takes
#      its dependencies from the project's environment (a .pth line: no second torch to
#      download; a path line does not run the project's editable install), and a short
#      journey runs there from a folder outside the tree: pretrain -> eval knn -> report ->
#      export, so a file missing from the package (a preset, py.typed, ...) fails here;
#   5. mypy --strict passes on a user's script of the public API (tests/data/typed_user_script.py)
#      against the installed package.
# Usage: scripts/check-dist.sh [PYTHON]   (default .venv/bin/python, the project's environment)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${1:-${PYTHON:-.venv/bin/python}}
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # absolute, links kept (a venv)
unset PYTHONPATH  # nothing of the tree may leak into the checks
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mocolab-dist.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
step() { echo "check-dist: $* ($((SECONDS - START)) s)"; }

step "building the sdist and the wheel"
# from a copy of the files git sees (tracked and new, not ignored): a clean clone's, with the
# edits not yet committed; never from the tree itself, whose mocolab.egg-info/SOURCES.txt (left
# by an editable install) setuptools reads back into the sdist, which hides a missing file
"$PYTHON" - "$TMP/src" "$TMP/files.txt" <<'EOF'
import shutil
import subprocess
import sys
from pathlib import Path

dst, listing = Path(sys.argv[1]), Path(sys.argv[2])
try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()
    files = [Path(f) for f in out.split("\0") if f]
except (OSError, subprocess.CalledProcessError):  # not a git checkout: all but what builds make
    skip = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".mypy_cache", ".ruff_cache"}
    files = [p for p in Path(".").rglob("*")
             if not skip & set(p.parts) and not any(s.endswith(".egg-info") for s in p.parts)]
files = sorted(f for f in files if f.is_file())
for f in files:
    (dst / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(f, dst / f)
listing.write_text("".join(f"{f.as_posix()}\n" for f in files))
EOF
# (PYTHONDONTWRITEBYTECODE would make setuptools warn that it skips byte-compiling)
if ! env -u PYTHONDONTWRITEBYTECODE "$PYTHON" -m build --outdir "$TMP/dist" "$TMP/src" \
  >"$TMP/build.log" 2>&1; then
  cat "$TMP/build.log"; exit 1
fi
if grep -i "warning" "$TMP/build.log"; then
  echo "check-dist: python -m build warned (above)"; exit 1
fi
SDIST=$(ls "$TMP"/dist/*.tar.gz)
WHEEL=$(ls "$TMP"/dist/*.whl)

step "checking the wheel's files against the package's"
grep '^mocolab/' "$TMP/files.txt" >"$TMP/tracked.txt"
"$PYTHON" - "$WHEEL" "$TMP/tracked.txt" <<'EOF'
import sys
import zipfile

wheel, tracked = sys.argv[1:]
have = set(zipfile.ZipFile(wheel).namelist())
missing = sorted({line.strip() for line in open(tracked) if line.strip()} - have)
if missing:
    sys.exit("check-dist: missing from the wheel (pyproject.toml package-data):\n  " + "\n  ".join(missing))
EOF

step "checking the sdist's files against the tests', benchmarks' and scripts'"
"$PYTHON" - "$SDIST" "$TMP/files.txt" <<'EOF'
import sys
import tarfile

sdist, listing = sys.argv[1:]
have = {m.name.split("/", 1)[1] for m in tarfile.open(sdist).getmembers() if "/" in m.name}
want = {f.strip() for f in open(listing) if f.startswith(("tests/", "benchmarks/", "scripts/"))}
missing = sorted(want - have)
if missing:
    sys.exit("check-dist: missing from the sdist (MANIFEST.in):\n  " + "\n  ".join(missing))
EOF

step "collecting the test suite from the unpacked sdist"
mkdir "$TMP/sdist"
tar -xzf "$SDIST" -C "$TMP/sdist"
(
  cd "$TMP"/sdist/mocolab-*/
  where=$("$PYTHON" -c "import mocolab; print(mocolab.__file__)")
  [[ $where == "$PWD/"* ]] || { echo "check-dist: the sdist's tests import mocolab from $where"; exit 1; }
  if ! "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider >"$TMP/collect.log" 2>&1; then
    tail -40 "$TMP/collect.log"; echo "check-dist: the suite is not collected from the sdist"; exit 1
  fi
  tail -1 "$TMP/collect.log"
)

step "installing the wheel into a fresh environment"
"$PYTHON" -m venv --without-pip "$TMP/venv"
VPY=$TMP/venv/bin/python
"$PYTHON" - "$VPY" <<'EOF'  # the project's site-packages, for the dependencies only
import subprocess
import sys
import sysconfig
from pathlib import Path

fresh = subprocess.run([sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
(Path(fresh) / "mocolab-check-dependencies.pth").write_text("\n".join(ours) + "\n")
EOF
"$PYTHON" -m pip --python "$VPY" install -q --no-deps "$WHEEL"
mkdir "$TMP/journey"
cd "$TMP/journey"
"$VPY" - "$TMP/venv" <<'EOF'
import sys

import mocolab

venv = sys.argv[1]
assert mocolab.__file__.startswith(venv), f"mocolab comes from {mocolab.__file__}, not {venv}"
finders = [m for m in sys.modules if "editable" in m] + [repr(f) for f in sys.meta_path if "editable" in repr(f)]
assert not finders, f"the project's editable install is active here: {finders}"
from importlib.metadata import version

assert version("mocolab") == mocolab.__version__, (version("mocolab"), mocolab.__version__)
print(f"mocolab {mocolab.__version__} from {mocolab.__file__}")
EOF

step "the journey: pretrain, eval knn, report, export"
MOCOLAB=$TMP/venv/bin/mocolab
export OMP_NUM_THREADS=2
"$MOCOLAB" pretrain --data synthetic --width 8 --stem compact --batch-size 32 --bn-splits 4 \
  --queue-size 64 --epochs 1 --max-steps 4 --threads 2 --knn-k 20 --no-progress \
  --out-dir runs --run-name journey
"$MOCOLAB" eval knn runs/journey --k 20 --no-progress
"$MOCOLAB" report runs/journey --max-points 200 --no-progress
test -s runs/journey/report/index.html
"$MOCOLAB" export runs/journey --format safetensors
"$VPY" -c "import mocolab; print(mocolab.load_encoder('runs/journey/backbone.safetensors').num_features)"

step "mypy --strict on a user's script against the installed package"
cp "$ROOT/tests/data/typed_user_script.py" .
"$PYTHON" -m mypy --strict --python-executable "$VPY" --cache-dir "$TMP/mypy" typed_user_script.py

step "done"
