# Shared by the launch scripts: option parsing helpers, dry-run, early failure.
# Sourced, not executed.

die() {  # one-line error, exit code 2 (the project's convention for bad input)
  echo "error: $*" >&2
  exit 2
}

need_cmd() {  # need_cmd TOOL HINT: fail early unless TOOL is on PATH (skipped in dry-run)
  [[ "${DRY_RUN:-0}" == 1 ]] && return 0
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH; $2"
}

need_var() {  # need_var NAME HINT: fail early unless NAME is set and non-empty
  [[ -n "${!1:-}" ]] || die "$1 is not set; $2"
}

run() {  # print the command; execute it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

quote_args() {  # quote_args ARGS...: one shell-safe string (for remote --command strings)
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  printf '%s' "${out% }"
}
