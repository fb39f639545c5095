#!/usr/bin/env bash
# Fine-tuning from self-supervised pretraining vs from scratch on the demo (docs/pretraining.md): NRMS (MHSA-MHSA)
# and MHSA-MINER, all train impressions and 10% of them (--train_fraction=0.1), seeds 0 1 2, one pretraining run per
# model (seed 0). Every budget is a variable below; both arms of a comparison get the same one. Results:
#   $OUT/<arm>-<fraction>/demo/<model>/#<n>   (arm: scratch | pretrained; fraction: full | 10pct)
# then `python main.py --mode=aggregate --output_dir=$OUT/<arm>-<fraction>` per folder, and the paired table printed
# at the end (bench/pretrain_table.py).
set -euo pipefail
OUT=${OUT:-bench/pretrain_out}
DATA=${DATA:-data}
SEEDS=${SEEDS:-"0 1 2"}
MODELS=${MODELS:-"MHSA MINER"}                      # user encoders, each with --news_encoder=MHSA
DIMS=${DIMS:-"--head_num=10 --head_dim=10"}         # news dim 100 (NRMS: 20 x 20 = 400): 4x less work on the CPU
LR=${LR:-5e-4}
TASKS=${TASKS:-contrastive,next_click,mip}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-1}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-100}               # steps of batch 64 per pretraining epoch, at most
FULL_STEPS=${FULL_STEPS:-40}                        # fine-tuning on all impressions: 1 epoch capped at this
FRACTION_EPOCHS=${FRACTION_EPOCHS:-2}               # fine-tuning on 10%: this many full epochs (21 steps each)
COMMON="--dataset=demo --data_dir=$DATA --news_encoder=MHSA $DIMS --lr=$LR --no-progress --no-plot --no-tensorboard"

for ue in $MODELS; do
  model="MHSA-$ue"
  pre="$OUT/pretrain/demo/$model/pretrain#1/$model"
  if [ ! -f "$pre" ]; then
    python main.py --mode=pretrain $COMMON --user_encoder=$ue --output_dir=$OUT/pretrain --seed=0 \
      --pretrain_tasks=$TASKS --epoch=$PRETRAIN_EPOCHS --max_steps_per_epoch=$PRETRAIN_STEPS
  fi
  for frac in full 10pct; do
    if [ $frac = full ]; then budget="--epoch=1 --max_steps_per_epoch=$FULL_STEPS"
    else budget="--train_fraction=0.1 --epoch=$FRACTION_EPOCHS --early_stopping_epoch=$FRACTION_EPOCHS"; fi
    for seed in $SEEDS; do
      python main.py --mode=train $COMMON --user_encoder=$ue $budget --seed=$seed --output_dir=$OUT/scratch-$frac
      python main.py --mode=train $COMMON --user_encoder=$ue $budget --seed=$seed --output_dir=$OUT/pretrained-$frac \
        --init_from="$pre"
    done
  done
done
python bench/pretrain_table.py "$OUT"
