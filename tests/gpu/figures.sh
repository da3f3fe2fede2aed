#!/usr/bin/env bash
# The learner's GPU figures for the README ("Sizing the learner"), in steps that each fit one
# 10-minute call of a lent GPU machine (torch and transformers there, no Ray, no vLLM):
#
#   bash tests/gpu/figures.sh STEP...     # OUT=dir for the JSON (default /tmp/rlrelay-gpu)
#
# Steps, in the order to run them when device time is short: tests (pytest tests/gpu), qwen
# (the Qwen 0.5B shape at micro-batch 8, compiled, chunked head against the model's own logits),
# packed (ragged rows, padded against packed), llama (the Llama 0.5B shape, as qwen), mb16 and
# mb16-llama (micro-batch 16), profile (top ops of the best option). Each bench writes
# STEP.json and prints its line after each option (an option gets 240 s, a step 570 s: a step
# cut short keeps the options it finished); a failed step does not stop the next.
# PYTHON=... picks the interpreter (default python3).
set -u
out=${OUT:-/tmp/rlrelay-gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
status=0

bench() {  # bench NAME ARGS...: one cluster.bench_learner run, bounded below the call's limit
    local name=$1
    shift
    timeout 570 "$py" -m cluster.bench_learner "$@" --timeout 240 --out "$out/$name.json" 2>"$out/$name.log" \
        || { echo "$name: failed (exit $?), last lines of its log:"; tail -5 "$out/$name.log"; status=1; }
}

for step in "$@"; do
    echo "== $step"
    case $step in
        tests) timeout 570 "$py" -m pytest -q -p no:cacheprovider tests/gpu -s >"$out/tests.log" 2>&1 || status=1
               tail -25 "$out/tests.log" ;;
        qwen) bench qwen --preset 0.5b --micro-batch 8 --options grad_op+compile,grad_op+compile+logits ;;
        llama) bench llama --preset 0.5b-llama --micro-batch 8 --options grad_op+compile,grad_op+compile+logits ;;
        mb16) bench mb16-qwen --preset 0.5b --micro-batch 16 --micro-steps 2 --options grad_op+compile ;;
        mb16-llama) bench mb16-llama --preset 0.5b-llama --micro-batch 16 --micro-steps 2 --options grad_op+compile ;;
        packed) bench packed --preset 0.5b --micro-batch 8 --ragged --options grad_op+compile,grad_op+compile+packed ;;
        profile) bench profile --preset 0.5b --micro-batch 8 --steps 1 --profile 25 --options grad_op+compile ;;
        *) echo "unknown step $step (tests, qwen, packed, llama, mb16, mb16-llama, profile)"; status=2 ;;
    esac
done
exit $status
