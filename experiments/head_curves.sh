#!/usr/bin/env bash
# Trains one LM per output head under one recipe and the same training-time budget, for
# plot_heads.py's perplexity-against-time picture (issue 15; WORKSPACE_NOTES.md).
#
#   bash experiments/head_curves.sh CORPUS BUDGET_SECONDS EVAL_EVERY_SECONDS HEAD...
#   e.g. bash experiments/head_curves.sh wikitext2 480 120 full class hsm adaptive nce sampled
#
# Recipe: one-layer Elman RNN, 200 hidden, embedding 200 (untied), dropout 0.3, batch 20 x
# 35 steps, Adam 2e-3, clip 1, token-mean loss; each head with its default options. Each
# run trains for BUDGET_SECONDS of training time (--time_budget: evaluation and
# checkpointing not counted, compilation counted), evaluates validation every
# EVAL_EVERY_SECONDS of it, then exact validation and test perplexity. Runs go to
# ${RUNS_DIR:-runs}/heads_CORPUS_HEAD; a finished one (results.json) is skipped, an interrupted one
# resumes. Set PIN="taskset -c 1" to run on one core (as the recorded runs did).
set -euo pipefail
corpus=$1 budget=$2 every=$3
shift 3
cd "$(dirname "$0")/.."
for head in "$@"; do
  workdir=${RUNS_DIR:-runs}/heads_${corpus}_${head}
  if [[ -f $workdir/results.json ]]; then
    echo "== $head: $workdir/results.json exists, skipped"
    continue
  fi
  echo "== $head -> $workdir"
  ${PIN:-} python3 experiments/train_lm.py --corpus="$corpus" --head="$head" \
    --cell=elman --layers=1 --hidden=200 --embed=200 --dropout=0.3 \
    --batch_size=20 --bptt=35 --optimizer=adam --lr=0.002 --clip=1 \
    --grad_reduction=token_mean --eval_batch_size=10 --epochs=1000 \
    --time_budget="$budget" --eval_every_seconds="$every" \
    --log_every=100 --checkpoint_every=100000 --workdir="$workdir"
done
