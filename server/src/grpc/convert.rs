//! Conversions between domain types and `flywheel.v1` messages.

use flywheel_proto::v1 as pb;
use flywheel_router::agents::RouteDecision;
use flywheel_router::agents::expert::Overrides;
use flywheel_router::engine::Usage;
use flywheel_router::log::unix_ms;
use flywheel_router::registry::Slot;
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
        },
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
        } => Event::Start(pb::StreamStart {
            request_id,
            route: Some(route(r)),
            expert_model_version,
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
pub fn slot(s: &Slot) -> pb::ModelSlot {
    let m = s.current();
    pb::ModelSlot {
        slot: s.name().to_string(),
        version: m.version.clone(),
        path: m.path.display().to_string(),
        backend: m.engine.backend().to_string(),
        size_bytes: m.size_bytes,
        loaded_at_unix_ms: unix_ms(m.loaded_at),
    }
}
