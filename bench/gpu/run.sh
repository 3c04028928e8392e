#!/usr/bin/env bash
# The GPU benchmarks of the training issues, one command on a bare GPU image (torch + numpy):
#     bash bench/gpu/run.sh throughput|fp8|profile|attention|all [extra bench/train_throughput.py arguments]
# throughput: mdlm-1b at micro-batch 16 x 1024 and accumulation 4 (configs/train/mdlm-1b-h100.yaml),
#             the project's DeepSpeed step (ZeRO-1; bf16 weights with fp32 or bf16 gradients, and
#             bf16-mixed) against a plain PyTorch step (compiled blocks, fused AdamW), same
#             micro-batch and accumulation; DeepSpeed's own update of the fp32 gradients (-unfused:
#             without train.fuse_grad_update) and its bf16.immediate_grad_update (-immediate:
#             fp32 gradients accumulated in the backward hooks); the output head on its unpadded weight (-unaligned,
#             as before model/layers.py padded it); and the plain step with the output head on
#             every position (plain-full) against masked-only.
# fp8:        bf16 against FP8 (torchao: tensorwise, and for DeepSpeed also rowwise and
#             rowwise_with_gw_hp against tensorwise), plain and DeepSpeed, with the loss after
#             $LOSS_STEPS steps on real text from $DATA (a data_prep output with seq_len 1024),
#             micro-batch 8 (the demo corpus holds ~2,030 sequences: none is seen twice).
# profile:    where a step's GPU time goes (matmul, FP8 matmul, attention, compiled kernels,
#             optimizer, ...) for the plain, plain-cudnn, plain-fp8, deepspeed and deepspeed-fp8
#             steps at micro-batch 16.
# attention:  cuDNN's fused attention preferred (train.attention_backend=cudnn) against torch's
#             default (flash first), bf16 and FP8, at micro-batch 16 x accumulation 4; and the loss
#             after $LOSS_STEPS steps on real text with each, as in the fp8 suite.
# Wheels come from .gpu-wheels (bench/gpu/wheels.sh); figures go to $OUT (default runs/gpu-bench)
# as JSON next to the printed tables.
set -euo pipefail
SUITE="${1:-all}"
shift || true
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu-bench}"
DATA="${DATA:-runs/gpu-data}"
# 25 + 200 steps of 8 sequences: 1,800 of the demo corpus's ~2,030 train sequences, each seen once
LOSS_STEPS="${LOSS_STEPS:-200}"
mkdir -p "$OUT"
case "$SUITE" in throughput|fp8|profile|attention|all) ;;
  *) echo "unknown suite '$SUITE': use throughput, fp8, profile, attention or all" >&2; exit 2 ;; esac
if [[ "$SUITE" == fp8 || "$SUITE" == attention || "$SUITE" == all ]] && [[ ! -f "$DATA/manifest.json" ]]; then
  echo "no data_prep output at $DATA (set DATA=...; see bench/gpu/README.md)" >&2; exit 2
fi

if ! "$PY" -c "import deepspeed, torchao, webdataset, yaml" >/dev/null 2>&1; then
  if [[ ! -d .gpu-wheels ]]; then
    echo "deepspeed, torchao, webdataset or yaml is missing here and there is no .gpu-wheels folder: run" \
         "'make gpu-kit' on a machine with pip access and carry .gpu-wheels (see bench/gpu/README.md)" >&2
    exit 2
  fi
  HERE_PY="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  WHEELS_PY="$(cat .gpu-wheels/PYTHON_VERSION 2>/dev/null || echo 3.12)"
  if [[ "$HERE_PY" != "$WHEELS_PY" ]]; then
    echo ".gpu-wheels holds wheels for Python $WHEELS_PY, this is $HERE_PY: rebuild them with" \
         "'bash bench/gpu/wheels.sh --python-version $HERE_PY'" >&2
    exit 2
  fi
  SITE="${TMPDIR:-/tmp}/mdlm-gpu-site"
  "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" .gpu-wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"  # ninja, for JIT ops
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# should DeepSpeed JIT-build an op here, its arch parser rejects suffixed archs such as 9.0a
if [[ -n "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$(sed -E 's/([0-9])a/\1/g' <<< "$TORCH_CUDA_ARCH_LIST")"
  export TORCH_CUDA_ARCH_LIST
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/mdlm-torch-ext}"
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29511}" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, deepspeed, torchao; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1 || true

COMMON=(--preset mdlm-1b --micro-batch 8 --seq-len 1024 --compile)
STATUS=0
bench() {  # a failing run (e.g. out of memory) must not cost the figures of the next ones
  "$PY" bench/train_throughput.py "$@" || { STATUS=1; echo "FAILED: bench/train_throughput.py $*" >&2; }
}
if [[ "$SUITE" == throughput || "$SUITE" == all ]]; then
  echo "== throughput: DeepSpeed vs plain PyTorch (accumulation 4, as in training) =="
  bench "${COMMON[@]}" --micro-batch 16 --grad-accum 4 --steps 8 --warmup 3 \
    --modes plain,deepspeed,deepspeed-unfused,deepspeed-immediate,deepspeed-unaligned,deepspeed-bf16grad,deepspeed-mixed,plain-full \
    --output "$OUT/throughput-accum4.json" "$@"
fi
if [[ "$SUITE" == fp8 || "$SUITE" == all ]]; then
  echo "== fp8: bf16 vs FP8, speed and loss after $LOSS_STEPS steps on $DATA =="
  bench "${COMMON[@]}" --steps 20 --warmup 5 --data "$DATA" \
    --loss-steps "$LOSS_STEPS" --modes plain,plain-fp8,deepspeed,deepspeed-fp8,deepspeed-fp8-rowwise,deepspeed-fp8-rowwisegw \
    --output "$OUT/fp8.json" "$@"
fi
if [[ "$SUITE" == profile || "$SUITE" == all ]]; then
  echo "== profile: device time per step by kernel category =="
  bench "${COMMON[@]}" --micro-batch 16 --steps 3 --warmup 3 --profile 3 \
    --modes plain,plain-cudnn,plain-fp8,deepspeed,deepspeed-fp8 --output "$OUT/profile.json" "$@"
fi
if [[ "$SUITE" == attention || "$SUITE" == all ]]; then
  echo "== attention: cuDNN fused attention preferred vs torch's default order =="
  bench "${COMMON[@]}" --micro-batch 16 --grad-accum 4 --steps 6 --warmup 3 \
    --modes plain,plain-cudnn,deepspeed,deepspeed-cudnn,deepspeed-fp8,deepspeed-fp8-cudnn \
    --output "$OUT/attention.json" "$@"
  bench "${COMMON[@]}" --steps 5 --warmup 5 --data "$DATA" --loss-steps "$LOSS_STEPS" \
    --modes plain,plain-cudnn --output "$OUT/attention-loss.json" "$@"
fi
echo "figures: $OUT"
exit "$STATUS"
