// PM2 ecosystem file for scripts/bench.sh (cluster mode, BENCH_WORKERS instances).
'use strict';
module.exports = {
  apps: [{
    name: 'bench',
    script: __dirname + '/pm2-app.js',
    exec_mode: 'cluster',
    instances: Number(process.env.BENCH_WORKERS || 2),
    autorestart: true,
    watch: false,
    env: { PORT: process.env.BENCH_PORT || '8080', HOST: '127.0.0.1', NODE_ENV: 'production' },
  }],
};
