//! Conversions between domain types and `flywheel.v1` messages.

use flywheel_proto::v1 as pb;
use flywheel_router::agents::RouteDecision;
use flywheel_router::agents::expert::Overrides;
use flywheel_router::data::feedback::{FeedbackInput, FeedbackRecord, Rating};
use flywheel_router::data::log::RequestRecord;
use flywheel_router::data::log::unix_ms;
use flywheel_router::engine::Usage;
use flywheel_router::models::slots::Slot;
use flywheel_router::{ChatEvent, Query, Timings};

/// A chat request as a pipeline query.
pub fn chat_query(r: pb::ChatRequest) -> Query {
    let options = r.options.unwrap_or_default();
    Query {
        text: r.query,
        session_id: r.session_id,
        user_id: r.user_id,
        expert: r.expert,
        overrides: Overrides {
            max_tokens: options.max_tokens,
            temperature: options.temperature,
            ..Overrides::default()
        },
        ..Query::default()
    }
}

/// A route request as a pipeline query.
pub fn route_query(r: pb::RouteRequest) -> Query {
    Query {
        text: r.query,
        session_id: r.session_id,
        user_id: r.user_id,
        ..Query::default()
    }
}

/// A route decision.
pub fn route(d: RouteDecision) -> pb::RouteDecision {
    pb::RouteDecision {
        expert: d.expert,
        confidence: d.confidence,
        scores: d
            .scores
            .into_iter()
            .map(|s| pb::ExpertScore {
                expert: s.expert,
                probability: s.probability,
                logprob: s.logprob,
            })
            .collect(),
        router_model_version: d.router_model_version,
        latency_ms: d.latency_ms,
        forced: d.forced,
        fallback: d.fallback,
        top_expert: d.top_expert,
        router_kind: d.router_kind.map(|k| k.as_str().to_string()).unwrap_or_default(),
    }
}

/// Token counts.
pub fn usage(u: Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
    }
}

/// Timings.
pub fn timings(t: Timings) -> pb::Timings {
    pb::Timings {
        ttft_ms: t.ttft_ms,
        total_ms: t.total_ms,
        route_ms: t.route_ms,
        prefill_tokens_per_second: t.prefill_tokens_per_second,
        decode_tokens_per_second: t.decode_tokens_per_second,
    }
}

/// One stream event.
pub fn event(e: ChatEvent) -> pb::ChatStreamMessage {
    use pb::chat_stream_message::Event;
    let event = match e {
        ChatEvent::Start {
            request_id,
            route: r,
            expert_model_version,
            citations: c,
        } => Event::Start(pb::StreamStart {
            request_id,
            route: Some(route(r)),
            expert_model_version,
            citations: citations(&c),
        }),
        ChatEvent::Delta(text) => Event::Delta(pb::TokenDelta { text }),
        ChatEvent::End {
            usage: u,
            timings: t,
            finish_reason,
        } => Event::End(pb::StreamEnd {
            usage: Some(usage(u)),
            timings: Some(timings(t)),
            finish_reason,
        }),
    };
    pb::ChatStreamMessage { event: Some(event) }
}

/// A model slot.
/// A promotion or rollback report.
pub fn swap(r: &flywheel_router::control::SwapReport) -> pb::SwapResponse {
    pb::SwapResponse {
        slot: r.slot.clone(),
        previous_version: r.previous_version.clone(),
        version: r.version.clone(),
        load_ms: r.load_ms,
        warm_ms: r.warm_ms,
    }
}

/// A shadow report.
pub fn shadow(r: &flywheel_router::trials::shadow::ShadowReport) -> pb::ShadowReport {
    pb::ShadowReport {
        slot: r.slot.clone(),
        version: r.version.clone(),
        fraction: r.fraction,
        sampled: r.sampled,
        mirrored: r.mirrored,
        skipped: r.skipped,
        failed: r.failed,
        logged: r.logged as u64,
        agreement: r.agreement,
        labelled: r.labelled as u64,
        live_accuracy: r.live_accuracy,
        shadow_accuracy: r.shadow_accuracy,
        live_p50_ms: r.live_p50_ms,
        live_p99_ms: r.live_p99_ms,
        shadow_p50_ms: r.shadow_p50_ms,
        shadow_p99_ms: r.shadow_p99_ms,
    }
}

