//! One request over gRPC or the OpenAI-compatible HTTP API, timed.

use super::*;

/// One request. `due` is its scheduled arrival in the open loop; at
/// `deadline` a request still running is cancelled and marked unfinished.
/// A connection to the server through either API.
#[derive(Clone)]
pub(super) enum Client {
    Grpc(LoadChannel),
    Http(std::sync::Arc<crate::http_client::HttpPool>),
}

/// The status code an HTTP error answer stands for in the report.
pub(super) fn http_code(status: u16) -> tonic::Code {
    match status {
        400 => tonic::Code::InvalidArgument,
        401 => tonic::Code::Unauthenticated,
        404 => tonic::Code::NotFound,
        429 => tonic::Code::ResourceExhausted,
        499 => tonic::Code::Cancelled,
        500 => tonic::Code::Internal,
        503 => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

/// One streamed chat answer over HTTP.
pub(super) async fn one_http(
    pool: &crate::http_client::HttpPool,
    query: &str,
    max_tokens: u32,
    mut sample: Sample,
    start: Instant,
    deadline: tokio::time::Instant,
) -> Sample {
    use crate::http_client::SseEvent;
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1e3;
    let mut last = None;
    let mut done = false;
    let mut failed = false;
    let call = pool.stream_chat(query, max_tokens, |event| match event {
        SseEvent::Delta => sample.delta(start, &mut last),
        SseEvent::Done => done = true,
        SseEvent::Error => failed = true,
        SseEvent::Other => {}
    });
    // Dropping the call at the deadline closes its connection, which
    // cancels the answer on the server.
    let result = tokio::time::timeout_at(deadline, call).await;
    match result {
        Ok(Ok(200)) => {
            sample.ok = done && !failed;
            if failed {
                sample.code = Some(tonic::Code::Internal);
            }
        }
        Ok(Ok(status)) => sample.code = Some(http_code(status)),
        Ok(Err(_)) => sample.code = Some(tonic::Code::Unavailable),
        Err(_) => sample.unfinished = true,
    }
    sample.latency_ms = ms(Instant::now());
    sample
}

pub(super) async fn one(
    client: Client,
    mode: Mode,
    query: &str,
    max_tokens: u32,
    epoch: Instant,
    due: Option<Instant>,
    deadline: Instant,
) -> Sample {
    let deadline = tokio::time::Instant::from_std(deadline);
    let start = Instant::now();
    let at_s = start.saturating_duration_since(epoch).as_secs_f64();
    let late_ms = due.map_or(0.0, |d| start.saturating_duration_since(d).as_secs_f64() * 1e3);
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1e3;
    let channel = match client {
        Client::Grpc(channel) => channel,
        Client::Http(pool) => {
            let sample = Sample {
                at_s,
                late_ms,
                ..Sample::default()
            };
            return one_http(&pool, query, max_tokens, sample, start, deadline).await;
        }
    };
    match mode {
        Mode::Route => {
            let mut client = RouterClient::new(channel);
            let call = client.route(RouteRequest {
                query: query.into(),
                ..Default::default()
            });
            let r = tokio::time::timeout_at(deadline, call).await;
            Sample {
                at_s,
                late_ms,
                latency_ms: ms(Instant::now()),
                ok: matches!(r, Ok(Ok(_))),
                code: r.as_ref().ok().and_then(|r| r.as_ref().err()).map(tonic::Status::code),
                unfinished: r.is_err(),
                ..Sample::default()
            }
        }
        Mode::Chat => {
            let request = ChatRequest {
                query: query.into(),
                options: Some(GenerationOptions {
                    max_tokens: Some(max_tokens),
                    temperature: None,
                }),
                ..Default::default()
            };
            let mut sample = Sample {
                at_s,
                late_ms,
                ..Sample::default()
            };
            let mut client = ChatClient::new(channel);
            let mut stream = match tokio::time::timeout_at(deadline, client.stream(request)).await {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(status)) => {
                    sample.code = Some(status.code());
                    sample.latency_ms = ms(Instant::now());
                    return sample;
                }
                Err(_) => {
                    sample.unfinished = true;
                    sample.latency_ms = ms(Instant::now());
                    return sample;
                }
            };
            let mut last = None;
            loop {
                let Ok(message) = tokio::time::timeout_at(deadline, stream.message()).await else {
                    // Dropping the stream cancels the call on the server.
                    sample.unfinished = !sample.ok;
                    break;
                };
                match message {
                    Ok(Some(msg)) => {
                        if let Some(Event::Delta(_)) = msg.event {
                            sample.delta(start, &mut last);
                        }
                        if let Some(Event::End(_)) = msg.event {
                            sample.ok = true;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        sample.code = Some(status.code());
                        break;
                    }
                }
            }
            sample.latency_ms = ms(Instant::now());
            sample
        }
    }
}
