#!/usr/bin/env bash
# Regenerate the Python modules for proto/ into client/rnnstream_client/_proto.
# The generated modules import each other by package-relative paths, so the
# client package can carry them without a top-level "rnnstream" package.
# PYTHON selects the interpreter that has grpcio-tools (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

out=client/rnnstream_client/_proto
rm -rf "$out"
mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/rnnstream/v1/*.proto
sed -i -E 's/^from rnnstream\.v1 import /from . import /' "$out"/rnnstream/v1/*.py
touch "$out/__init__.py" "$out/rnnstream/__init__.py" "$out/rnnstream/v1/__init__.py"
