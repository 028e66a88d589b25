//! Driving the load: closed-loop clients or open-loop arrivals, warm-up, samples.

use super::*;

#[derive(Debug, Default)]
pub(super) struct Sample {
    /// Start, in seconds from the start of the measurement.
    pub(super) at_s: f64,
    /// Open loop: how long after its scheduled arrival the request started
    /// (the generator's own delay; 0 in the closed loop).
    pub(super) late_ms: f64,
    pub(super) latency_ms: f64,
    pub(super) ttft_ms: Option<f64>,
    pub(super) itl_ms: Vec<f64>,
    pub(super) tokens_out: u32,
    pub(super) ok: bool,
    pub(super) code: Option<tonic::Code>,
    /// Still running at the hard stop (end of the duration plus `--drain-s`)
    /// and cancelled there.
    pub(super) unfinished: bool,
    /// Which of the addresses served it (index into `--addr`).
    pub(super) target: usize,
}

impl Sample {
    /// An answer delta arrived now (the request started at `start`; `last`
    /// holds the previous delta's time): TTFT for the first, ITL after.
    pub(super) fn delta(&mut self, start: Instant, last: &mut Option<Instant>) {
        let now = Instant::now();
        match last {
            None => self.ttft_ms = Some(now.duration_since(start).as_secs_f64() * 1e3),
            Some(prev) => self.itl_ms.push(now.duration_since(*prev).as_secs_f64() * 1e3),
        }
        *last = Some(now);
        self.tokens_out += 1;
    }
}

/// Block the calling thread until about `due`. A sleep overshoots by up to
/// the kernel's timer slack (50 µs by default), so it ends 60 µs short of
/// `due`: arrivals go out up to 60 µs early rather than tens of µs late.
pub(super) fn pace_until(due: Instant) {
    const SLACK: Duration = Duration::from_micros(60);
    let now = Instant::now();
    if due > now + SLACK {
        std::thread::sleep(due - now - SLACK);
    }
}

/// Exponential inter-arrival gaps (seconds) of a Poisson process at `rate`/s.
pub(super) fn arrivals(rate: f64, seed: u64) -> impl Iterator<Item = f64> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exp = (rate > 0.0 && rate.is_finite())
        .then(|| rand_distr::Exp::new(rate).ok())
        .flatten();
    std::iter::from_fn(move || exp.as_ref().map(|e| e.sample(&mut rng)))
}

