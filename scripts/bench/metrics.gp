# The panels of scripts/grafana-dashboard.json, drawn from scrapes of the metrics endpoint
# (scripts/bench/metrics-dashboard.sh runs the load and writes the table with
# scripts/bench/metrics-samples.py: one row a second, rates over that second).
#   gnuplot -e "in='samples.dat'; out='metrics.png'" scripts/bench/metrics.gp
set terminal pngcairo size 1500,1250 font ",9"
set output out
set datafile missing "nan"
set key top left font ",8" opaque
set grid
set xrange [0:*]
set xlabel "seconds" offset 0,0.5
# The events of the run: a reload, a SIGKILLed worker, a panicking request.
set arrow 1 from 17, graph 0 to 17, graph 1 nohead dt 2 lc rgb "#888888"
set arrow 2 from 23, graph 0 to 23, graph 1 nohead dt 2 lc rgb "#cc0000"
set arrow 3 from 28, graph 0 to 28, graph 1 nohead dt 2 lc rgb "#aa6600"
set label 1 "reload" at 17.3, graph 0.93 font ",8" tc rgb "#666666"
set label 2 "kill -9" at 23.3, graph 0.93 font ",8" tc rgb "#cc0000"
set label 3 "panic" at 28.3, graph 0.93 font ",8" tc rgb "#aa6600"
set multiplot layout 4,3 title "app metrics endpoint, scraped once a second: 2 workers, wrk -c8 then -c64, reload at 17 s, worker SIGKILLed at 23 s, /chaos/panic at 28 s" font ",11"
set title "Requests/s by status class"
plot in using "t":"rps_2xx" with lines lw 2 title "2xx", '' using "t":"rps_other" with lines title "other"
set title "Request duration p50 / p99 (ms, from the histogram; first bucket 0.1 ms)"
set yrange [0:*]
plot in using "t":"p50_ms" with linespoints pt 7 ps 0.5 title "p50", '' using "t":"p99_ms" with linespoints pt 7 ps 0.5 title "p99"
set title "Requests/s per worker (fairness)"
plot in using "t":"w0_rps" with lines lw 2 title "worker 0", '' using "t":"w1_rps" with lines lw 2 title "worker 1"
set title "Open connections, by protocol and by worker"
plot in using "t":"http1" with steps lw 2 lc rgb "black" title "http1", '' using "t":"http2" with steps lc rgb "#56b4e9" title "http2", \
     '' using "t":"upgraded" with steps lc rgb "#e69f00" title "upgraded", \
     '' using "t":"w0_conns" with steps dt 2 lw 2 lc rgb "#9400d3" title "worker 0", '' using "t":"w1_conns" with steps dt 2 lw 2 lc rgb "#009e73" title "worker 1"
set title "Worker restarts by cause (increase since start)"
set yrange [0:*]
plot in using "t":"crash" with steps lw 2 title "crash", '' using "t":"hang" with steps title "hang", '' using "t":"panic" with steps lw 2 title "panic", \
     '' using "t":"memory" with steps title "memory", '' using "t":"requests" with steps title "requests", '' using "t":"reload" with steps lw 2 title "reload", \
     '' using "t":"scale" with steps title "scale"
set title "Reloads (increase) and mean duration"
set key bottom right
set y2tics
set y2range [0:*]
set ytics nomirror
plot in using "t":"reloads_ok" with steps lw 2 title "ok", '' using "t":"reloads_failed" with steps title "failed", '' using "t":"reload_mean_ms" axes x1y2 with lines dt 3 title "mean duration, ms (right)"
unset y2tics
set ytics mirror
set key top left
set title "CPU per worker (CPU seconds / s)"
plot in using "t":"w0_cpu" with lines lw 2 title "worker 0", '' using "t":"w1_cpu" with lines lw 2 title "worker 1"
set title "PSS per worker (MiB)"
plot in using "t":"w0_pss_mib" with lines lw 2 title "worker 0", '' using "t":"w1_pss_mib" with lines lw 2 title "worker 1"
set title "Heartbeat round trip (ms)"
plot in using "t":"w0_rtt_ms" with lines lw 2 title "worker 0", '' using "t":"w1_rtt_ms" with lines lw 2 title "worker 1"
set title "Bytes in / out (KiB/s)"
plot in using "t":"in_kib_s" with lines lw 2 title "in", '' using "t":"out_kib_s" with lines lw 2 title "out"
set title "Restart budget used / limit, generation"
plot in using "t":"budget_used" with steps lw 2 title "used", '' using "t":"budget_limit" with steps title "limit", '' using "t":"generation" with steps lw 2 title "generation"
set title "Accepted connections/s per worker"
plot in using "t":"w0_accepts" with lines lw 2 title "worker 0", '' using "t":"w1_accepts" with lines lw 2 title "worker 1"
unset multiplot
