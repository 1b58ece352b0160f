#!/usr/bin/env bash
# Continue the embedded model's training on a GPU machine within one fixed time budget: a 20-step
# smoke run of the render workers, a probe of the GPU step rate, then one schedule stage sized to the
# time left, exported to $OUT/model.safetensors with its compact state, logs and samples (OUT: an
# existing folder). Every part runs under a hard time limit that ends it with a Python traceback
# (faulthandler on SIGABRT), so a hang shows where it was instead of only timing out.
# Environment: STATE and BASE_SCHEDULE (the state to continue and the schedule that produced it), STAGE
# (JSON settings of the new stage), DEADLINE (seconds from the start by which the state is saved),
# STEPS (a fixed stage length; skips the probe), SMOKE=0 (skips the smoke run), WORKERS, DEVICE.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 GRADIO_ANALYTICS_ENABLED=False
DEADLINE=${DEADLINE:-540}            # seconds after the start of this script by which the state must be saved
MAX_STEPS_STAGE=${MAX_STEPS_STAGE:-60000}
DEVICE=${DEVICE:-cuda} PROBE_STEPS=${PROBE_STEPS:-400}
STATE=${STATE:-training/state/embedded-last.pt}          # the state to continue from
BASE_SCHEDULE=${BASE_SCHEDULE:-training/embedded_schedule_cpu6h.json}  # its schedule (the committed state is the default model's)
START=$(python3 -c "import torch; print(int(torch.load('$STATE', weights_only=True)['step']))")
STAGE=${STAGE:-'{"lr": 0.002, "part_scale": "1,2,4,2", "batch": 64}'}
echo "start step $START, stage $STAGE"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader || true
python3 -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
nproc --all; df -h /dev/shm | tail -1

write_schedule() {  # $1: steps in the new stage (its lr decays linearly to 10 % over them), $2: output file
python3 -c "
import json; sch = json.load(open('$BASE_SCHEDULE'))
sch['stages'][-1]['until_step'] = $START  # the run so far ends here; the new stage follows
sch['stages'].append(dict(json.loads('$STAGE'), until_step=1000000, decay_start=$START, decay_end=$START + $1))
json.dump(sch, open('$2', 'w'), indent=1)"
}
write_schedule $MAX_STEPS_STAGE /tmp/probe_schedule.json
train() {  # $1 limit (s), $2 log name, $3 out dir, then trainer options
  local limit=$1 name=$2 out=$3; shift 3
  timeout -s ABRT -k 10 $limit python3 -X faulthandler -m training.train_embedded --out $out --resume-state $STATE \
      --threads 2 --save-every-min 100 --eval-every 100 "$@" > $OUT/$name.log 2>&1
  local rc=$?; echo "$name: rc $rc ($SECONDS s since start)"; tail -c 1500 $OUT/$name.log; return $rc
}
# 1. render workers alone (CPU training, 20 steps): do they deliver batches on this machine?
WORKERS=${WORKERS:-14}
[ "${SMOKE:-1}" = 0 ] || train 90 smoke_workers /tmp/smoke_w --device cpu --workers $WORKERS --schedule /tmp/probe_schedule.json \
    --max-steps $((START + 20)) || { WORKERS=0; pkill -f multiprocessing.spawn; }
# 2. probe on the GPU with what worked: the step rate sizes the stage
if [ -n "${STEPS:-}" ]; then n=$STEPS; else
train 120 probe /tmp/probe --device $DEVICE --workers $WORKERS --schedule /tmp/probe_schedule.json \
    --max-steps $((START + PROBE_STEPS)) --save-every-min 100 || { echo "GPU probe failed"; exit 1; }
n=$(python3 -c "
import sys, torch
seconds = lambda path: torch.load(path, weights_only=True, map_location='cpu')['seconds']
per_step = (seconds('/tmp/probe/last.pt') - seconds('$STATE')) / $PROBE_STEPS
left = $DEADLINE - $SECONDS - 60  # start-up, final save and export
print(max(100, min($MAX_STEPS_STAGE, int(left / per_step) // 100 * 100)), end='')
print(f'probe: {per_step * 1000:.1f} ms/step, {left} s left', file=sys.stderr)")
fi
echo "stage steps: $n"
write_schedule $n $OUT/schedule.json
# 3. the stage itself; SIGINT makes the trainer finish its step and save (its workers ignore SIGINT)
minutes=$(python3 -c "import torch; print(torch.load('$STATE', weights_only=True)['seconds'] / 60 + ($DEADLINE - $SECONDS - 40) / 60)")
timeout -s INT -k 30 $((DEADLINE - SECONDS - 20)) python3 -X faulthandler -m training.train_embedded --out /tmp/run \
    --resume-state $STATE --device $DEVICE --workers $WORKERS --threads 2 --schedule $OUT/schedule.json \
    --max-steps $((START + n)) --minutes $minutes --save-every-min 1 --eval-every 1000 \
    --export $OUT/model.safetensors > $OUT/train.log 2>&1
echo "train: rc $? ($SECONDS s since start)"; tail -c 1500 $OUT/train.log
cp /tmp/run/log.jsonl /tmp/run/samples_latest.png $OUT/
python3 -c "
import torch; from training.train_embedded import compact_state
s = torch.load('/tmp/run/last.pt', weights_only=True, map_location='cpu')
torch.save(compact_state(s), '$OUT/embedded-last.pt'); print('state', s['step'], s['images'], s['seconds'])"
