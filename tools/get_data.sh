#!/usr/bin/env bash
# Thin wrapper: bash tools/get_data.sh enwik8 [options]  ==  python tools/get_data.py enwik8 [options]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py=python3
exec "$py" "$here/get_data.py" "$@"
