#!/usr/bin/env bash
# Fine-tuning from self-supervised pretraining vs from scratch on the demo, each arm trained to early stopping
# (docs/pretraining.md, "Measured on the demo"). NRMS (--news_encoder=MHSA --user_encoder=MHSA), seeds 0 1 2, three
# arms per train share, all with the same patience:
#   scratch      --mode=train from random weights, at most $EPOCHS_<share> epochs
#   pretrained   --mode=train --init_from=<this seed's pretraining>, same budget
#   equal        scratch given the pretraining's optimizer steps as extra training: $EXTRA_<share> more epochs, so
#                at least $PRETRAIN_STEPS more steps ($EXTRA_FULL x 212 or $EXTRA_FEW x 22 on the demo; a pretraining
#                on the few-label share has fewer sequences: one epoch of them, 35 steps on the demo at 10%)
# for all train impressions (full) and a seeded $FEW of them (few: --train_fraction=$FEW). Each seed has its own
# pretraining, on the same --train_fraction share as its fine-tuning (same --seed), so a few-label arm's
# pretraining saw no other train click. Every budget is a variable below. Results:
#   $OUT/<arm>-<share>/demo/MHSA-MHSA/#<n>   (arm: scratch | pretrained | equal; share: full | few)
# and the paired table at the end (bench/pretrain_table.py). A finished run is skipped when the script is run
# again ($OUT/done/), so an interrupted measurement goes on where it stopped.
set -euo pipefail
OUT=${OUT:-bench/pretrain_out/converged}
DATA=${DATA:-data}
SEEDS=${SEEDS:-"0 1 2"}
SHARES=${SHARES:-"full few"}                       # which train shares to run, in this order
ARMS=${ARMS:-"scratch pretrained equal"}           # which arms to run, in this order (per seed)
DIMS=${DIMS:-"--head_num=10 --head_dim=10"}         # news dim 100 (NRMS: 20 x 20 = 400): 4x less work on the CPU
LR=${LR:-5e-4}
PATIENCE=${PATIENCE:-2}                             # --early_stopping_epoch, every arm
EPOCHS_FULL=${EPOCHS_FULL:-6}                       # max epochs on all impressions (212 steps of batch 64 each)
EPOCHS_FEW=${EPOCHS_FEW:-20}                        # max epochs on the few-label share (22 steps each at 10%)
FEW=${FEW:-0.1}                                     # --train_fraction of the few-label share
TASKS=${TASKS:-contrastive,next_click,mip}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-100}               # one pretraining epoch, capped at this many steps of batch 64
EXTRA_FULL=${EXTRA_FULL:-1}                         # equal arm, full: epochs added (212 steps >= PRETRAIN_STEPS)
EXTRA_FEW=${EXTRA_FEW:-5}                           # equal arm, few: epochs added (5 x 22 = 110 >= PRETRAIN_STEPS)
COMMON="--dataset=demo --data_dir=$DATA --news_encoder=MHSA --user_encoder=MHSA $DIMS --lr=$LR --no-progress --no-plot --no-tensorboard"
mkdir -p "$OUT/done"

stamp() { date -u +%FT%TZ; }
for share in $SHARES; do
  if [ "$share" = full ]; then frac=""; epochs=$EPOCHS_FULL; extra=$EXTRA_FULL
  else frac="--train_fraction=$FEW"; epochs=$EPOCHS_FEW; extra=$EXTRA_FEW; fi
  for seed in $SEEDS; do
    pre="$OUT/pretrain-$share-s$seed/demo/MHSA-MHSA/pretrain#1/MHSA-MHSA"
    for arm in $ARMS; do
      [ -f "$OUT/done/$arm-$share-$seed" ] && continue
      case $arm in
        scratch)    args="--epoch=$epochs" ;;
        equal)      args="--epoch=$((epochs + extra))" ;;
        pretrained) args="--epoch=$epochs --init_from=$pre"
                    if [ ! -f "$pre" ]; then
                      echo "$(stamp) pretrain $share seed $seed"
                      python main.py --mode=pretrain $COMMON $frac --seed=$seed --output_dir=$OUT/pretrain-$share-s$seed \
                        --pretrain_tasks=$TASKS --epoch=1 --max_steps_per_epoch=$PRETRAIN_STEPS
                    fi ;;
      esac
      echo "$(stamp) $arm $share seed $seed"
      python main.py --mode=train $COMMON $frac $args --early_stopping_epoch=$PATIENCE --seed=$seed \
        --output_dir=$OUT/$arm-$share
      touch "$OUT/done/$arm-$share-$seed"
    done
  done
done
echo "$(stamp) done"
python bench/pretrain_table.py "$OUT"
