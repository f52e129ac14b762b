#!/usr/bin/env bash
# Rebuilds tests/data/store-v1 (schema version 1) with the CLI of commit 26be44e; never rerun with newer code.
set -euo pipefail
S=${1:-tests/data/store-v1}
L="python -m loradar_cli"
K="--model-kwarg channels=[8,8,8,8] --model-kwarg stem_width=8"
$L finetune --store "$S" --name tiny --model test_resnet $K --data digits --epochs 1 --limit 256
$L train --store "$S" --base tiny --name pgd --attack pgd --eps 0.1 --steps 2 --epochs 1 --limit 128 --val-limit 64 --lr 0.01
$L train --store "$S" --base tiny --name fgsm --attack fgsm --eps 0.1 --epochs 1 --limit 128 --val-limit 64 --lr 0.01
$L merge --store "$S" pgd fgsm --name both --method linear
$L trim --store "$S" both --name both-r1 --rank 1
$L attack --store "$S" --base tiny --attack fgsm --eps 0.1 --limit 32 --out "$S.fgsm.safetensors"
$L fit-identifier --store "$S" pgd fgsm --name who --adv-set "$S.fgsm.safetensors" --data digits --limit 32 --epochs 20
rm -f "$S.fgsm.safetensors"
