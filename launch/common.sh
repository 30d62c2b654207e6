# shellcheck shell=bash
# Shell helpers shared by launch/tpu_pod.sh and launch/gpu.sh (sourced, not run).
# The sourcing script sets PROG (its name, for error messages) first.

# The script's header comment (line 2 up to `set -euo`) as its --help text.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

info() {
  echo "$@" >&2
}

# The words, in single quotes where needed: what DRY_RUN and the hints print (sh and shlex
# read it back as the same words).
show() {
  local word out=() sq="'" esc="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//$sq/$esc}'")
    fi
  done
  printf '%s' "${out[*]}"
}

valid_run_name() {
  [[ $1 =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN=$1: use letters, digits, '.', '_' and '-' only"
}
