#!/usr/bin/env bash
# Creates the parity environment: a virtualenv, separate from the project's, holding the reference packages
# whose outputs tests/dictionaries/fixtures/ records (they pin transformers 4; the project runs transformers 5).
#
#   bash scripts/parity/make_env.sh            # -> $PARITY_VENV (default $LLAMA_LENS_HOME/parity-venv)
#   $PARITY_VENV/bin/python scripts/parity/record.py
#
# torch is installed first and pinned: left to the reference packages' own requirements, pip would resolve an
# unpinned torch to a multi-GB CUDA build. A reference package that does not install is reported and skipped;
# record.py then skips its fixtures.
set -u
HOME_DIR="${LLAMA_LENS_HOME:-$HOME/.cache/llama_lens}"
VENV="${PARITY_VENV:-$HOME_DIR/parity-venv}"
PYTHON="${PYTHON:-python3.11}"

"$PYTHON" -m venv "$VENV" || exit 1
PIP="$VENV/bin/pip"
"$PIP" install --quiet --upgrade pip || exit 1
"$PIP" install "torch==2.13.0" || exit 1

failed=()
for package in "sae-lens==6.54.12" "eai-sparsify==1.3.3" "circuit-tracer==0.5.0"; do
    # Each with torch held at its pin, so no reference package can swap it for another build.
    if ! "$PIP" install "$package" "torch==2.13.0"; then
        failed+=("$package")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "could not install: ${failed[*]}" >&2
fi
echo "parity environment: $VENV"
