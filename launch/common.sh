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

# Where launched code comes from, one setting for every launcher (and the notebooks'
# install cell): TTTJAX_SOURCE. Unset, or ".": the checkout this script lives in, built
# into a wheel, so a pod runs exactly the code tested locally. Otherwise anything pip
# installs: a wheel file, a local directory, or "git+URL@REV" of a repository you control.
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

build_wheel() {  # build_wheel OUT_DIR: wheel of TTTJAX_SOURCE (a checkout) into OUT_DIR; prints its path
  local src="${TTTJAX_SOURCE:-.}" out="$1"
  [[ "$src" == "." ]] && src="$ROOT_DIR"
  if [[ "$src" == *.whl ]]; then
    [[ "${DRY_RUN:-0}" == 1 || -f "$src" ]] || die "TTTJAX_SOURCE wheel '$src' not found"
    printf '%s' "$src"; return 0
  fi
  [[ -d "$src" ]] || { printf '%s' "$src"; return 0; }   # a pip spec (git+URL@REV, ...)
  run python3 -m pip wheel -q --no-deps -w "$out" "$src" >&2
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%s' "$out/tttjax-VERSION-py3-none-any.whl"; return 0; fi
  local wheel
  wheel="$(ls -t "$out"/tttjax-*.whl 2>/dev/null | head -n 1)"
  [[ -n "$wheel" ]] || die "building a wheel of $src failed (see pip's output above)"
  printf '%s' "$wheel"
}
