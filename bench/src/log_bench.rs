//! `flywheel-bench log`: what the request log costs per record, in process.
//!
//! Records shaped like the server's (a route-only record with five expert
//! scores and a topic verdict; a chat record with four retrieved passages
//! and a ~400-character answer) go through [`RequestLog`] as the server
//! hands them over, in chunks, each chunk flushed before the next: the time
//! per record is the writer's own cost (JSON columns, SQLite inserts, WAL
//! commits and checkpoints), without the scheduling noise of a loaded server.
//! Then the flush latency: small batches (16 route records, a busy server's
//! batch at its flush interval) each committed and waited for, as p50/p99.
//!
//! `--store-url postgres://...` measures the PostgreSQL store instead (the
//! database's own CPU is not in the per-record CPU, which is this process's).

use std::path::PathBuf;
use std::time::Instant;

use flywheel_router::agents::{ExpertScore, RouteDecision};
use flywheel_router::config::LogSpec;
use flywheel_router::data::log::{RequestLog, RequestRecord, RetrievedRef};
use flywheel_router::guardrails::RailVerdict;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Records of each kind.
    #[arg(long, default_value_t = 100_000)]
    pub records: usize,
    /// Records submitted before each flush.
    #[arg(long, default_value_t = 4096)]
    pub chunk: usize,
    /// Records per transaction at most (the server's `log.batch_size`).
    #[arg(long, default_value_t = flywheel_router::config::DEFAULT_LOG_BATCH)]
    pub batch_size: usize,
    /// Database file (deleted first, with its WAL).
    #[arg(long, default_value = "var/bench/log-bench.db")]
    pub db: PathBuf,
    /// Measure a PostgreSQL store (an empty database) instead of the file.
    #[arg(long, env = "FLYWHEEL_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
    /// Batches of the flush-latency phase.
    #[arg(long, default_value_t = 1000)]
    pub flushes: usize,
    /// Write the report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Phase {
    kind: &'static str,
    records: usize,
    records_per_second: f64,
    wall_us_per_record: f64,
    /// Process CPU time per record (all threads), where the OS reports it.
    cpu_us_per_record: Option<f64>,
    written: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    /// `sqlite` or `postgres`.
    store: &'static str,
    phases: Vec<Phase>,
    /// Flush latency of a batch of [`FLUSH_BATCH`] records (ms).
    flush_p50_ms: f64,
    flush_p99_ms: f64,
    /// SQLite only: the file's size.
    db_bytes: u64,
}

/// Records per batch in the flush-latency phase.
const FLUSH_BATCH: usize = 16;

const QUERIES: &[&str] = &[
    "How many vacation days do I get per year?",
    "My laptop will not connect to the VPN from home.",
    "When is the expense report for last month due?",
    "Does the Widget Pro support wall mounting?",
];

const EXPERTS: &[&str] = &["hr", "it", "finance", "product", "general"];

fn route_record(i: usize, rng: &mut impl Rng) -> RequestRecord {
    let now = flywheel_router::data::log::unix_ms(std::time::SystemTime::now());
    let scores: Vec<ExpertScore> = EXPERTS
        .iter()
        .map(|e| ExpertScore {
            expert: (*e).into(),
            probability: rng.random_range(0.0..1.0),
            logprob: rng.random_range(-8.0..0.0),
        })
        .collect();
    RequestRecord {
        // The id the server gives every request.
        request_id: uuid::Uuid::now_v7().to_string(),
        kind: "route".into(),
        received_at_ms: now,
        finished_at_ms: now,
        query: QUERIES[i % QUERIES.len()].into(),
        status: "ok".into(),
        guardrails: vec![RailVerdict {
            rail: "topic".into(),
            decision: flywheel_router::guardrails::RailDecision::Allow,
            score: Some(rng.random_range(0.0..1.0)),
            latency_ms: 0.0,
        }],
        route: Some(RouteDecision {
            expert: EXPERTS[i % EXPERTS.len()].into(),
            top_expert: EXPERTS[i % EXPERTS.len()].into(),
            confidence: scores[0].probability,
            scores,
            router_model_version: "smollm2-135m-instruct-q8_0".into(),
            latency_ms: rng.random_range(0.0..1.0),
            forced: false,
            fallback: false,
            prompt_tokens: 0,
            router_kind: Some(flywheel_router::engine::ModelKind::LabelScoring),
        }),
        total_ms: Some(rng.random_range(0.0..1.0)),
        ..RequestRecord::default()
    }
}

fn chat_record(i: usize, rng: &mut impl Rng) -> RequestRecord {
    let mut r = route_record(i, rng);
    r.kind = "stream".into();
    r.session_id = Some(format!("session-{}", i % 1000));
    r.expert = r.route.as_ref().map(|d| d.expert.clone());
    r.expert_model_version = Some("smollm2-135m-instruct-q8_0".into());
    r.retrieved = (0..4)
        .map(|k| RetrievedRef {
            doc_id: format!("policies/doc-{}.md", (i + k) % 50),
            chunk_id: format!("doc-{}#{k}", (i + k) % 50),
            score: rng.random_range(0.0..20.0),
        })
        .collect();
    r.answer = Some("You can find this in the handbook, section 4. ".repeat(9));
    r.prompt_tokens = Some(480);
    r.completion_tokens = Some(96);
    r.ttft_ms = Some(rng.random_range(10.0..100.0));
    r.finish_reason = Some("stop".into());
    r
}

