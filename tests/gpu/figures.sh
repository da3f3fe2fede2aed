#!/usr/bin/env bash
# The learner's GPU figures for the README ("Sizing the learner"), in steps that each fit one
# 10-minute call of a lent GPU machine (torch and transformers there, no Ray, no vLLM):
#
#   bash tests/gpu/figures.sh STEP...     # OUT=dir for the JSON (default /tmp/rlrelay-gpu)
#
# Steps: tests (pytest tests/gpu), qwen and llama (the two 0.5B shapes at micro-batch 8,
# compiled, chunked head against the model's own logits), mb16 (both shapes at micro-batch 16),
# packed (ragged rows, padded against packed), profile (top ops of the best option). Each
# bench writes STEP.json and prints one line per option; a failed step does not stop the next.
set -u
out=${OUT:-/tmp/rlrelay-gpu}
mkdir -p "$out"
status=0

bench() {  # bench NAME ARGS...: one cluster.bench_learner run, bounded below the call's limit
    local name=$1
    shift
    timeout 570 python -m cluster.bench_learner "$@" --out "$out/$name.json" 2>"$out/$name.log" \
        || { echo "$name: failed (exit $?), last lines of its log:"; tail -5 "$out/$name.log"; status=1; }
}

for step in "$@"; do
    echo "== $step"
    case $step in
        tests) timeout 570 python -m pytest -q -p no:cacheprovider tests/gpu -s >"$out/tests.log" 2>&1 || status=1
               tail -25 "$out/tests.log" ;;
        qwen) bench qwen --preset 0.5b --micro-batch 8 --options grad_op+compile,grad_op+compile+logits ;;
        llama) bench llama --preset 0.5b-llama --micro-batch 8 --options grad_op+compile,grad_op+compile+logits ;;
        mb16) bench mb16-qwen --preset 0.5b --micro-batch 16 --micro-steps 2 --options grad_op+compile
              bench mb16-llama --preset 0.5b-llama --micro-batch 16 --micro-steps 2 --options grad_op+compile ;;
        packed) bench packed --preset 0.5b --micro-batch 8 --ragged --options grad_op+compile,grad_op+compile+packed ;;
        profile) bench profile --preset 0.5b --micro-batch 8 --steps 1 --profile 25 --options grad_op+compile ;;
        *) echo "unknown step $step (tests, qwen, llama, mb16, packed, profile)"; status=2 ;;
    esac
done
exit $status
