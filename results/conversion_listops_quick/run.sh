#!/bin/bash
set -e
cd /work/main
source .venv/bin/activate
export XLA_FLAGS=--xla_force_host_platform_device_count=2
python train.py --config=configs/listops.py:softmax,quick --workdir=runs/conversion_v3/source_softmax > runs/conversion_v3/source.log 2>&1
python -m luna_jax.experiments.conversion --source runs/conversion_v3/source_softmax \
  --targets learned_kernel,luna,performer,cheap_linear,cosformer,linear_elu \
  --steps 0,100,400 --root runs/conversion_v3 > runs/conversion_v3/study.log 2>&1
echo DONE > runs/conversion_v3/DONE