/// CPU time of this process (user + system), from `/proc` where there is one.
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}

async fn phase(
    log: &RequestLog,
    kind: &'static str,
    args: &Args,
    make: fn(usize, &mut rand::rngs::StdRng) -> RequestRecord,
) -> anyhow::Result<Phase> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let records: Vec<RequestRecord> = (0..args.records).map(|i| make(i, &mut rng)).collect();
    let before = log.stats().written();
    let cpu0 = process_cpu_s();
    let t = Instant::now();
    let mut records = records.into_iter();
    loop {
        let mut n = 0;
        for r in records.by_ref().take(args.chunk.max(1)) {
            log.submit(r);
            n += 1;
        }
        log.flush().await?;
        if n == 0 {
            break;
        }
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu0.zip(process_cpu_s()).map(|(a, b)| b - a);
    let n = args.records.max(1) as f64;
    Ok(Phase {
        kind,
        records: args.records,
        records_per_second: n / wall,
        wall_us_per_record: wall * 1e6 / n,
        cpu_us_per_record: cpu.map(|c| c * 1e6 / n),
        written: log.stats().written() - before,
    })
}

/// Run the benchmark.
///
/// # Errors
/// The database cannot be created or written.
pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.store_url.is_some() {
        args.db = PathBuf::new();
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = args.db.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    let log = RequestLog::open(&LogSpec {
        path: args.db.clone(),
        store_url: args.store_url.clone(),
        batch_size: args.batch_size,
        ..LogSpec::default()
    })?;
    let mut phases = Vec::new();
    // A short warm-up creates the tables' first pages and the statement cache.
    let warm = Args {
        records: args.chunk.min(args.records),
        ..args.clone()
    };
    phase(&log, "warm-up", &warm, route_record).await?;
    for (kind, make) in [
        (
            "route",
            route_record as fn(usize, &mut rand::rngs::StdRng) -> RequestRecord,
        ),
        ("chat", chat_record),
    ] {
        let p = phase(&log, kind, &args, make).await?;
        anyhow::ensure!(
            p.written == p.records as u64,
            "{kind}: {} of {} records written",
            p.written,
            p.records
        );
        println!(
            "{kind:>5}: {:>9.0} records/s  {:>6.2} us/record wall  {} us/record CPU",
            p.records_per_second,
            p.wall_us_per_record,
            p.cpu_us_per_record.map_or("?".into(), |c| format!("{c:.2}"))
        );
        phases.push(p);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut waits = Vec::with_capacity(args.flushes);
    for b in 0..args.flushes {
        for i in 0..FLUSH_BATCH {
            log.submit(route_record(b * FLUSH_BATCH + i, &mut rng));
        }
        let t = Instant::now();
        log.flush().await?;
        waits.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let flush = crate::stats::summarize(&waits);
    let (flush_p50_ms, flush_p99_ms) = (flush.p50, flush.p99);
    println!("flush of {FLUSH_BATCH} records: p50 {flush_p50_ms:.2} ms  p99 {flush_p99_ms:.2} ms");
    log.shutdown().await;
    let report = Report {
        store: if args.store_url.is_some() { "postgres" } else { "sqlite" },
        phases,
        flush_p50_ms,
        flush_p99_ms,
        db_bytes: std::fs::metadata(&args.db).map(|m| m.len()).unwrap_or(0),
    };
    if let Some(p) = &args.json {
        crate::write_json(p, &report)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_reaches_the_database_and_the_report_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut stores = vec![None];
        stores.extend(flywheel_router::testing::postgres_database().map(Some));
        for store_url in stores {
            let (db, json) = (dir.path().join("log.db"), dir.path().join("log.json"));
            run(Args {
                records: 300,
                chunk: 64,
                batch_size: 50,
                db: db.clone(),
                store_url: store_url.clone(),
                flushes: 10,
                json: Some(json.clone()),
            })
            .await
            .unwrap();
            let location = match store_url {
                Some(url) => flywheel_router::data::log::LogLocation::Postgres(url),
                None => flywheel_router::data::log::LogLocation::Sqlite(db),
            };
            check_report(&json, location);
        }
    }

    fn check_report(json: &std::path::Path, location: flywheel_router::data::log::LogLocation) {
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        let phases = report["phases"].as_array().unwrap();
        assert_eq!(phases.len(), 2);
        for (p, kind) in phases.iter().zip(["route", "chat"]) {
            assert_eq!(p["kind"], kind);
            assert_eq!(p["written"], 300);
            assert!(p["records_per_second"].as_f64().unwrap() > 0.0);
        }
        assert!(report["flush_p99_ms"].as_f64().unwrap() >= report["flush_p50_ms"].as_f64().unwrap());
        // Warm-up (one chunk) + both phases + the flushes, each id distinct,
        // chat rows complete.
        let reader = flywheel_router::data::log::LogReader::open(location).unwrap();
        assert_eq!(reader.count().unwrap(), 64 + 600 + 10 * FLUSH_BATCH as u64);
        let recent = reader.recent(1_000).unwrap();
        let chat = recent.iter().find(|r| r.kind == "stream").unwrap().clone();
        assert_eq!(chat.retrieved.len(), 4);
        assert!(chat.answer.is_some_and(|a| a.len() > 300));
    }
}
