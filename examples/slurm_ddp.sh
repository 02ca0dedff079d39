#!/bin/bash
# Multi-node QLABGrad training on a SLURM cluster: ResNet-50 on ImageNet, 2 nodes x 4 GPUs.
#
# Lightning's SLURM support does the wiring: srun starts one task per GPU, and Lightning reads
# the rank, world size and master address from SLURM's variables (SLURMEnvironment). On the
# signal below (USR1, two minutes before the time limit) every rank finishes the step in
# progress, last.ckpt is saved, the job is requeued (scontrol requeue) and exits with status 138;
# the requeued job (SLURM_RESTART_COUNT > 0) continues from that step with --ckpt_path last.
# A plain SIGTERM (scancel, preemption by another job) saves last.ckpt the same way (status 143).
#
#   sbatch examples/slurm_ddp.sh /path/to/imagenet [more lightning fit arguments]
#
# The node and GPU counts here, in trainer.num_nodes and in trainer.devices must agree; the
# command line below passes SLURM's own numbers so that editing the #SBATCH lines is enough.
#SBATCH --job-name=qlab-imagenet-resnet50
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one task per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8            # dataloader workers per GPU (data.init_args.num_workers)
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=SIGUSR1@120         # checkpoint and requeue 2 minutes before the time limit
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail
DATA_DIR=${1:?usage: sbatch examples/slurm_ddp.sh /path/to/imagenet}

# Activate the environment that has lightning-qlab installed, e.g.:
# source "$HOME/venvs/qlab/bin/activate"

# The first run starts from scratch; a requeued one continues from the newest last.ckpt under
# the same default_root_dir.
RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    RESUME=(--ckpt_path last)
fi

srun lightning fit \
    --config configs/imagenet_resnet50.yaml \
    --config configs/trainer/slurm.yaml \
    --trainer.num_nodes "$SLURM_JOB_NUM_NODES" \
    --trainer.devices "$SLURM_NTASKS_PER_NODE" \
    --trainer.default_root_dir "runs/$SLURM_JOB_NAME" \
    --data.init_args.data_dir "$DATA_DIR" \
    --data.init_args.num_workers "$SLURM_CPUS_PER_TASK" \
    ${RESUME[@]+"${RESUME[@]}"} \
    "${@:2}"