/// One measured run against `addrs` (clients spread over them in turn):
/// connections opened, `--warmup-s` of unmeasured load, then the measured
/// closed or open loop.
pub(super) async fn drive(
    args: &Args,
    addrs: &[String],
    protocol: Protocol,
    queries: &std::sync::Arc<Vec<String>>,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    anyhow::ensure!(!addrs.is_empty(), "no server address: pass --addr");
    // Laid out address by address in turn, so client `c` (and request `i`
    // of the open loop) goes to address `c % addrs.len()`.
    let mut channels: Vec<(usize, Client)> = Vec::new();
    match protocol {
        Protocol::Grpc => {
            for _ in 0..args.connections {
                for (target, addr) in addrs.iter().enumerate() {
                    channels.push((target, Client::Grpc(connect_for_load(addr).await?)));
                }
            }
        }
        Protocol::Http => {
            // One pool per address; open as many connections as its clients up front.
            for (target, addr) in addrs.iter().enumerate() {
                let pool = crate::http_client::HttpPool::new(addr)?;
                for _ in 0..args.concurrency.div_ceil(addrs.len()) {
                    pool.open().await?;
                }
                channels.push((target, Client::Http(pool)));
            }
        }
    }
    let channel_for = |i: usize| channels[i % channels.len()].clone();
    let budget = args.requests.unwrap_or(usize::MAX);
    let (mode, max_tokens) = (args.mode, args.max_tokens);
    let drain = Duration::from_secs_f64(args.drain_s);
    for i in 0..args.warmup.max(1) * args.connections * addrs.len() {
        let now = Instant::now();
        one(
            channel_for(i).1,
            mode,
            &queries[i % queries.len()],
            max_tokens,
            now,
            None,
            now + drain,
        )
        .await;
    }
    // The load runs from `begin`; what starts before `started` is warm-up.
    // Requests start until `end`; at `stop` the ones still running are cut.
    let begin = Instant::now();
    let started = begin + Duration::from_secs_f64(args.warmup_s);
    let end = started + Duration::from_secs_f64(args.duration);
    let stop = end + drain;
    let mut samples = Vec::new();
    match args.rate {
        Some(rate) => {
            // Open loop: requests start on schedule whether or not earlier
            // ones finished, so queueing shows up in the latencies. The
            // schedule is kept by a plain thread: tokio's timers have 1 ms
            // ticks, which would release the arrivals of each millisecond
            // together (10 at once at 10,000 req/s) instead of spread out.
            // Each request hands its sample back as it finishes, so its task
            // is freed then: holding every task to the end grew the
            // generator by ~4 KB a request, and the page faults of that
            // growth stalled it for milliseconds at a time.
            let runtime = tokio::runtime::Handle::current();
            let channels = channels.clone();
            let (queries, seed) = (queries.clone(), args.seed);
            let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
            let pacer = tokio::task::spawn_blocking(move || {
                let (mut at, mut measured) = (Duration::ZERO, 0usize);
                for (i, gap) in arrivals(rate, seed).enumerate() {
                    at += Duration::from_secs_f64(gap);
                    let due = begin + at;
                    if due > end || measured >= budget {
                        break;
                    }
                    let in_warmup = due < started;
                    measured += usize::from(!in_warmup);
                    pace_until(due);
                    let ((target, channel), queries, done) =
                        (channels[i % channels.len()].clone(), queries.clone(), done.clone());
                    runtime.spawn(async move {
                        let mut sample = one(
                            channel,
                            mode,
                            &queries[i % queries.len()],
                            max_tokens,
                            started,
                            Some(due),
                            stop,
                        )
                        .await;
                        sample.target = target;
                        // The receiver lives until every sender is gone.
                        let _ = done.send((in_warmup, sample));
                    });
                }
                measured
            });
            // Senders are dropped as requests finish: the loop ends after the last.
            let mut cut_in_warmup = 0;
            while let Some((in_warmup, sample)) = finished.recv().await {
                cut_in_warmup += usize::from(in_warmup && sample.unfinished);
                if kept(in_warmup, &sample) {
                    samples.push(sample);
                }
            }
            let measured = pacer.await?;
            anyhow::ensure!(
                samples.len() == measured + cut_in_warmup,
                "{measured} measured requests were sent but {} results came back (a request task panicked)",
                samples.len() - cut_in_warmup
            );
        }
        None => {
            let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for c in 0..args.concurrency {
                let ((target, channel), queries, sent) = (channel_for(c), queries.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut i = c;
                    loop {
                        let now = Instant::now();
                        let in_warmup = now < started;
                        if now >= end
                            || (!in_warmup && sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= budget)
                        {
                            break;
                        }
                        let mut sample = one(
                            channel.clone(),
                            mode,
                            &queries[i % queries.len()],
                            max_tokens,
                            started,
                            None,
                            stop,
                        )
                        .await;
                        sample.target = target;
                        if kept(in_warmup, &sample) {
                            samples.push(sample);
                        }
                        i += 1;
                    }
                    samples
                }));
            }
            for t in tasks {
                samples.extend(t.await?);
            }
        }
    }
    Ok((samples, started.elapsed().as_secs_f64()))
}

/// Whether a sample counts: everything started in the measured duration,
/// and a warm-up request still running at the hard stop (it ran through the
/// measurement without an answer; under overload it may be all there is).
pub(super) fn kept(in_warmup: bool, sample: &Sample) -> bool {
    !in_warmup || sample.unfinished
}
