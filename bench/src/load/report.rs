//! The run's report: latency summaries, SLO attainment, ratios, tables and figures.

use super::*;

/// The load report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub(super) protocol: Protocol,
    pub(super) mode: Mode,
    /// `closed` (N clients) or `open` (Poisson arrivals).
    pub(super) arrival: &'static str,
    pub(super) concurrency: usize,
    pub(super) rate: Option<f64>,
    pub(super) duration_s: f64,
    pub(super) requests: usize,
    /// Requests answered with an error status (or a stream that ended
    /// without its summary).
    pub(super) errors: usize,
    /// Requests still running at the hard stop, cancelled there (warm-up
    /// ones included); neither successes nor errors, and left out of every
    /// latency figure.
    pub(super) unfinished: usize,
    pub(super) errors_by_status: std::collections::BTreeMap<String, usize>,
    pub(super) requests_per_second: f64,
    pub(super) output_tokens_per_second: f64,
    pub(super) latency_ms: Summary,
    /// Open loop: how late requests started against their schedule, and the
    /// latency counted from the scheduled arrival (start lateness plus
    /// latency), which a stalled generator cannot hide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) start_late_ms: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) latency_from_schedule_ms: Option<Summary>,
    pub(super) ttft_ms: Option<Summary>,
    pub(super) itl_ms: Option<Summary>,
    /// Successful requests per second that met every SLO given.
    pub(super) goodput_requests_per_second: f64,
    /// Share of successful requests that met every SLO given.
    pub(super) slo_attainment: f64,
    /// Successful requests and latency per second of the run.
    pub(super) timeline: Vec<crate::plot::Second>,
    /// Requests and errors per server address, when the load went to more
    /// than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) per_address: Vec<AddressShare>,
    /// The same load against `--baseline-addr`, run first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) baseline: Option<Box<Report>>,
    /// This run over the baseline: requests/s, p50 and p99 latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ratio: Option<Ratio>,
}

/// The part of the load one address served.
#[derive(Debug, Serialize)]
pub struct AddressShare {
    pub(super) addr: String,
    pub(super) requests: usize,
    pub(super) errors: usize,
}

/// One run over its baseline, measured back to back.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratio {
    pub(super) requests_per_second: f64,
    pub(super) latency_p50: f64,
    pub(super) latency_p99: f64,
}

/// The SLOs a request must meet to count toward goodput.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Slo {
    pub(super) ttft_ms: Option<f64>,
    pub(super) itl_ms: Option<f64>,
    pub(super) latency_ms: Option<f64>,
}

impl Slo {
    pub(super) fn met(&self, s: &Sample) -> bool {
        let mean_itl = (!s.itl_ms.is_empty()).then(|| s.itl_ms.iter().sum::<f64>() / s.itl_ms.len() as f64);
        s.ok && self.ttft_ms.is_none_or(|max| s.ttft_ms.is_none_or(|t| t <= max))
            && self.itl_ms.is_none_or(|max| mean_itl.is_none_or(|t| t <= max))
            && self.latency_ms.is_none_or(|max| s.latency_ms <= max)
    }
}

pub(super) fn report(
    args: &Args,
    addrs: &[String],
    protocol: Protocol,
    samples: &[Sample],
    elapsed_s: f64,
    slo: &Slo,
) -> Report {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut errors_by_status = std::collections::BTreeMap::new();
    let unfinished = samples.iter().filter(|s| s.unfinished).count();
    for s in samples.iter().filter(|s| !s.ok && !s.unfinished) {
        *errors_by_status
            .entry(format!("{:?}", s.code.unwrap_or(tonic::Code::Unknown)))
            .or_insert(0) += 1;
    }
    let lat: Vec<f64> = ok.iter().map(|s| s.latency_ms).collect();
    let open = args.rate.is_some();
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|s| s.itl_ms.iter().copied()).collect();
    let tokens: u32 = ok.iter().map(|s| s.tokens_out).sum();
    let good = ok.iter().filter(|s| slo.met(s)).count();
    Report {
        protocol,
        mode: args.mode,
        arrival: if args.rate.is_some() { "open" } else { "closed" },
        concurrency: args.concurrency,
        rate: args.rate,
        duration_s: elapsed_s,
        requests: samples.len(),
        errors: samples.len() - ok.len() - unfinished,
        unfinished,
        errors_by_status,
        requests_per_second: ok.len() as f64 / elapsed_s,
        output_tokens_per_second: f64::from(tokens) / elapsed_s,
        latency_ms: summarize(&lat),
        start_late_ms: open.then(|| summarize(&ok.iter().map(|s| s.late_ms).collect::<Vec<_>>())),
        latency_from_schedule_ms: open
            .then(|| summarize(&ok.iter().map(|s| s.late_ms + s.latency_ms).collect::<Vec<_>>())),
        ttft_ms: (!ttft.is_empty()).then(|| summarize(&ttft)),
        itl_ms: (!itl.is_empty()).then(|| summarize(&itl)),
        goodput_requests_per_second: good as f64 / elapsed_s,
        slo_attainment: if ok.is_empty() {
            0.0
        } else {
            good as f64 / ok.len() as f64
        },
        timeline: crate::plot::per_second(
            &ok.iter().map(|s| (s.at_s, s.latency_ms)).collect::<Vec<_>>(),
            // Requests start within the configured duration; the run ends
            // later, when the last one finishes or at the hard stop.
            args.duration.min(elapsed_s),
        ),
        per_address: if addrs.len() > 1 {
            per_address(addrs, samples)
        } else {
            Vec::new()
        },
        baseline: None,
        ratio: None,
    }
}

