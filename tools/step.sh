# Sourced by the scripts in tools/. step TITLE COMMAND...: runs COMMAND, keeps all its output in
# $OUT/log.txt and its Markdown table rows in $SUMMARY (progress bars' carriage returns made
# line ends, so a row printed after a bar is kept), notes its time and any failure there, and
# returns its exit status.
step() {
    local title=$1 tic=$SECONDS rc=0
    shift
    echo "== $title" | tee -a "$SUMMARY"
    "$@" 2>&1 | tr '\r' '\n' | tee -a "$OUT/log.txt" | { grep -E '^\|' || true; } >> "$SUMMARY" || rc=$?
    echo "($((SECONDS - tic)) s$([ "$rc" -eq 0 ] || echo ", exit status $rc"): $*)" | tee -a "$SUMMARY"
    echo >> "$SUMMARY"
    return "$rc"
}