/// An A/B split report.
pub fn split(r: &flywheel_router::trials::split::SplitReport) -> pb::SplitReport {
    pb::SplitReport {
        slot: r.slot.clone(),
        arms: r
            .arms
            .iter()
            .map(|a| pb::ArmReport {
                version: a.version.clone(),
                weight: a.weight,
                requests: a.requests as u64,
                rated: a.rated as u64,
                positive: a.positive as u64,
                positive_rate: a.positive_rate,
                ci_low: a.ci_low,
                ci_high: a.ci_high,
                p50_ms: a.p50_ms,
                p99_ms: a.p99_ms,
                mean_completion_tokens: a.mean_completion_tokens,
            })
            .collect(),
        p_value: r.p_value,
        recommendation: r.recommendation.clone(),
    }
}

/// How much of a server path a read-only Admin answer shows: the whole
/// path to the admin (the bearer token), the file name to anyone else, so
/// that the server's layout is not told to every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paths {
    /// The whole path.
    Full,
    /// The last component only.
    Names,
}

impl Paths {
    /// Where the request log lives, as this caller may see it.
    pub fn show_log(self, location: &flywheel_router::data::log::LogLocation) -> String {
        use flywheel_router::data::log::LogLocation;
        match (location, self) {
            (LogLocation::Sqlite(path), _) => self.show(path),
            (LogLocation::Postgres(_), Paths::Full) => location.to_string(),
            (LogLocation::Postgres(url), Paths::Names) => {
                // Host and database, without the user.
                let shown = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
                let shown = shown.rsplit_once('@').map_or(shown, |(_, rest)| rest);
                shown.split('?').next().unwrap_or_default().to_string()
            }
        }
    }

