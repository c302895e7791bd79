#!/bin/bash
# Creates the TRL benchmark virtualenv OUTSIDE the repo (TRL is never a dependency of dpo-ds).
#   benchmarks/setup_trl_venv.sh            -> ${TRL_VENV:-~/.cache/dpo-ds-bench/venv-trl}
# Same torch (2.13.0 CPU wheel) and transformers as the project venv, so the model code is identical.
set -eu
VENV=${TRL_VENV:-$HOME/.cache/dpo-ds-bench/venv-trl}
TRL_VERSION=${TRL_VERSION:-1.16.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-$(/work/main/.venv/bin/python -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo 5.24.0)}
if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c "import trl, torch" 2>/dev/null; then
  echo "$VENV ready"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "trl==$TRL_VERSION" "transformers==$TRANSFORMERS_VERSION"
"$VENV/bin/python" -c "import trl, transformers, torch; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