/// Requests and errors (unfinished ones apart) per address.
fn per_address(addrs: &[String], samples: &[Sample]) -> Vec<AddressShare> {
    addrs
        .iter()
        .enumerate()
        .map(|(target, addr)| {
            let mine = samples.iter().filter(|s| s.target == target);
            AddressShare {
                addr: addr.clone(),
                requests: mine.clone().count(),
                errors: mine.filter(|s| !s.ok && !s.unfinished).count(),
            }
        })
        .collect()
}

pub(super) fn print_report(r: &Report) {
    let load = match r.rate {
        Some(rate) => format!("open loop {rate} req/s"),
        None => format!("x{}", r.concurrency),
    };
    println!(
        "{:?} {load}: {} requests in {:.1} s, {} errors {:?}, {} unfinished, {:.1} req/s, {:.1} output tok/s, goodput {:.1} req/s ({:.1}% within SLO)",
        r.mode,
        r.requests,
        r.duration_s,
        r.errors,
        r.errors_by_status,
        r.unfinished,
        r.requests_per_second,
        r.output_tokens_per_second,
        r.goodput_requests_per_second,
        100.0 * r.slo_attainment
    );
    let row = |name: &str, s: &Summary| {
        println!(
            "  {name:<13} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  mean {:>8.2}  (ms)",
            s.p50, s.p90, s.p99, s.mean
        );
    };
    for a in &r.per_address {
        println!("  {}: {} requests, {} errors", a.addr, a.requests, a.errors);
    }
    row("latency", &r.latency_ms);
    if let Some(s) = &r.start_late_ms {
        row("start late", s);
    }
    if let Some(s) = &r.latency_from_schedule_ms {
        row("from schedule", s);
    }
    if let Some(s) = &r.ttft_ms {
        row("ttft", s);
    }
    if let Some(s) = &r.itl_ms {
        row("itl", s);
    }
}

/// The two figures of a run.
pub(super) fn plot(prefix: &std::path::Path, report: &Report, samples: &[Sample]) -> anyhow::Result<()> {
    let with = |suffix: &str| {
        let mut name = prefix.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        prefix.with_file_name(name)
    };
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let latency: Vec<f64> = ok.iter().map(|s| s.latency_ms).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|s| s.itl_ms.iter().copied()).collect();
    let mut series = vec![crate::plot::Series {
        name: format!("latency (p99 {:.1} ms)", report.latency_ms.p99),
        values: &latency,
    }];
    if let Some(t) = &report.ttft_ms {
        series.push(crate::plot::Series {
            name: format!("TTFT (p99 {:.1} ms)", t.p99),
            values: &ttft,
        });
    }
    if let Some(t) = &report.itl_ms {
        series.push(crate::plot::Series {
            name: format!("ITL (p99 {:.1} ms)", t.p99),
            values: &itl,
        });
    }
    let load = match report.rate {
        Some(r) => format!("open loop {r} req/s"),
        None => format!("{} clients", report.concurrency),
    };
    let title = format!("{:?}, {load}: {:.0} req/s", report.mode, report.requests_per_second);
    let cdf = with("-cdf.png");
    crate::plot::latency_cdf(&cdf, &title, &series)?;
    let timeline = with("-timeline.png");
    crate::plot::timeline(&timeline, &title, &report.timeline)?;
    println!("figures: {} {}", cdf.display(), timeline.display());
    Ok(())
}
