#!/bin/bash
# Issue 10 on a CPU: the hierarchical VAE against the ResNet VAE at equal cost, side by side
# (one core each, same data, batch, learning-rate schedule and epochs). The shared CIFAR-10
# files shard into 9,000 train / 1,000 val / 10,000 test images.
#
#   VAE_SCALE_DATA=../shared/data bash benchmarks/hvae_vs_resnet_cpu.sh [OUT]   (OUT=/tmp/h_cmp)
#
# Then: python benchmarks/sharpness.py OUT/runs/{resnet,hvae}/samples_epoch005.png
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/h_cmp}
export OMP_NUM_THREADS=1
[ -f "$OUT/shards/cifar10/index.json" ] || .venv/bin/vae-scale shard cifar10 --out "$OUT/shards" --shard-size 500
COMMON=(data.shards_dir="$OUT/shards" run.dir="$OUT/runs" data.batch_size=32 data.num_workers=0
  data.cache_in_memory=true train.epochs=5 train.lr=2e-3 train.lr_schedule=cosine
  train.warmup_steps=20 train.mixed_precision=no train.log_every_steps=10
  eval.picture_epochs=[1,5] eval.every_epochs=1 wandb.mode=offline)
.venv/bin/vae-scale train configs/cifar10_resnet.yaml "${COMMON[@]}" run.name=resnet \
  model.widths=[16,32,64] model.blocks_per_stage=2 model.groups=8 > "$OUT/resnet.log" 2>&1 &
.venv/bin/vae-scale train configs/cifar10_hvae.yaml "${COMMON[@]}" run.name=hvae \
  model.widths=[64,64,64,32,16] model.latent_groups=[1,2,2,2,1] model.encoder_blocks=[1,2,2,2,1] \
  model.latent_channels=8 model.bottleneck=0.5 train.betas=[0.9,0.999] train.weight_decay=0 \
  train.ema_decay=0 loss.kl_warmup_steps=100 > "$OUT/hvae.log" 2>&1 &
wait
for run in resnet hvae; do tr '\r' '\n' < "$OUT/$run.log" | grep -a "^epoch [0-9]*: " || true; done
