#!/bin/bash
# VNN-COMP interface: prepare_instance.sh v1 <category> <onnx> <vnnlib>
# Nothing to prepare between instances (no server, no GPU): check the arguments and that
# the files exist (plain or .gz).
set -u
if [ "$#" -ne 4 ]; then
    echo "usage: $0 v1 <category> <onnx> <vnnlib>" >&2
    exit 2
fi
VERSION=$1; ONNX=$3; VNNLIB=$4
if [ "$VERSION" != "v1" ]; then
    echo "expected version v1, got $VERSION" >&2
    exit 2
fi
for f in "$ONNX" "$VNNLIB"; do
    if [ ! -f "$f" ] && [ ! -f "$f.gz" ]; then
        echo "missing file: $f" >&2
        exit 1
    fi
done
exit 0
