#!/usr/bin/env bash
# The GPU-host checks in one call, for a lent GPU machine with no network and a
# python3 that holds torch (Ubuntu 24.04, driver 580, CUDA 13.0):
#   1. gpu-smoke --require-gpu --json on the healthy GPU (model, figures, duration)
#   2. the same with a threshold no GPU reaches: fails, naming the check
#   3. the same with CUDA_VISIBLE_DEVICES="": fails with a one-line reason
#   4. the VM playbook in check mode on this host (--target local --check) with
#      a stack matching it: what is present, what it would add, then gpu-smoke
#   5. the GPU test module (tests/gpu)
# Prepare here: scripts/device-wheels.sh (ansible-core and what it needs, into
# .whl/). Run there: scripts/device-check.sh, carrying .whl. Each step's output
# goes to $OUT/<step>.txt (OUT defaults to ./device-out); a table comes last.
# Environment: DEVICE_CHECK_OS (ubuntu-24.04), DEVICE_CHECK_VARS ("--var cuda=13.0";
# set it empty for the stack as it is).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  if python3 -m pip --version >/dev/null 2>&1; then
    install=(python3 -m pip install -q --no-compile --no-cache-dir --upgrade)
  else # a uv venv (as in gpubake's own images) has no pip
    install=(uv pip install -q --python python3)
  fi
  "${install[@]}" --no-index --no-deps --target /tmp/site .whl/*.whl ||
    { echo "device-check: the wheels in .whl did not install" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
fi

os_key=${DEVICE_CHECK_OS:-ubuntu-24.04}
read -r -a stack_vars <<<"${DEVICE_CHECK_VARS---var cuda=13.0}"
results=()

# step NAME SECONDS EXPECTED_RC COMMAND...: run COMMAND with a time limit, keep its
# output in $out/NAME.txt, record whether it exited as expected and how long it took
step() {
  local name=$1 limit=$2 want=$3
  shift 3
  local start rc verdict
  start=$(date +%s%N)
  echo "=== $name: $*" >&2
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  rc=$?
  verdict=ok
  [ "$rc" = "$want" ] || verdict="UNEXPECTED (wanted exit $want)"
  results+=("$(printf '%-15s exit %-3s %5ss  %s' "$name" "$rc" \
    $((($(date +%s%N) - start) / 1000000000)) "$verdict")")
  tail -n 40 "$out/$name.txt" >&2
}

{
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, torch.version.cuda)'
  dpkg-query -W -f='${Package} ${Version}\n' 'cuda-*' 'libcudnn*' 'nvidia-*' 'libnccl*' 2>/dev/null
  command -v nvcc && nvcc --version
  cat /etc/os-release
} >"$out/host.txt" 2>&1

# limits sum to under 9 minutes, so that one device call (10 at most) holds them all
step smoke-healthy 75 0 python3 -m gpubake smoke --require-gpu --json
step smoke-threshold 75 1 python3 -m gpubake smoke --require-gpu --json --threshold 5
step smoke-hidden 45 1 env CUDA_VISIBLE_DEVICES= python3 -m gpubake smoke --require-gpu
step vm-check 210 0 python3 build.py --target local --check --os "$os_key" "${stack_vars[@]}"
step pytest-gpu 120 0 python3 -m pytest -p no:cacheprovider -v tests/gpu

echo "--- device-check: outputs in $out" >&2
printf '%s\n' "${results[@]}" | tee "$out/summary.txt"
! grep -q UNEXPECTED "$out/summary.txt"
