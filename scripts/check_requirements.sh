#!/usr/bin/env bash
# Checks that the pinned requirements resolve for every Python the README names, without installing
# anything (pip's resolver with --dry-run and --python-version; needs PyPI). requirements.txt is resolved
# with its dependencies (binary wheels only, as pip requires for another Python); the test-only pins of
# requirements-test.txt are checked one by one (--no-deps: lm_eval depends on sqlitedict, which has no wheel).
#   bash scripts/check_requirements.sh            # 3.10 3.11 3.12 3.13
#   bash scripts/check_requirements.sh 3.10       # one version
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@"); [ ${#versions[@]} -eq 0 ] && versions=(3.10 3.11 3.12 3.13)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
status=0
for version in "${versions[@]}"; do
  # pip evaluates environment markers for the Python it runs on, not for --python-version: keep the lines
  # whose marker holds for $version (and drop the editable line: it is this checkout, not a pin).
  python - "$version" requirements.txt > "$work/runtime.txt" <<'PY'
import sys
from packaging.requirements import Requirement
version = sys.argv[1]
for line in open(sys.argv[2]):
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-e "):
        continue
    marker = Requirement(line).marker
    if marker is None or marker.evaluate({"python_version": version, "python_full_version": version + ".0"}):
        print(line.split(";", 1)[0].strip())
PY
  for kind in runtime test; do
    if [ "$kind" = runtime ]; then
      flags=(-r "$work/runtime.txt")
    else
      flags=(--no-deps -r requirements-test.txt)
    fi
    if python -m pip install --dry-run --quiet --ignore-installed --python-version "$version" --only-binary=:all: \
        --target "$work/target" "${flags[@]}" > "$work/log" 2>&1; then
      echo "python $version: $kind pins resolve"
    else
      echo "python $version: $kind pins do NOT resolve:"; grep -E '^ERROR' "$work/log" | cut -c1-300 | tail -3
      status=1
    fi
  done
done
exit "$status"
