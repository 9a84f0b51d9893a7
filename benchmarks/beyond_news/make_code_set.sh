#!/bin/bash
# The out-of-domain "python_code" set of benchmarks/beyond_news: 15 modules of the running Python's standard
# library, copied as .txt (data.source files reads .txt/.md), into the folder given (default /tmp/h7_code).
set -e
out=${1:-/tmp/h7_code}
lib=$(python3 -c "import os, textwrap; print(os.path.dirname(textwrap.__file__))")
mkdir -p "$out"
for m in textwrap shlex fnmatch heapq bisect colorsys graphlib statistics fractions difflib csv string glob tokenize gettext; do
  cp "$lib/$m.py" "$out/$m.txt"
done
echo "$out: $(ls "$out" | wc -l) files"
