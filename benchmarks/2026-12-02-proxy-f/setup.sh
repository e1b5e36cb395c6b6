# Sourced by each call: the zstandard wheel, unbuffered output, the GPU's name.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 TOKENIZER_PATH=$PWD/.carry/tok/fineweb_8192_bpe.model

nvidia-smi --query-gpu=name --format=csv,noheader
