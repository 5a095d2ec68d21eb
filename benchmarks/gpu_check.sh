#!/usr/bin/env bash
# Prepare here:   bash benchmarks/gpu_check.sh prepare   (downloads the wheels the GPU image lacks into .whl/,
#                                                         copies the embedded tokenizer into benchmarks/assets/)
# Run there:      bash benchmarks/gpu_check.sh           (with `.whl` and `benchmarks/assets` carried)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    grep -qx '/benchmarks/assets/' .git/info/exclude || echo '/benchmarks/assets/' >> .git/info/exclude
    # The GPU image (Python 3.12) has torch, transformers, peft, accelerate; not trl, datasets, pydantic.
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        trl==1.16.0 datasets==5.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19
    mkdir -p benchmarks/assets/tokenizer
    cp "${PERSONA_EM_CACHE:-$HOME/.cache/persona_em}"/smollm2-135m-instruct-f32/{tokenizer.json,tokenizer_config.json,special_tokens_map.json} benchmarks/assets/tokenizer/ 2>/dev/null || \
    cp "${PERSONA_EM_CACHE:-$HOME/.cache/persona_em}"/smollm2-135m-instruct-f32/tokenizer* benchmarks/assets/tokenizer/
    du -sh .whl benchmarks/assets
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 benchmarks/gpu_check.py
