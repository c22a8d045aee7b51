#!/usr/bin/env bash
# Set-up and entry points of vit_jax_ft.
#   ./run.sh            set up, then fine-tune the embedded checkpoint offline and report
#   ./run.sh study      set up, then run the offline study (workdirs/study; rerun resumes)
#   ./run.sh test       set up, then run the test suite in 2 workers (pytest arguments may follow)
#   ./run.sh setup      only create .venv and install the package (pip install -e .[test])
#   ./run.sh models     list the official models with parameter counts
#   ./run.sh python ... run python inside the environment
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

setup() {
  local stamp="$VENV/.requirements.sha256"
  local want
  want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  echo "Setting up $VENV with $("$PYTHON" --version) (a few minutes the first time)..." >&2
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp"
}

cmd="${1:-default}"
[[ $# -gt 0 ]] && shift
setup
# Quieter TensorFlow start-up; tf.data only runs on the CPU here.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
case "$cmd" in
  setup) ;;
  # Two workers by default (TEST_WORKERS=0 runs in one process, e.g. to debug one test).
  test) exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" "$@" ;;
  models) exec "$VENV/bin/python" -m vit_jax_ft.models "$@" ;;
  python) exec "$VENV/bin/python" "$@" ;;
  study)
    # 3 resolutions x 2 learning rates of the embedded ViT on the digits, lr chosen on a dev split.
    [[ -d workdirs/digits ]] ||
      "$VENV/bin/python" -m vit_jax_ft.embedded export_digits --out=workdirs/digits
    exec "$VENV/bin/python" -m vit_jax_ft.sweep --config=configs/studies/embedded.py \
        --workdir=workdirs/study "$@" ;;
  default)
    # The embedded default: a small ViT pretrained on Fashion-MNIST (checkpoints/embedded/)
    # fine-tuned on scikit-learn's real digits at a new resolution, then evaluated.
    [[ -d workdirs/digits ]] ||
      "$VENV/bin/python" -m vit_jax_ft.embedded export_digits --out=workdirs/digits
    workdir="workdirs/embedded-$(date +%Y%m%d-%H%M%S)"
    "$VENV/bin/python" -m vit_jax_ft.main --config=configs/embedded.py --workdir="$workdir" "$@"
    exec "$VENV/bin/python" -m vit_jax_ft.evaluate --workdir="$workdir" ;;
  *) echo "Unknown command '$cmd'; see the top of run.sh for the list." >&2; exit 2 ;;
esac
