#!/usr/bin/env bash
# The GPU check as one command on the device machine (one H200, no network), run from the repo root:
#   bash bench/gpu_check.sh
# bench/gpu_check.py pretrains a 247M-parameter Llama teacher (bench/recipes/gpu.yaml) in bfloat16 on CUDA, distils a
# 157M student, quantizes it with GPTQ W4A16 g128, evaluates, exports safetensors, compressed-tensors, onnx-int4 and
# bnb-nf4, then quantizes the same student with OSTQuant W4A4KV4 (export safetensors). Figures go to
# $OUT/gpu_check.json; the section `## GPU check (bench/gpu_check.sh)` of bench/RESULTS.md is rewritten there and
# copied to $OUT (RESULTS.md and gpu_check_section.md), with the whole log (gpu_check.log). The run is held to
# 8 minutes (timeout 480); the JSON and the section are rewritten after every stage, so a stopped run keeps what it
# measured.
#
# The device image has python3.12 with torch (CUDA 13), numpy, safetensors 0.8.0, accelerate 1.15.0, onnx,
# onnxruntime (CPU build), pyyaml, regex, tqdm, filelock and matplotlib, but transformers 5.x with
# huggingface-hub 1.x and tokenizers 0.23.2 (transformers 4.57.6, which optimum-onnx needs, refuses both), and no
# optimum, bitsandbytes, compressed-tensors or pydantic. gpu_check.py imports llm_compress/ only (not llm_compress/flows/: no prefect,
# fastapi, sqlalchemy, datasets, optuna), so these wheels are all it needs. Preparation, here, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 optimum==2.1.0 optimum-onnx==0.1.0 \
#     compressed-tensors==0.17.1 loguru==0.7.3 bitsandbytes==0.50.2 pydantic==2.14.3 pydantic-core==2.50.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
#   # bitsandbytes' wheel holds a library per CUDA / ROCm / XPU version (43 MB); the image's torch is cu130: keep
#   # cuda130 (and cuda132, cpu), which brings the 13 wheels from 62 MB to 26 MB (the tree that travels: 64 MiB)
#   zip -q -d .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
#     'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
#
# Not carried: onnxruntime-gpu. Its 1.31.1 wheel (built for CUDA 13) is 256 MB, its CUDA provider library alone
# 231 MB compressed: four times the 64 MiB a call may carry. ONNX Runtime then runs the onnx-int4 check on the
# image's CPU build (llm_compress/export.py `_ort_provider` picks CUDAExecutionProvider only where it is available); the
# JSON's onnxruntime_providers and each ONNX export's provider say which.
#
# Then the device tool's run, with the wheels carried and a timeout that leaves room for the install:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GPU_CHECK_COMMAND="bash bench/gpu_check.sh"
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
mkdir -p "$out"
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 1; }
fi
nvidia-smi || echo "gpu_check.sh: nvidia-smi failed"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.is_available(), 'transformers', transformers.__version__)"
timeout 480 python3 bench/gpu_check.py --artifacts /tmp/gpu-artifacts --out "$out/gpu_check.json" "$@" 2>&1 \
  | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check.sh: stopped by timeout 480; the JSON and the section hold the stages that finished"
cp bench/RESULTS.md "$out/RESULTS.md"
awk '/^## GPU check/{on=1; print; next} on && /^## /{exit} on' bench/RESULTS.md > "$out/gpu_check_section.md"
echo "gpu_check.sh: exit $rc; files in $out: $(ls "$out" | tr '\n' ' ')"
exit "$rc"
