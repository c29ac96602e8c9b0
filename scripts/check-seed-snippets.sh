#!/usr/bin/env bash
# Runs the seed document's own pandas/matplotlib analysis snippets, unchanged, on a run
# directory (scripts/seed_snippets.py holds them verbatim, one function each) and fails if any
# of them raises. The snippets are how people read profilemate's output; this keeps them working.
#
#   bash scripts/check-seed-snippets.sh DIR
#
# pandas and matplotlib come from PyPI into a virtual environment kept outside the checkout,
# ${PROFILEMATE_PY_ENV:-$HOME/.cache/profilemate/py-analysis}, made once and reused.
# PROFILEMATE_SNIPPET_PNGS=OUTDIR keeps the PNG files the snippets save.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${1:-}"
if [ -z "$dir" ] || [ ! -d "$dir" ]; then
  echo "usage: scripts/check-seed-snippets.sh DIR (a profilemate output directory)" >&2
  exit 2
fi
dir="$(cd "$dir" && pwd)"

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "scripts/check-seed-snippets.sh: $python is required" >&2; exit 1; }
env_dir="${PROFILEMATE_PY_ENV:-$HOME/.cache/profilemate/py-analysis}"
# Known-good ranges; a change here rebuilds the environment.
requirements="pandas>=2.1,<4 matplotlib>=3.8,<4"
stamp="$env_dir/.profilemate-requirements"

if [ ! -x "$env_dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$requirements" ] \
  || ! "$env_dir/bin/python" -c 'import pandas, matplotlib' 2>/dev/null; then
  echo "== creating the analysis environment in $env_dir ($requirements)"
  rm -rf "$env_dir"
  mkdir -p "$(dirname "$env_dir")"
  "$python" -m venv "$env_dir"
  # shellcheck disable=SC2086 # one argument per requirement
  "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check $requirements
  echo "$requirements" >"$stamp"
fi
"$env_dir/bin/python" -c 'import pandas, matplotlib; print(f"pandas {pandas.__version__}, matplotlib {matplotlib.__version__}")'

seed_args=()
seed="../shared/seed/000_c0dcb44cb1aa3f0a.txt"
if [ -f "$seed" ]; then
  seed_args=(--seed "$seed")
else
  echo "(no seed document at $seed: the verbatim check is skipped)"
fi
keep_args=()
[ -n "${PROFILEMATE_SNIPPET_PNGS:-}" ] && keep_args=(--keep "$PROFILEMATE_SNIPPET_PNGS")

MPLBACKEND=Agg "$env_dir/bin/python" scripts/seed_snippets.py "$dir" "${seed_args[@]}" "${keep_args[@]}"
