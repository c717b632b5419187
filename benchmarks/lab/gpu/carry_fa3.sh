#!/usr/bin/env bash
# Put dew-flash-attn's FA3 library and its Python into .carry/dew/ (ignored), for a GPU run that cannot
# take the whole wheel along (78 MB; the device tool takes 64 MiB a call). The FA2 library (sm80 code, which
# the H200 does not run) stays behind, and the package's load of it is made optional in the copy.
#   benchmarks/lab/gpu/carry_fa3.sh /path/to/dew_flash_attn_cu13-*.whl
# On the GPU machine: PYTHONPATH=.carry/dew:$PYTHONPATH
set -euo pipefail
wheel=${1:?usage: carry_fa3.sh WHEEL}
dest=.carry/dew/dew_flash_attn
rm -rf "$dest" && mkdir -p "$dest"
unzip -q -o -j "$wheel" 'dew_flash_attn/__init__.py' 'dew_flash_attn/libdew_flash_attn3.so' -d "$dest"
python3 - "$dest/__init__.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
load = '_library, _two = _load("libdew_flash_attn.so", "dew_flash_architectures")'
assert load in text, "the wheel's loader changed: update carry_fa3.sh"
text = text.replace(load, "try:\n    " + load + "\nexcept OSError:  # carried without the FA2 library\n    _library, _two = None, ()")
loop = 'for library, prefix in ((_library, "dew_flash_mha"), (_library3, "dew_flash3_mha")):'
assert loop in text, "the wheel's registration changed: update carry_fa3.sh"
text = text.replace(loop, loop + "\n        if library is None:\n            continue")
open(path, "w").write(text)
PY
du -sh .carry/dew