    /// `path` as this caller may see it.
    pub fn show(self, path: &std::path::Path) -> String {
        match self {
            Paths::Full => path.display().to_string(),
            Paths::Names => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

/// A slot, the model it serves and the trials on it.
pub fn slot(s: &Slot, control: &flywheel_router::ControlPlane, paths: Paths) -> pb::ModelSlot {
    let m = s.current();
    let (shadow, split_versions) = control.serving().trial_versions(s.name());
    pb::ModelSlot {
        slot: s.name().to_string(),
        version: m.version.clone(),
        path: paths.show(&m.path),
        backend: m.engine.backend().to_string(),
        size_bytes: m.size_bytes,
        loaded_at_unix_ms: unix_ms(m.loaded_at),
        kind: m.kind().as_str().to_string(),
        shadow_version: shadow.unwrap_or_default(),
        split_versions,
        state_revision: control.applied_revision(s.name()),
    }
}

fn rating(r: Option<pb::feedback_request::Rating>) -> Option<Rating> {
    use pb::feedback_request::Rating as R;
    match r? {
        R::Thumb(t) => match pb::Thumb::try_from(t).unwrap_or(pb::Thumb::Unspecified) {
            pb::Thumb::Up => Some(Rating::Thumb(true)),
            pb::Thumb::Down => Some(Rating::Thumb(false)),
            pb::Thumb::Unspecified => None,
        },
        // Out-of-range values become 0 stars, which the pipeline rejects
        // with a message naming the valid range.
        R::Stars(s) => Some(Rating::Stars(u8::try_from(s).unwrap_or(0))),
    }
}

/// A feedback request as domain input.
pub fn feedback_input(r: pb::FeedbackRequest) -> FeedbackInput {
    FeedbackInput {
        request_id: r.request_id,
        rating: rating(r.rating),
        corrected_expert: r.corrected_expert.filter(|e| !e.is_empty()),
        comment: r.comment.filter(|c| !c.is_empty()),
        reviewer_id: r.reviewer_id.filter(|c| !c.is_empty()),
    }
}

/// A request and its feedback rows.
pub fn feedback_history(record: RequestRecord, rows: Vec<FeedbackRecord>) -> pb::FeedbackHistoryResponse {
    use pb::feedback_entry::Rating as R;
    pb::FeedbackHistoryResponse {
        request_id: record.request_id,
        query: record.query,
        routed_expert: record.route.as_ref().map(|r| r.expert.clone()).unwrap_or_default(),
        router_model_version: record.route.map(|r| r.router_model_version).unwrap_or_default(),
        status: record.status,
        feedback: rows
            .into_iter()
            .map(|f| pb::FeedbackEntry {
                feedback_id: f.feedback_id,
                created_at_unix_ms: f.created_at_ms,
                kind: f.kind.as_str().to_string(),
                rating: f.rating.map(|r| match r {
                    Rating::Thumb(true) => R::Thumb(pb::Thumb::Up.into()),
                    Rating::Thumb(false) => R::Thumb(pb::Thumb::Down.into()),
                    Rating::Stars(s) => R::Stars(u32::from(s)),
                }),
                corrected_expert: f.corrected_expert,
                comment: f.comment,
                reviewer_id: f.reviewer_id,
                detail: f.detail,
            })
            .collect(),
    }
}

/// Rail settings as the TOML of a `[rails]` table.
pub fn rails_toml(spec: &flywheel_router::guardrails::rails::RailsSpec, paths: Paths) -> String {
    let mut spec = spec.clone();
    spec.jailbreak.embedder_dir = paths.show(&spec.jailbreak.embedder_dir).into();
    let spec = &spec;
    toml::to_string(spec).unwrap_or_default()
}

/// A flywheel cycle record.
pub fn cycle(c: &flywheel_router::data::journal::CycleRecord, paths: Paths) -> pb::Cycle {
    let metrics = c.metrics.as_ref();
    let dataset = c.dataset.as_ref();
    let gate = c.gate.as_ref();
    pb::Cycle {
        id: c.id.clone(),
        status: c.status.as_str().into(),
        stages: c
            .stages
            .iter()
            .map(|s| pb::CycleStage {
                stage: s.stage.clone(),
                seconds: s.seconds,
            })
            .collect(),
        trigger: c.trigger.clone(),
        slot: c.slot.clone(),
        started_unix_ms: c.started_unix_ms,
        updated_unix_ms: c.updated_unix_ms,
        finished_unix_ms: c.finished_unix_ms,
        dataset_dir: dataset.map(|d| paths.show(&d.dir)).unwrap_or_default(),
        train_examples: dataset.map_or(0, |d| u32::try_from(d.train).unwrap_or(u32::MAX)),
        test_examples: dataset.map_or(0, |d| u32::try_from(d.test).unwrap_or(u32::MAX)),
        candidate_version: c.candidate_version.clone().unwrap_or_default(),
        incumbent_version: metrics.map(|m| m.incumbent_version.clone()).unwrap_or_default(),
        candidate_accuracy: metrics.map_or(0.0, |m| m.candidate_accuracy),
        incumbent_accuracy: metrics.map_or(0.0, |m| m.incumbent_accuracy),
        p_value: metrics.map_or(0.0, |m| m.p_value),
        decision: c.decision.clone(),
        promoted: c.promoted,
        error: c.error.clone(),
        resumed: c.resumed,
        candidates: c
            .candidates
            .iter()
            .map(|r| pb::CycleCandidate {
                name: r.name.clone(),
                kind: r.kind.clone(),
                version: r.version.clone().unwrap_or_default(),
                distilled: r.distilled,
                train_seconds: r.seconds,
                error: r.error.clone(),
            })
            .collect(),
        models: gate
            .map(|g| g.models.iter().map(cycle_model).collect())
            .unwrap_or_default(),
        gate_summary: gate.map(|g| g.summary.clone()).unwrap_or_default(),
        winner: gate.and_then(|g| g.winner.clone()).unwrap_or_default(),
        cost: gate.map(|g| g.cost.clone()).unwrap_or_default(),
        teacher_version: gate.and_then(|g| g.teacher.clone()).unwrap_or_default(),
    }
}

fn cycle_model(m: &flywheel_router::data::journal::ModelRow) -> pb::CycleModel {
    pb::CycleModel {
        name: m.name.clone(),
        version: m.version.clone(),
        kind: m.kind.clone(),
        incumbent: m.incumbent,
        parameters: m.parameters,
        size_bytes: m.size_bytes,
        accuracy: m.accuracy,
        macro_f1: m.macro_f1,
        teacher_agreement: m.teacher_agreement,
        p_value_vs_best: m.p_value_vs_best,
        p50_ms: m.p50_ms,
        p99_ms: m.p99_ms,
        cpu_seconds_per_1k: m.cpu_seconds_per_1k,
        on_front: m.on_front,
        holds: m.holds,
        verdict: m.verdict.clone(),
    }
}

/// Passages as citations.
pub fn citations(passages: &[flywheel_router::retrieval::Passage]) -> Vec<pb::Citation> {
    passages
        .iter()
        .map(|p| pb::Citation {
            doc_id: p.doc_id.clone(),
            title: p.title.clone(),
            chunk_id: p.chunk_id.clone(),
            score: p.score,
            text: p.text.clone(),
        })
        .collect()
}

/// Retrieval index statistics.
pub fn index_stats(s: &flywheel_router::retrieval::IndexStats) -> pb::ReindexResponse {
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    pb::ReindexResponse {
        experts: n(s.experts),
        documents: n(s.documents),
        chunks: n(s.chunks),
        embedded: n(s.embedded),
        build_ms: s.build_ms,
    }
}
