#!/usr/bin/env bash
# Download the two GPTQ-INT4 models that TGI serves into models/, where
# docker-compose.yml mounts them (./models -> /models, read-only):
#
#   models/Qwen2-7B-Instruct-GPTQ-Int4             ~5.6 GB  (Qwen/Qwen2-7B-Instruct-GPTQ-Int4)
#   models/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4    ~5.7 GB  (hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4)
#
# About 11.3 GB in all; keep 12 GB free. Only the GPU profile needs them (the
# CPU profile's model is inside its image).
#
# Usage: models/download.sh [--git] [qwen2|llama3|all]   (default: all)
#   default  the Hugging Face CLI (`hf download`, or the older
#            `huggingface-cli download`): pip install -U huggingface_hub
#   --git    git clone with git-lfs, as the original guide did
#            (apt install git-lfs && git lfs install)
#
# Environment: HF_TOKEN, a Hugging Face token, if the Hub asks for one (Meta's
# Llama 3.1 licence must be accepted on the model's page first); REVISION, a
# branch, tag or commit to pin (default: main).
# Run again after an interruption: the CLI resumes, and a finished model is
# skipped.
set -euo pipefail

MODELS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REVISION="${REVISION:-main}"
NEEDED_KB=$((12 * 1024 * 1024))

# id    repository on the Hub    folder under models/    size
MODELS=(
  "qwen2 Qwen/Qwen2-7B-Instruct-GPTQ-Int4 Qwen2-7B-Instruct-GPTQ-Int4 5.6GB"
  "llama3 hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4 Meta-Llama-3.1-8B-Instruct-GPTQ-INT4 5.7GB"
)

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

method=cli
want=all
for arg in "$@"; do
  case "$arg" in
    --git) method=git ;;
    -h | --help) usage 0 ;;
    qwen2 | llama3 | all) want="$arg" ;;
    *)
      echo "unknown argument: $arg" >&2
      usage 2
      ;;
  esac
done

log() { echo "[download] $*"; }

# A model is complete when its config and every weight shard are there.
complete() {
  local dir="$1"
  [[ -f "$dir/config.json" ]] || return 1
  compgen -G "$dir/*.safetensors" >/dev/null || return 1
  if [[ -f "$dir/model.safetensors.index.json" ]]; then
    local shard
    for shard in $(grep -o '"[^"]*\.safetensors"' "$dir/model.safetensors.index.json" | tr -d '"' | sort -u); do
      [[ -s "$dir/$shard" ]] || return 1
    done
  fi
}

download_cli() {
  local repo="$1" dir="$2" cli
  if command -v hf >/dev/null 2>&1; then
    cli=(hf download)
  elif command -v huggingface-cli >/dev/null 2>&1; then
    cli=(huggingface-cli download)
  else
    echo "neither 'hf' nor 'huggingface-cli' found: pip install -U huggingface_hub, or use --git" >&2
    exit 1
  fi
  "${cli[@]}" "$repo" --revision "$REVISION" --local-dir "$dir"
}

download_git() {
  local repo="$1" dir="$2"
  command -v git-lfs >/dev/null 2>&1 || {
    echo "git-lfs not found: apt install git-lfs && git lfs install" >&2
    exit 1
  }
  if [[ -d "$dir/.git" ]]; then
    git -C "$dir" fetch origin "$REVISION"
    git -C "$dir" checkout FETCH_HEAD
    git -C "$dir" lfs pull
  else
    git clone --branch "$REVISION" "https://huggingface.co/$repo" "$dir"
  fi
}

free_kb="$(df -Pk "$MODELS_DIR" | awk 'NR == 2 { print $4 }')"
if ((free_kb < NEEDED_KB)); then
  log "warning: $((free_kb / 1024 / 1024)) GB free in $MODELS_DIR; the two models need about 12 GB"
fi

for entry in "${MODELS[@]}"; do
  read -r id repo folder size <<<"$entry"
  [[ "$want" == all || "$want" == "$id" ]] || continue
  dir="$MODELS_DIR/$folder"
  if complete "$dir"; then
    log "$folder: already complete, skipped"
    continue
  fi
  log "$folder: downloading $repo@$REVISION (~$size) with $method"
  "download_$method" "$repo" "$dir"
  complete "$dir" || {
    echo "$folder: download finished but config.json or a weight shard is missing" >&2
    exit 1
  }
  log "$folder: done, $(du -sh "$dir" | cut -f1)"
done
