# gnuplot script for scripts/bench.sh.
# Variables (pass with -e): outfile, datadir, servers (space-separated names), title.
# Each datadir/NAME.dat has columns: conns  rps_keepalive  p99ms_keepalive  rps_close  p99ms_close
# ("NaN" where a figure is missing).
if (!exists("title")) title = "scripts/bench.sh"
if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {
    set terminal pngcairo size 1400,1000 enhanced font "DejaVu Sans,11" linewidth 1.5
} else {
    set terminal png size 1400,1000
}
set output outfile
set datafile missing "NaN"
set grid
set logscale x 2
set xlabel "concurrent connections"
set key top left box opaque
set style data linespoints
set pointsize 1.3
set format y "%g"
set multiplot layout 2,2 title title font ",13"

set title "requests/s, keep-alive (higher is better)"
set ylabel "req/s"
set yrange [0:*]
plot for [s in servers] datadir."/".s.".dat" using 1:2 title s

set title "p99 latency, keep-alive (lower is better)"
set ylabel "p99 (ms)"
set logscale y 10
set yrange [*:*]
plot for [s in servers] datadir."/".s.".dat" using 1:3 title s
unset logscale y

set title "requests/s = connections/s, no keep-alive (Connection: close)"
set ylabel "req/s"
set yrange [0:*]
plot for [s in servers] datadir."/".s.".dat" using 1:4 title s

set title "p99 latency, no keep-alive"
set ylabel "p99 (ms)"
set logscale y 10
set yrange [*:*]
plot for [s in servers] datadir."/".s.".dat" using 1:5 title s
unset multiplot
