#!/usr/bin/env bash
# Install the peer fine-tuning tools that bench/bench_sft.py compares against, each in its own venv,
# with torch pinned to 2.13.0, the project's version (`pip install torch==2.13.0` first: on Python 3.11 pip
# takes this machine's CPU wheel from /opt/wheels; on 3.12 none is there and PyPI's 2.13.0 comes with its
# CUDA libraries, a 6.9 GB venv, still running on CPU).
# Measured 2026-12-01: llamafactory 0.9.5 installs in ~1 min; axolotl 0.21.0 needs Python >= 3.12 and
# took 15.5 min (CUDA wheels). torchvision/torchaudio pulled by LLaMA-Factory do not match torch 2.13
# and are removed; its unconditional `import torchaudio` gets bench/peers/stubs on PYTHONPATH.
#
#   bench/peers/install.sh [DEST]      # default DEST: ~/.cache/affinage/peers
#
# Writes DEST/<peer>/ (a venv) and DEST/<peer>.log (pip's output); prints one line per peer: installed
# (version) or FAILED with pip's last error line. bench_sft.py reads the same folders (--peers DEST).
set -u
DEST="${1:-${AFFINAGE_PEERS:-$HOME/.cache/affinage/peers}}"
declare -A PY=(  # axolotl ≥ 0.20 requires Python ≥ 3.12
  [llamafactory]="${PYTHON:-python3.11}"
  [axolotl]="${PYTHON312:-$( (command -v pyenv >/dev/null && PYENV_VERSION=3.12.1 pyenv which python3.12) 2>/dev/null || echo python3.12)}"
)
TORCH="${TORCH_PIN:-torch==2.13.0}"
mkdir -p "$DEST"
declare -A PKG=(
  [llamafactory]="llamafactory==0.9.5"
  [axolotl]="axolotl==0.21.0"
)
for peer in llamafactory axolotl; do
  venv="$DEST/$peer"; log="$DEST/$peer.log"
  : >"$log"
  if [ ! -x "$venv/bin/python" ]; then "${PY[$peer]}" -m venv "$venv" >>"$log" 2>&1; fi
  echo "$TORCH" >"$DEST/$peer.constraints"
  if "$venv/bin/pip" install -q "$TORCH" >>"$log" 2>&1 \
     && "$venv/bin/pip" install -q -c "$DEST/$peer.constraints" "${PKG[$peer]}" >>"$log" 2>&1; then
    # pip pulls torchvision/torchaudio wheels built for another torch (llamafactory: "operator torchvision::nms
    # does not exist" at import); text fine-tuning needs neither
    "$venv/bin/pip" uninstall -y -q torchvision torchaudio >>"$log" 2>&1
    ver=$("$venv/bin/pip" show "${PKG[$peer]%%==*}" 2>/dev/null | awk '/^Version:/{print $2}')
    echo "$peer: installed $ver ($venv)"
  else
    echo "$peer: FAILED: $(grep -E 'ERROR|error:' "$log" | tail -n 1)  (full log: $log)"
  fi
done
