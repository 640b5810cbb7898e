# Helpers shared by the side-by-side bench scripts in this folder (sourced, not run).

# CPU clock ticks (user + system) used so far by these processes; one already gone counts 0.
ticks() {
    local t=0 v p
    for p in "$@"; do
        v=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || true)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# The median of the numbers on standard input, one a line.
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
