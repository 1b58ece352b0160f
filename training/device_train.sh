#!/usr/bin/env bash
# Continue the embedded model's training on a lent GPU machine (`run` tool of this workplace), then
# sweep drag settings on validation pairs with its CPU cores. Writes everything to $OUT.
# A probe measures the step rate first, so the new stage's length (and its lr decay) fits the time cap.
# Status: tried once (2026-11-26, H200): the probe hung with no output until the call's limit; the
# cause was not found (the same command with 14 workers runs on this 2-core CPU). Since then the
# workers return numpy arrays (torch tensors travel through shared-memory file descriptors, a suspect
# on sandboxed machines) and time out with a clear error (RENDER_TIMEOUT_S); not yet verified on a GPU.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 GRADIO_ANALYTICS_ENABLED=False
TRAIN_SECONDS=${TRAIN_SECONDS:-270}
MAX_STEPS_STAGE=${MAX_STEPS_STAGE:-20000}
START=33979
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader || true
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.is_available())"
STAGE='{"lr": 0.002, "decay_start": 34500, "part_scale": "1,2,4,2", "batch": 32}'
write_schedule() {  # $1: steps in the new stage (its lr decays over them), $2: output file
python3 -c "
import json; sch = json.load(open('training/embedded_schedule.json'))
sch['stages'][-1]['until_step'] = $START  # the shipped run ends here; the GPU stage follows
sch['stages'].append(dict(json.loads('$STAGE'), until_step=1000000, decay_end=$START + $1))
json.dump(sch, open('$2', 'w'), indent=1)"
}
write_schedule $MAX_STEPS_STAGE /tmp/probe_schedule.json
common="--resume-state training/state/embedded-last.pt --device ${DEVICE:-cuda} --workers ${WORKERS:-14} --threads 2 --eval-every 1000"
# the whole probe log goes to $OUT (a hang must leave evidence), with its own time limit
timeout -s INT 150 python3 -X faulthandler -m training.train_embedded --out /tmp/probe $common \
    --schedule /tmp/probe_schedule.json --max-steps $((START + 300)) --save-every-min 100 > $OUT/probe.log 2>&1
tail -c 2000 $OUT/probe.log
n=$(python3 - <<PY
import sys, torch
seconds = lambda path: torch.load(path, weights_only=True, map_location="cpu")["seconds"]
per_step = (seconds("/tmp/probe/last.pt") - seconds("training/state/embedded-last.pt")) / 300
print(min($MAX_STEPS_STAGE, int($TRAIN_SECONDS / per_step) // 100 * 100), end="")
print(f" probe: {per_step * 1000:.1f} ms/step", file=sys.stderr)
PY
)
echo "stage steps: $n"
write_schedule $n $OUT/schedule.json
cat $OUT/schedule.json
timeout -s INT $((TRAIN_SECONDS + 120)) python3 -m training.train_embedded --out /tmp/run $common \
    --schedule $OUT/schedule.json --max-steps $((START + n)) --save-every-min 1 \
    --export $OUT/model.safetensors > $OUT/train.log 2>&1
tail -3 $OUT/train.log
cp /tmp/run/log.jsonl /tmp/run/samples_latest.png $OUT/
python3 -c "
import torch; from training.train_embedded import compact_state
s = torch.load('/tmp/run/last.pt', weights_only=True, map_location='cpu')
torch.save(compact_state(s), '$OUT/embedded-last.pt'); print('state', s['step'], s['images'], s['seconds'])"
# validation sweep on the new model, one config per CPU core (1 thread each)
sweep() { timeout ${SWEEP_SECONDS:-200} python3 -m training.sweep_drag --protocol landmarks --model $OUT/model.safetensors \
    --only none "$@" 2>/dev/null | grep '^{' | sed "s|^|{\"args\": \"$*\", \"row\": |; s|$|}|" >> $OUT/sweep.jsonl; }
for s in "" track_patch=2 r1=2.5 r1=4 stop_distance=0.05 stop_distance=0.2 lr=0.003 lr=0.006 r2=4 track_res=64 \
         feature_res=32; do
  sweep --edits 50 ${s:+--set $s} &
done
for lam in 0.5 1 2 5; do sweep --edits 25 --mask --set lambda_mask=$lam & done
wait
wc -l $OUT/sweep.jsonl
