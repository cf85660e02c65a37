#!/usr/bin/env bash
# The package as users get it: build the wheel, install it into a fresh virtual
# environment (its dependencies hard-linked from .venv where it has them), and train
# the tiny preset from a folder with no source tree in sight.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$root"
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
