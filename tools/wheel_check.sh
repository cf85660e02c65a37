#!/usr/bin/env bash
# The package as users get it: build the wheel, check what it holds (the package, not the
# studies, tests, documents or tools beside it), install it into a fresh virtual
# environment (its dependencies hard-linked from .venv where it has them), and train
# the tiny preset from a folder with no source tree in sight.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$root"

# What the wheel holds: the package, not the studies, tests, documents or tools beside it.
# setuptools' discovery (pyproject's [tool.setuptools.packages.find]) must find ddpm_cars
# alone; the wheel it builds must hold no file from outside the package and none of the
# studies (studies/*.py) under ddpm_cars, and must hold the command line and its bench.
discover="$python"
[ -x "$root/.venv/bin/python" ] && discover="$root/.venv/bin/python"  # has the build's setuptools
"$discover" - "$root" <<'PY'
import sys
from pathlib import Path

root = Path(sys.argv[1])
try:
    import tomllib
    from setuptools.config.expand import find_packages
except ImportError as missing:  # the wheel's own contents are still checked below
    print(f"wheel check: package discovery not checked ({missing})")
    sys.exit(0)
find = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
found = find_packages(**find, root_dir=str(root))
stray = [p for p in found if p.split(".")[0] != "ddpm_cars"]
if stray or "ddpm_cars" not in found:
    sys.exit(f"wheel check: setuptools' package discovery ({find}) finds {sorted(found)}: "
             f"ddpm_cars alone belongs in the wheel, not {stray}")
PY
wheels=("$work/dist"/ddpm_cars-*.whl)
"$python" - "${wheels[0]}" "$root" <<'PY'
import sys
import zipfile
from pathlib import Path

wheel, root = sys.argv[1], Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
studies = {p.stem for p in (root / "studies").glob("*.py") if p.stem != "__init__"}
outside = ("studies", "tests", "docs", "tools")
wrong = [n for n in names if n.split("/")[0] in outside or "studies" in n.split("/")[:-1]
         or any(n == f"ddpm_cars/benchmarks/{study}.py" for study in studies)]
missing = [n for n in ("ddpm_cars/cli.py", "ddpm_cars/benchmarks/bench.py") if n not in names]
tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))})
if wrong or missing or tops != ["ddpm_cars"]:
    sys.exit(f"wheel check: {Path(wheel).name} holds what it should not, or lacks what it should "
             f"(a stale build/ folder in the source tree?)\n"
             + "".join(f"  should not hold: {n}\n" for n in wrong)
             + "".join(f"  lacks: {n}\n" for n in missing)
             + f"  top-level folders: {tops} (ddpm_cars alone expected)")
print(f"wheel check: {Path(wheel).name} holds {len(names)} files, the package alone")
PY
"$python" -m venv "$work/venv"
# The runtime dependencies the project's .venv already holds (torch alone is gigabytes) are
# hard-linked in rather than installed a second time, which a small disk cannot take; pip
# then installs the wheel and anything else it declares. Dev-only packages stay out.
version='import sys; print(sys.version_info[:2])'
if [ -x "$root/.venv/bin/python" ] && [ "$("$root/.venv/bin/python" -c "$version")" = "$("$work/venv/bin/python" -c "$version")" ]; then
  "$root/.venv/bin/python" "$root/tools/link_deps.py" "$work/dist"/ddpm_cars-*.whl \
    "$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
fi
"$work/venv/bin/python" -m pip install --quiet "$work/dist"/ddpm_cars-*.whl
"$work/venv/bin/python" -m pip check
cd "$work"  # outside the source tree: only the installed wheel can be imported
where="$("$work/venv/bin/python" -c 'import ddpm_cars, os; print(os.path.dirname(ddpm_cars.__file__))')"
case "$where" in
  "$work/venv/"*) ;;
  *) echo "wheel check: ddpm_cars was imported from $where, not from the wheel" >&2; exit 1 ;;
esac
DDPM_CARS_CACHE="$work/cache" "$work/venv/bin/ddpm-cars" train --preset tiny --toy-count 32 --steps 2 --out "$work/run"
test -f "$work/run/checkpoints/step_00000002/model.safetensors"
echo "wheel check: $(basename "$work"/dist/*.whl) installs and trains from $where"
