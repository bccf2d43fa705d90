#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in one go (a few minutes on one H200):
#   1. the CUDA tests (every fast path in f32/bf16 against float64, autocast, inductor, beam search);
#   2. the benchmark, eager, whole grid with the Transformer rows;
#   3. the benchmark's compiled subset (inductor) at the FFN shapes;
#   4. the whole-Transformer step compiled with CUDA graphs (reduce-overhead) at 128x32 tokens per step;
#   5. profiles (scripts/profile_layer.py) of a TT and a Tucker training pass at 512->2048, 4096 tokens, next to dense;
#   6. the CUDA cost model calibrated on this GPU (the built-in CUDA constants are guesses), and the eager layer grid
#      benchmarked again with it (compare bench-cuda-calibrated/ with bench-cuda/).
#
#   scripts/gpu_checks.sh OUT_DIR
#   (writes OUT_DIR/{tests.log,bench-cuda/,bench-cuda-compiled/,bench-cuda-graphs/,profile/,calibrate-cuda/,
#    bench-cuda-calibrated/})
#
# Run from the repository root with the package importable (pip install -e ., or PYTHONPATH=src).
set -uo pipefail
out=${1:?usage: scripts/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2
timeout 300 "$python" -m pytest -q -p no:cacheprovider tests/test_fast_paths.py tests/layers/test_layers.py \
    tests/test_decoding.py -k "cuda or autocast or beam" >"$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
timeout 600 "$python" -m compressed_transformer bench --compile off --out "$out/bench-cuda" >"$out/bench-cuda.log" 2>&1 ||
    status=1
tail -12 "$out/bench-cuda.log"
timeout 600 "$python" -m compressed_transformer bench --compile on --shapes 512x2048,2048x512 \
    --tokens 1,512,4096,16384 --layers dense,tt-r2,tt-r8,tucker-r2,svd-r64,prune-0.9 --no-transformer \
    --out "$out/bench-cuda-compiled" >"$out/bench-cuda-compiled.log" 2>&1 || status=1
tail -16 "$out/bench-cuda-compiled.log"
timeout 600 "$python" -m compressed_transformer bench --compile on --compile-mode reduce-overhead \
    --transformer-batch 128 --layers dense --shapes 512x2048 --tokens 1 \
    --out "$out/bench-cuda-graphs" >"$out/bench-cuda-graphs.log" 2>&1 || status=1
tail -8 "$out/bench-cuda-graphs.log"
for layer in tt-r2 tucker-r2; do
    timeout 300 "$python" scripts/profile_layer.py --layer "$layer" --shape 512x2048 --tokens 4096 --pass train \
        --out "$out/profile" >"$out/profile-$layer.log" 2>&1 || status=1
    grep "^## " "$out/profile-$layer.log"
done
timeout 600 "$python" -m compressed_transformer calibrate --out "$out/calibrate-cuda" >"$out/calibrate-cuda.log" 2>&1 ||
    status=1
tail -12 "$out/calibrate-cuda.log"
timeout 600 "$python" -m compressed_transformer bench --compile off --no-transformer \
    --costs "$out/calibrate-cuda/costs.json" --out "$out/bench-cuda-calibrated" >"$out/bench-cuda-calibrated.log" 2>&1 ||
    status=1
tail -12 "$out/bench-cuda-calibrated.log"
exit $status
