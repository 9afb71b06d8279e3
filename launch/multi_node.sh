#!/usr/bin/env bash
# Start this machine's share of a multi-machine run with launch/multi_node.yaml, taking the
# per-job values from the environment. It refuses to start when one is missing: accelerate
# would otherwise quietly run a separate one-machine job, or wait forever for a machine rank
# that never comes.
#
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500 \
#   PROCESSES_PER_MACHINE=8 launch/multi_node.sh -m vae_scale.cli train configs/frey_conv.yaml
#
# Run it on every machine with the same values except MACHINE_RANK (0 on MAIN_PROCESS_IP).
# LAUNCH_CONFIG picks another accelerate config (e.g. launch/cpu_2proc.yaml to try it on CPUs);
# ACCELERATE the accelerate executable.
set -euo pipefail

for var in NUM_MACHINES MACHINE_RANK MAIN_PROCESS_IP MAIN_PROCESS_PORT PROCESSES_PER_MACHINE; do
    if [ -z "${!var:-}" ]; then
        echo "launch/multi_node.sh: $var is not set (see launch/README.md)" >&2
        exit 2
    fi
done
for var in NUM_MACHINES MACHINE_RANK MAIN_PROCESS_PORT PROCESSES_PER_MACHINE; do
    if ! [[ ${!var} =~ ^[0-9]+$ ]]; then
        echo "launch/multi_node.sh: $var=${!var} is not a whole number" >&2
        exit 2
    fi
done
if [ "$MACHINE_RANK" -ge "$NUM_MACHINES" ]; then
    echo "launch/multi_node.sh: MACHINE_RANK=$MACHINE_RANK, expected 0..$((NUM_MACHINES - 1))" >&2
    exit 2
fi

exec "${ACCELERATE:-accelerate}" launch \
    --config_file "${LAUNCH_CONFIG:-$(dirname "$0")/multi_node.yaml}" \
    --num_machines "$NUM_MACHINES" \
    --num_processes "$((NUM_MACHINES * PROCESSES_PER_MACHINE))" \
    --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "$MAIN_PROCESS_PORT" \
    "$@"
