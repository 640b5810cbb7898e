# Renders target/bench/metrics-samples.csv (scrapes of the metrics endpoint, one a second,
# during a wrk run: time, requests, count <= 0.5 ms, histogram count, worker 0, worker 1)
# as the dashboard's first panels would: req/s, per-worker req/s, share of answers <= 0.5 ms.
#   gnuplot -e "in='target/bench/metrics-samples.csv'; out='scripts/bench/results/metrics.png'" scripts/bench/metrics.gp
set terminal pngcairo size 1100,420 font ",10"
set output out
set multiplot layout 1,2 title "app metrics endpoint, scraped once a second during wrk -c64 (2 workers)"
set xlabel "seconds"
set ylabel "requests/s"
set key top left
set grid
prev_t = NaN; prev_r = NaN; prev_0 = NaN; prev_1 = NaN
rate(t, v, p) = (p != p) ? NaN : v - p
plot in using 1:(r = ($2 - prev_r) / ($1 - prev_t), prev_r = $2, prev_t = $1, r) with linespoints title "pool: rate(app\\_http\\_requests\\_total)", \
     in using 1:(a = ($5 - prev_0), prev_0 = $5, a) with lines title "worker 0 (per scrape)", \
     in using 1:(b = ($6 - prev_1), prev_1 = $6, b) with lines title "worker 1 (per scrape)"
set ylabel "share of requests"
set yrange [0:1.05]
plot in using 1:($3 / $4) with linespoints title "le=0.5 ms / count (cumulative)"
unset multiplot
