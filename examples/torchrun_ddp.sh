#!/bin/bash
# Multi-node QLABGrad training launched with torchrun (no cluster scheduler needed).
# Lightning recognises torchrun's environment variables and joins the process group it sets up.
# On SIGTERM (passed on to every worker by torchrun) each rank finishes the step in progress,
# last.ckpt is saved and the workers exit with status 143; continue with the same command and
# --ckpt_path last.
#
# Run the same command on every machine, with NODE_RANK=0 on the one at MASTER_ADDR:
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash examples/torchrun_ddp.sh /path/to/imagenet
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash examples/torchrun_ddp.sh /path/to/imagenet
#
# One machine, all its GPUs: NNODES=1 bash examples/torchrun_ddp.sh /path/to/imagenet
# (or simply: lightning fit --config ... --config configs/trainer/ddp.yaml, which starts the
# processes itself). Arguments after the data folder go to `lightning fit`. A try-out on CPUs:
#   NNODES=1 GPUS_PER_NODE=2 ACCELERATOR=cpu CONFIG=configs/mnist_mlp.yaml \
#       bash examples/torchrun_ddp.sh data --trainer.precision 32-true --trainer.max_epochs 1
set -euo pipefail
DATA_DIR=${1:?usage: bash examples/torchrun_ddp.sh /path/to/imagenet}
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATOR=${ACCELERATOR:-gpu}
CONFIG=${CONFIG:-configs/imagenet_resnet50.yaml}

torchrun \
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m lightning_qlab.cli fit \
    --config "$CONFIG" \
    --config configs/trainer/ddp.yaml \
    --trainer.accelerator "$ACCELERATOR" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$GPUS_PER_NODE" \
    --data.init_args.data_dir "$DATA_DIR" \
    "${@:2}"
