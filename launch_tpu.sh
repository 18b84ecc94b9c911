#!/usr/bin/env bash
# launch_tpu.sh: create, provision and drive sam_jax (or T5X) training on a Cloud
# TPU VM (single host or pod slice) through `gcloud compute tpus tpu-vm`, or
# `gcloud compute tpus queued-resources` for the TPU itself with QUEUED=1.
# The usage text is in usage() directly below; `./launch_tpu.sh help` prints it.
set -euo pipefail

PROG=${0##*/}
# T5X is not on PyPI; `setup` with T5X=1 installs it from its repository.
T5X_URL=git+https://github.com/google-research/t5x

usage() {
  cat <<EOF
Usage: $PROG [--dry-run] COMMAND [ARGS]

Drive sam_jax (or T5X) training on a Cloud TPU VM (single host or pod slice)
through 'gcloud compute tpus tpu-vm' (and 'gcloud compute tpus queued-resources'
with QUEUED=1). Commands act on every worker unless noted.

Commands:
  create             create the TPU VM (Spot with SPOT=1, preemptible with PREEMPTIBLE=1);
                     with QUEUED=1, request it as a queued resource instead
  status             describe the TPU VM; with QUEUED=1, the queued resource (its
                     state: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, ...)
  sync               copy the git-tracked files of this repository (with uncommitted
                     edits) into REPO_DIR on every worker; git add new files first;
                     files deleted here are not deleted on the workers
  setup              create VENV if absent, pip install -U pip, pip install -e ".[tpu]"
                     in REPO_DIR; with T5X=1, then pip install T5X (not on PyPI)
                     from $T5X_URL; safe to re-run
  run -- ARGS...     start 'python -m sam_jax.train --gin.MODEL_DIR=\$BUCKET/\$RUN_NAME ARGS...'
                     with nohup on every worker; log: ~/logs/\$RUN_NAME.<hostname>.log;
                     with TRAINER=t5x, 'python -m t5x.train --gin.MODEL_DIR=...
                     --gin_search_paths=REPO_DIR ARGS...' (so --gin_file=gin/t5x/sam.gin
                     resolves; a --gin_search_paths in ARGS replaces it); with
                     TRAINER=reproduce, 'python -m sam_jax.reproduce
                     --gin.OUTPUT_DIR=~/runs/\$RUN_NAME ARGS...' (an experiment grid on
                     the worker's disk: single-host TPUs only; BUCKET is not used)
  logs [--worker=N]  follow the training log of worker N (default 0)
  kill               stop training (sam_jax.train, sam_jax.reproduce or t5x.train) on every
                     worker and free
                     the TPU (kill whatever still holds /dev/accel* or /dev/vfio/*,
                     remove /tmp/libtpu_lockfile)
  delete             delete the TPU VM; with QUEUED=1, delete the queued resource
                     with --force, which deletes its TPU VM first
  help               print this text

Options (before COMMAND):
  --dry-run          print every command, shell-quoted and prefixed '+ ', and run
                     nothing (also DRY_RUN=1); needs no gcloud

Environment (a command needs only the variables it uses):
  TPU_NAME          name of the TPU VM                                 all commands
  ZONE              the TPU's zone, e.g. us-central2-b                 all commands
  PROJECT           Google Cloud project ID                            all commands
  ACCELERATOR_TYPE  TPU type and size, e.g. v4-32, v5litepod-16,       create
                    v5p-8, v6e-8
  BUCKET            GCS bucket for checkpoints, e.g. gs://my-bucket    run
  RUN_NAME          run name (letters, digits, . _ -); MODEL_DIR is    run, logs
                    \$BUCKET/\$RUN_NAME
Optional:
  RUNTIME_VERSION   TPU VM software version; by default Cloud TPU's version for
                    the generation in ACCELERATOR_TYPE: tpu-ubuntu2204-base for
                    v2, v3, v4; v2-alpha-tpuv5-lite for v5e (v5litepod-*);
                    v2-alpha-tpuv5 for v5p; v2-alpha-tpuv6e for v6e
  QUEUED=1          create, status and delete act on a queued resource, which waits
                    in Cloud TPU's queue until capacity is free instead of failing
                    (Google's recommended way, above all for Spot). Opt-in: create
                    then returns before the TPU VM exists (run status until ACTIVE
                    before sync), and delete must know which kind to delete.
  QUEUED_RESOURCE   queued resource ID (default \$TPU_NAME; the TPU VM is \$TPU_NAME)
  SPOT=1, PREEMPTIBLE=1   create a Spot / preemptible TPU (queued resources: Spot only)
  TRAINER           what run starts: sam_jax (default), t5x or reproduce
  RUN_ENV           environment for the trainer on every worker: NAME=VALUE words
                    separated by spaces, e.g. RUN_ENV="SAM_JAX_SPM_PATH=gs://b/spm.model"
                    (the benchmark tasks' vocabulary; values may not contain spaces)
  T5X=1             setup also installs T5X into VENV
  REPO_DIR          repository on the workers (default ~/sam_jax; write '~/...'
                    in quotes so that ~ means the home directory on the TPU)
  VENV              virtualenv on the workers (default ~/sam_jax_venv)
  PYTHON            interpreter for a new VENV (default python3.11; setup installs
                    PYTHON and PYTHON-venv with apt-get if the venv cannot be made)
  DRY_RUN=1         same as --dry-run

Example (the TPU as a queued Spot resource, then a sam_jax and a T5X run):
  export TPU_NAME=sam-v4 ZONE=us-central2-b PROJECT=my-project ACCELERATOR_TYPE=v4-32 \\
         BUCKET=gs://my-bucket RUN_NAME=finetune-1 QUEUED=1 SPOT=1
  $PROG create && $PROG status     # repeat status until state is ACTIVE
  $PROG sync && T5X=1 $PROG setup
  $PROG run -- --gin_file=gin/runs/finetune.gin --gin.TRAIN_STEPS=10
  $PROG logs
  $PROG kill && TRAINER=t5x RUN_NAME=t5x-sam $PROG run -- \\
      --gin_file=t5x/examples/t5/t5_1_1/small.gin --gin_file=t5x/configs/runs/finetune.gin \\
      --gin_file=gin/t5x/sam.gin ...
  $PROG delete
EOF
}

# --- helpers -----------------------------------------------------------------

DRY=0

die() {  # one-line usage error, exit 2
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 2
}

is_true() {
  case ${1:-} in
    1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) return 0 ;;
    *) return 1 ;;
  esac
}

describe() {  # what each required variable is for (used in error messages)
  case $1 in
    TPU_NAME) echo "the name of the TPU VM, e.g. sam-v4-32" ;;
    ZONE) echo "the TPU's zone, e.g. us-central2-b" ;;
    PROJECT) echo "the Google Cloud project ID" ;;
    ACCELERATOR_TYPE) echo "the TPU type and size, e.g. v4-32" ;;
    BUCKET) echo "the GCS bucket for checkpoints, e.g. gs://my-bucket" ;;
    RUN_NAME) echo "the run name; MODEL_DIR is \$BUCKET/\$RUN_NAME, e.g. finetune-1" ;;
    *) echo "required" ;;
  esac
}

require() {  # require VAR...: each must be set and non-empty
  local var
  for var in "$@"; do
    if [[ -z ${!var:-} ]]; then
      die "$var is not set ($(describe "$var"))"
    fi
  done
}

quote_word() {  # quote one word for a POSIX shell, like Python's shlex.quote
  local w=$1 q='' safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $w =~ $safe ]]; then
    printf '%s' "$w"
    return
  fi
  while [[ $w == *\'* ]]; do
    q+="${w%%\'*}'\\''"
    w=${w#*\'}
  done
  printf "'%s'" "$q$w"
}

quote_cmd() {  # quote_cmd WORD...: the words as one pasteable command line
  local w sep=''
  for w in "$@"; do
    printf '%s' "$sep"
    quote_word "$w"
    sep=' '
  done
}

announce() {  # '+ COMMAND': on stdout for --dry-run, else on stderr as a trace
  if ((DRY)); then
    printf '+ %s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
  fi
}

run_cmd() {  # run_cmd CMD ARG...: announce, then run unless --dry-run
  announce "$(quote_cmd "$@")"
  if ((DRY)); then
    return 0
  fi
  "$@"
}

remote_path() {  # a path for the worker's shell: ~ becomes "$HOME", the rest quoted
  local p=$1
  if [[ $p == "~" ]]; then
    printf '%s' "\"\$HOME\""
  elif [[ $p == \~/* ]]; then
    printf '%s/%s' "\"\$HOME\"" "$(quote_word "${p#"~/"}")"
  else
    quote_word "$p"
  fi
}

no_args() {  # no_args COMMAND ARG...: COMMAND takes no arguments
  local cmd=$1
  shift
  if (($#)); then
    die "$cmd takes no arguments (got: $*)"
  fi
}

gcloud_tpu() {  # gcloud_tpu VERB ARG...: a gcloud tpu-vm command on $TPU_NAME
  local verb=$1
  shift
  run_cmd gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" \
    --zone="$ZONE" --project="$PROJECT" "$@"
}

# Queued resources (QUEUED=1). gcloud syntax, as documented in the gcloud
# reference (cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/
# create, describe, delete) and the Cloud TPU guides "Manage queued resources"
# (cloud.google.com/tpu/docs/queued-resources) and "Manage TPU Spot VMs"
# (cloud.google.com/tpu/docs/spot):
#   queued-resources create QUEUED_RESOURCE --node-id=NODE_ID --zone=ZONE
#       --accelerator-type=TYPE --runtime-version=VERSION [--spot] ...
#     (its synopsis has --spot, --guaranteed, --reserved, but no --preemptible)
#   queued-resources describe QUEUED_RESOURCE --zone=ZONE
#   queued-resources delete QUEUED_RESOURCE --zone=ZONE [--async] [--force]
#     (--force deletes the queued resource's TPU VM first; without it the
#     deletion fails while the TPU VM exists)
# The TPU VM a queued resource creates is the node NODE_ID = $TPU_NAME, which
# sync/setup/run/logs/kill reach with `gcloud compute tpus tpu-vm ssh` as usual.
queued() { is_true "${QUEUED:-}"; }

gcloud_queued() {  # gcloud_queued VERB ARG...: a queued-resources command on $QUEUED_RESOURCE
  local verb=$1
  shift
  run_cmd gcloud compute tpus queued-resources "$verb" "${QUEUED_RESOURCE:-$TPU_NAME}" "$@"
}

# Cloud TPU's recommended software version for each TPU generation, from the
# "TPU software versions" page (cloud.google.com/tpu/docs/runtimes), table
# "PyTorch and JAX": Trillium (v6e) v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
# v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base. v5e's
# accelerator types are named v5litepod-N.
default_runtime_version() {  # default_runtime_version ACCELERATOR_TYPE
  case ${1%%-*} in
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
    v5litepod | v5e) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

on_workers() {  # on_workers WORKER COMMAND: run a shell command over ssh
  gcloud_tpu ssh --worker="$1" --command="$2"
}

require_tpu() {
  require TPU_NAME ZONE PROJECT
}

# Remote paths (for the worker's shell) of the repository and the virtualenv.
repo_q() { remote_path "${REPO_DIR:-~/sam_jax}"; }
venv_q() { remote_path "${VENV:-~/sam_jax_venv}"; }

# Matches the training process started by `run` with either trainer (its
# command line begins with the venv's python), but not the `bash -c '...'` shell
# that ssh starts to run this very pattern, whose command line begins with "bash".
# pgrep and pkill read it as an extended regular expression.
TRAIN_PATTERN='^[^ ]*python[0-9.]* .*-m (sam_jax[.](train|reproduce)|t5x[.]train)'

# --- commands ----------------------------------------------------------------

cmd_create() {
  no_args create "$@"
  require_tpu
  require ACCELERATOR_TYPE
  local -a extra=()
  if queued && is_true "${PREEMPTIBLE:-}"; then
    die "PREEMPTIBLE is not available with queued resources (QUEUED=1); use SPOT=1"
  elif is_true "${SPOT:-}" && is_true "${PREEMPTIBLE:-}"; then
    die "SPOT and PREEMPTIBLE are mutually exclusive; set only one"
  elif is_true "${SPOT:-}"; then
    extra=(--spot)
  elif is_true "${PREEMPTIBLE:-}"; then
    extra=(--preemptible)
  fi
  local version=${RUNTIME_VERSION:-}
  if [[ -z $version ]]; then
    if ! version=$(default_runtime_version "$ACCELERATOR_TYPE"); then
      die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE" \
        "(known: v2, v3, v4, v5litepod/v5e, v5p, v6e); set RUNTIME_VERSION"
    fi
    printf '%s: using RUNTIME_VERSION=%s for %s (set RUNTIME_VERSION to override)\n' \
      "$PROG" "$version" "$ACCELERATOR_TYPE" >&2
  fi
  # ${extra[@]+...}: an empty array is "unbound" under set -u in bash < 4.4.
  if queued; then
    gcloud_queued create --node-id="$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" \
      ${extra[@]+"${extra[@]}"}
  else
    gcloud_tpu create --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$version" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_status() {
  no_args status "$@"
  require_tpu
  if queued; then
    gcloud_queued describe --zone="$ZONE" --project="$PROJECT"
  else
    gcloud_tpu describe
  fi
}

cmd_sync() {
  no_args sync "$@"
  require_tpu
  local root tmp remote_tar repo
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  tmp=${TMPDIR:-/tmp}
  # Global, so that the EXIT trap can still see it after this function returns.
  SYNC_TARBALL="${tmp%/}/launch_tpu.$UID.$TPU_NAME.tar.gz"
  remote_tar=launch_tpu_sync.tar.gz  # relative: lands in the worker's home
  repo=$(repo_q)

  # A tarball of exactly the tracked files (working-tree contents, so
  # uncommitted edits are included; untracked and ignored files are not).
  local -a list=(git -C "$root" ls-files -z)
  local -a pack=(tar -czf "$SYNC_TARBALL" -C "$root" --null -T -)
  announce "$(quote_cmd "${list[@]}") | $(quote_cmd "${pack[@]}")"
  if ((!DRY)); then
    # Do not leave the tarball behind if the upload fails.
    trap 'rm -f "$SYNC_TARBALL"' EXIT
    COPYFILE_DISABLE=1 "${list[@]}" | COPYFILE_DISABLE=1 "${pack[@]}"  # no ._* files on macOS
  fi
  run_cmd gcloud compute tpus tpu-vm scp "$SYNC_TARBALL" "$TPU_NAME:$remote_tar" \
    --zone="$ZONE" --project="$PROJECT" --worker=all
  on_workers all "mkdir -p $repo && tar -xzf \"\$HOME\"/$remote_tar -C $repo \
&& rm -f \"\$HOME\"/$remote_tar"
  run_cmd rm -f "$SYNC_TARBALL"
}

cmd_setup() {
  no_args setup "$@"
  require_tpu
  local repo venv py apt script
  repo=$(repo_q)
  venv=$(venv_q)
  py=$(quote_word "${PYTHON:-python3.11}")
  apt="sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q"
  script="test -f $repo/setup.py || { printf '%s: %s not found; run sync first\\n'"
  script+=" \"\$(hostname)\" $repo/setup.py >&2; exit 1; }"
  # The venv counts as present once it has pip: a venv that failed half-way
  # (Ubuntu without pythonX.Y-venv) is completed by running venv again.
  script+=" && if [ ! -x $venv/bin/pip ]; then"
  script+=" $py -m venv $venv || { $apt $py $py-venv && $py -m venv $venv; }; fi"
  script+=" && $venv/bin/python -m pip install -U pip"
  script+=" && cd $repo && $venv/bin/python -m pip install -e '.[tpu]'"
  if is_true "${T5X:-}"; then
    script+=" && $venv/bin/python -m pip install $(quote_word "$T5X_URL")"
  fi
  on_workers all "$script"
}

cmd_run() {
  if (($#)) && [[ $1 != "--" ]]; then
    die "run: put the training arguments after --, e.g. run -- --gin_file=gin/runs/finetune.gin"
  fi
  if (($#)); then
    shift
  fi
  local trainer=${TRAINER:-sam_jax}
  case $trainer in
    sam_jax | t5x | reproduce) ;;
    *) die "TRAINER must be sam_jax, t5x or reproduce (got: $trainer)" ;;
  esac
  require_tpu
  local run_name_re='^[A-Za-z0-9._-]+$' gcs_root
  if [[ $trainer == reproduce ]]; then
    require RUN_NAME
  else
    require BUCKET RUN_NAME
    gcs_root=${BUCKET%/}
    if [[ $gcs_root != gs://?* ]]; then
      die "BUCKET must be a gs:// URL (got: $BUCKET)"
    fi
  fi
  if [[ ! $RUN_NAME =~ $run_name_re ]]; then
    die "RUN_NAME may contain only letters, digits, '.', '_' and '-' (got: $RUN_NAME)"
  fi
  local repo venv log train script
  repo=$(repo_q)
  venv=$(venv_q)
  log="\"\$HOME\"/logs/$RUN_NAME.\$(hostname).log"
  # printf %q quotes each word for the worker's (bash) shell; MODEL_DIR is a
  # gin string, hence the inner single quotes. T5X's train.py turns
  # --gin.NAME=VALUE into a gin binding too, and looks up --gin_file paths in
  # --gin_search_paths (default '.') and then in its own package, so gin/t5x/*.gin
  # resolve in REPO_DIR and t5x/configs/..., t5x/examples/... in T5X.
  case $trainer in
    reproduce) train="$venv/bin/python -u -m sam_jax.reproduce" ;;
    *) train="$venv/bin/python -u -m $trainer.train" ;;
  esac
  if [[ -n ${RUN_ENV:-} ]]; then
    local assignment assignments=()
    read -r -a assignments <<<"$RUN_ENV"
    for assignment in "${assignments[@]}"; do
      if [[ ! $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*=.+$ ]]; then
        die "RUN_ENV must be NAME=VALUE words separated by spaces (got: $assignment)"
      fi
    done
    train="env$(printf ' %q' "${assignments[@]}") $train"
  fi
  if [[ $trainer == reproduce ]]; then
    train+=" --gin.OUTPUT_DIR=\\'\"\$HOME\"/runs/$RUN_NAME\\'"
  else
    train+=" $(printf '%q' "--gin.MODEL_DIR='$gcs_root/$RUN_NAME'")"
  fi
  if [[ $trainer == t5x ]]; then
    train+=" --gin_search_paths=$repo"
  fi
  if (($#)); then
    train+=$(printf ' %q' "$@")
  fi
  script="if pgrep -f '$TRAIN_PATTERN' >/dev/null; then echo \"\$(hostname):"
  script+=" training (sam_jax.train, sam_jax.reproduce or t5x.train) is already running; use"
  script+=" kill first\" >&2; exit 1; fi"
  script+=" && test -x $venv/bin/python || { printf '%s: %s not found; run setup first\\n'"
  script+=" \"\$(hostname)\" $venv/bin/python >&2; exit 1; }"
  script+=" && cd $repo"
  if [[ $trainer == t5x ]]; then
    # find_spec finds the package without importing it (and jax, tensorflow).
    script+=" && { $venv/bin/python -c 'import importlib.util as u, sys;"
    script+=" sys.exit(u.find_spec(\"t5x\") is None)' >/dev/null 2>&1"
    script+=" || { printf '%s: T5X is not installed in %s; run T5X=1 setup first\\n'"
    script+=" \"\$(hostname)\" $venv >&2; exit 1; }; }"
  fi
  script+=" && mkdir -p \"\$HOME\"/logs"
  script+=" && { nohup $train > $log 2>&1 < /dev/null & }"
  script+=" && printf '%s: started pid %s, log %s\\n' \"\$(hostname)\" \"\$!\" $log"
  on_workers all "$script"
}

cmd_logs() {
  local worker=0 arg
  for arg in "$@"; do
    case $arg in
      --worker=*) worker=${arg#--worker=} ;;
      *) die "logs: unknown argument: $arg (expected --worker=N)" ;;
    esac
  done
  if [[ ! $worker =~ ^[0-9]+$ ]]; then
    die "logs: --worker must be a worker number, e.g. --worker=0 (got: $worker)"
  fi
  require_tpu
  require RUN_NAME
  on_workers "$worker" "tail -n 100 -F \"\$HOME\"/logs/$(quote_word "$RUN_NAME").\$(hostname).log"
}

cmd_kill() {
  no_args kill "$@"
  require_tpu
  # SIGTERM the trainer, give it a moment, then SIGKILL whatever still holds
  # the TPU device files and remove libtpu's lock so the next run can start.
  local script="if pkill -f '$TRAIN_PATTERN'; then sleep 5; fi"
  script+="; sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9"
  script+="; sudo rm -f /tmp/libtpu_lockfile"
  on_workers all "$script"
}

cmd_delete() {
  no_args delete "$@"
  require_tpu
  if queued; then
    gcloud_queued delete --zone="$ZONE" --project="$PROJECT" --force --quiet
  else
    gcloud_tpu delete --quiet
  fi
}

main() {
  if is_true "${DRY_RUN:-}"; then
    DRY=1
  fi
  while (($#)); do
    case $1 in
      --dry-run) DRY=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      -*)
        printf '%s: unknown option: %s\n\n' "$PROG" "$1" >&2
        usage >&2
        exit 2
        ;;
      *) break ;;
    esac
    shift
  done
  if (($# == 0)); then
    usage
    exit 0
  fi
  local cmd=$1
  shift
  case $cmd in
    create | status | sync | setup | run | logs | kill | delete) "cmd_$cmd" "$@" ;;
    help) usage ;;
    *)
      printf '%s: unknown command: %s\n\n' "$PROG" "$cmd" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
