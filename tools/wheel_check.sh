#!/usr/bin/env bash
# The package as users get it: build the wheel, install it into a fresh virtual
# environment, and train the tiny preset from a folder with no source tree in sight.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$root"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$work/dist"/ddpm_cars-*.whl
cd "$work"  # outside the source tree: only the installed wheel can be imported
where="$("$work/venv/bin/python" -c 'import ddpm_cars, os; print(os.path.dirname(ddpm_cars.__file__))')"
case "$where" in
  "$work/venv/"*) ;;
  *) echo "wheel check: ddpm_cars was imported from $where, not from the wheel" >&2; exit 1 ;;
esac
DDPM_CARS_CACHE="$work/cache" "$work/venv/bin/ddpm-cars" train --preset tiny --toy-count 32 --steps 2 --out "$work/run"
test -f "$work/run/checkpoints/step_00000002/model.safetensors"
echo "wheel check: $(basename "$work"/dist/*.whl) installs and trains from $where"
