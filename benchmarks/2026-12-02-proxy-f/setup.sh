# Sourced by each call: the zstandard wheel, unbuffered output, the GPU's name. The wheel must match the device's
# Python, 3.12 (pip download zstandard --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64).
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 TOKENIZER_PATH=$PWD/.carry/tok/fineweb_8192_bpe.model

nvidia-smi --query-gpu=name --format=csv,noheader
