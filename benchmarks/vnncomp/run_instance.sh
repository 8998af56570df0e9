#!/bin/bash
# VNN-COMP interface: run_instance.sh v1 <category> <onnx> <vnnlib> <result_file> <timeout>
# Writes sat/unsat/timeout/unknown/error on the result file's first line (and the
# counterexample after sat). Runs the repository's venv python if there is one; CERTIFY_DEVICE=cuda
# computes the bounds on the GPU (default cpu).
set -u
if [ "$#" -ne 6 ]; then
    echo "usage: $0 v1 <category> <onnx> <vnnlib> <result_file> <timeout>" >&2
    exit 2
fi
VERSION=$1; CATEGORY=$2; ONNX=$3; VNNLIB=$4; RESULT=$5; TIMEOUT=$6
if [ "$VERSION" != "v1" ]; then
    echo "expected version v1, got $VERSION" >&2
    exit 2
fi
# relative paths are relative to the caller's folder: make them absolute before the cd below
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
ONNX=$(abspath "$ONNX"); VNNLIB=$(abspath "$VNNLIB"); RESULT=$(abspath "$RESULT")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${CERTIFY_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cd "$REPO" || exit 2
echo "certify: $CATEGORY $(basename "$ONNX") $(basename "$VNNLIB") timeout $TIMEOUT" >&2
# leave a little of the timeout for interpreter start-up and writing the file
BUDGET=$(awk -v t="$TIMEOUT" 'BEGIN { b = t - 2; if (b < 1) b = t * 0.5; print b }')
"$PY" -m verify.vnncomp instance "$ONNX" "$VNNLIB" "$RESULT" "$BUDGET"
STATUS=$?
if [ ! -s "$RESULT" ]; then
    echo "error" > "$RESULT"
fi
exit $STATUS
