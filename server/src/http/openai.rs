//! OpenAI's chat-completions wire format: a request body read into a
//! pipeline [`Query`], and the pipeline's answers written as
//! `chat.completion` objects and `chat.completion.chunk` events.
//!
//! Every parameter is either honoured, accepted at its neutral value
//! (`n: 1`, `logprobs: false`, ...), or refused with a 400 that names it:
//! none is silently ignored.

use flywheel_router::agents::RouteDecision;
use flywheel_router::agents::expert::Overrides;
use flywheel_router::engine::{ChatMessage, Role, Usage};
use flywheel_router::retrieval::Passage;
use flywheel_router::{ChatOutcome, Query, Timings};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// The model name that lets the router choose the expert.
pub const ROUTED_MODEL: &str = "flywheel";

/// A chat-completions request, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// `flywheel` (routed) or an expert's name (forced).
    pub model: String,
    /// Stream server-sent events.
    pub stream: bool,
    /// Send a last chunk with token usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The pipeline query.
    pub query: Query,
}

/// Parameters accepted only at their neutral value, and why others are not.
const NEUTRAL: &[(&str, &str)] = &[
    ("n", "only one choice is generated (n = 1)"),
    ("logprobs", "log-probabilities are not returned"),
    ("top_logprobs", "log-probabilities are not returned"),
    ("frequency_penalty", "penalties are not supported"),
    ("presence_penalty", "penalties are not supported"),
    ("logit_bias", "logit biases are not supported"),
    ("tools", "tool calls are not supported"),
    ("tool_choice", "tool calls are not supported"),
    ("parallel_tool_calls", "tool calls are not supported"),
    ("functions", "function calls are not supported"),
    ("function_call", "function calls are not supported"),
    ("response_format", "only text responses are supported"),
    ("modalities", "only text output is supported"),
    ("audio", "audio output is not supported"),
    ("prediction", "predicted outputs are not supported"),
    ("reasoning_effort", "reasoning settings are not supported"),
    ("web_search_options", "web search is not supported"),
    ("service_tier", "service tiers are not supported"),
    ("store", "stored completions are not supported"),
    ("metadata", "stored completions are not supported"),
];

/// Whether `value` is what leaving parameter `name` out means.
fn is_neutral(name: &str, value: &Value) -> bool {
    match (name, value) {
        (_, Value::Null) => true,
        ("n", v) => v.as_u64() == Some(1),
        ("logprobs" | "store" | "parallel_tool_calls", v) => v == &Value::Bool(false),
        ("top_logprobs", v) => v.as_u64() == Some(0),
        ("frequency_penalty" | "presence_penalty", v) => v.as_f64() == Some(0.0),
        ("logit_bias" | "metadata", Value::Object(m)) => m.is_empty(),
        ("tools" | "functions", Value::Array(a)) => a.is_empty(),
        ("tool_choice" | "function_call", v) => v.as_str() == Some("none"),
        ("response_format", v) => v.get("type").and_then(Value::as_str) == Some("text"),
        ("modalities", Value::Array(a)) => a.iter().all(|m| m.as_str() == Some("text")),
        ("service_tier", v) => matches!(v.as_str(), Some("auto" | "default")),
        _ => false,
    }
}

fn field<T: DeserializeOwned>(name: &str, value: Value, expected: &str) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|_| ApiError::invalid(name, format!("`{name}` must be {expected}")))
}

impl ChatRequest {
    /// Read a request body; `api_key_id` is the key it was authenticated with.
    ///
    /// # Errors
    /// A body that is not a JSON object, a missing or malformed parameter,
    /// or one that is not supported: each names the parameter.
    pub fn parse(body: &[u8], api_key_id: Option<String>) -> Result<Self, ApiError> {
        let object: Map<String, Value> = serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid("body", format!("the body must be a JSON object: {e}")))?;
        let mut model = None;
        let mut messages = None;
        let mut stream = false;
        let mut include_usage = false;
        let mut overrides = Overrides::default();
        let mut max_tokens: Option<u32> = None;
        let mut user = None;
        for (name, value) in object {
            match name.as_str() {
                "model" => model = Some(field::<String>(&name, value, "a string")?),
                "messages" => messages = Some(value),
                "stream" => stream = field::<Option<bool>>(&name, value, "true or false")?.unwrap_or(false),
                "stream_options" => {
                    let options: Option<Map<String, Value>> = field(&name, value, "an object")?;
                    for (k, v) in options.unwrap_or_default() {
                        match k.as_str() {
                            "include_usage" => {
                                include_usage =
                                    field::<Option<bool>>("stream_options.include_usage", v, "true or false")?
                                        .unwrap_or(false);
                            }
                            _ => return Err(ApiError::unsupported(&format!("stream_options.{k}"), "not supported")),
                        }
                    }
                }
                "max_tokens" | "max_completion_tokens" => {
                    let n: Option<u32> = field(&name, value, "a positive integer")?;
                    if let (Some(a), Some(b)) = (max_tokens, n)
                        && a != b
                    {
                        return Err(ApiError::invalid(
                            name,
                            "`max_tokens` and `max_completion_tokens` disagree: send one of them",
                        ));
                    }
                    max_tokens = max_tokens.or(n);
                }
                "temperature" => overrides.temperature = field(&name, value, "a number")?,
                "top_p" => overrides.top_p = field(&name, value, "a number")?,
                "seed" => {
                    // OpenAI's seed is any 64-bit integer; its bits seed the sampler.
                    overrides.seed = field::<Option<i64>>(&name, value, "an integer")?.map(|s| s as u64);
                }
                "stop" => {
                    overrides.stop = match value {
                        Value::Null => Vec::new(),
                        Value::String(s) => vec![s],
                        v => field(&name, v, "a string or an array of strings")?,
                    };
                }
                "user" => user = field::<Option<String>>(&name, value, "a string")?,
                other => match NEUTRAL.iter().find(|(n, _)| *n == other) {
                    Some(_) if is_neutral(other, &value) => {}
                    Some((_, why)) => return Err(ApiError::unsupported(other, why)),
                    None => return Err(ApiError::unsupported(other, "this server does not know it")),
                },
            }
        }
        let model = model.ok_or_else(|| {
            ApiError::invalid(
                "model",
                format!(
                    "`model` is required: `{ROUTED_MODEL}` (routed) or an expert's name (GET /v1/models lists them)"
                ),
            )
        })?;
        let messages = messages.ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?;
        let (history, text) = read_messages(messages)?;
        overrides.max_tokens = max_tokens;
        let expert = (model != ROUTED_MODEL).then(|| model.clone());
        Ok(Self {
            model,
            stream,
            include_usage,
            query: Query {
                text,
                user_id: user.filter(|u| !u.is_empty()),
                expert,
                overrides,
                history,
                api_key_id,
                ..Query::default()
            },
        })
    }
}

/// The conversation before the last message, and the last message's text
/// (which must be the user's).
fn read_messages(value: Value) -> Result<(Vec<ChatMessage>, String), ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::invalid("messages", "`messages` must be an array of messages"));
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        messages.push(read_message(i, item)?);
    }
    match messages.pop() {
        Some(last) if last.role == Role::User => Ok((messages, last.content)),
        Some(_) => Err(ApiError::invalid(
            "messages",
            "the last message must be the user's (role `user`): it is the query that is routed and answered",
        )),
        None => Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        )),
    }
}

fn read_message(i: usize, item: Value) -> Result<ChatMessage, ApiError> {
    let at = |key: &str| format!("messages[{i}].{key}");
    let Value::Object(fields) = item else {
        return Err(ApiError::invalid(
            format!("messages[{i}]"),
            "each message must be an object",
        ));
    };
    let mut role = None;
    let mut content = String::new();
    for (key, value) in fields {
        match key.as_str() {
            "role" => {
                role = Some(match value.as_str() {
                    Some("system" | "developer") => Role::System,
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some(other @ ("tool" | "function")) => {
                        return Err(ApiError::unsupported(
                            &at("role"),
                            &format!("`{other}` messages need tool calls, which are not supported"),
                        ));
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            at("role"),
                            "`role` must be `system`, `developer`, `user` or `assistant`",
                        ));
                    }
                });
            }
            "content" => content = read_content(&at("content"), value)?,
            // A participant's display name: it changes nothing in the answer.
            "name" => {}
            "refusal" | "tool_calls" | "function_call" | "audio" if value.is_null() => {}
            other => return Err(ApiError::unsupported(&at(other), "not supported in messages")),
        }
    }
    let role = role.ok_or_else(|| ApiError::invalid(at("role"), "each message needs a `role`"))?;
    Ok(ChatMessage { role, content })
}

/// A message's text: a string, or an array of `text` parts (joined).
fn read_content(param: &str, value: Value) -> Result<String, ApiError> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let t = part
                            .get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| ApiError::invalid(param, "a `text` part needs a string `text`"))?;
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(t);
                    }
                    Some(other) => {
                        return Err(ApiError::unsupported(
                            param,
                            &format!("`{other}` parts are not supported: send text only"),
                        ));
                    }
                    None => return Err(ApiError::invalid(param, "each content part needs a `type`")),
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(
            param,
            "`content` must be a string or an array of text parts",
        )),
    }
}

/// Our finish reasons in OpenAI's words (a topic-rail refusal is a
/// content filter's answer).
pub fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "length" => "length",
        "refused" => "content_filter",
        _ => "stop",
    }
}

/// Token counts as OpenAI reports them.
#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct ScoreOut<'a> {
    expert: &'a str,
    probability: f32,
}

#[derive(Serialize)]
struct RouteOut<'a> {
    expert: &'a str,
    confidence: f32,
    forced: bool,
    fallback: bool,
    top_expert: &'a str,
    router_model_version: &'a str,
    latency_ms: f64,
    scores: Vec<ScoreOut<'a>>,
}

#[derive(Serialize)]
struct CitationOut<'a> {
    doc_id: &'a str,
    title: &'a str,
    chunk_id: &'a str,
    score: f32,
    text: &'a str,
}

#[derive(Serialize)]
struct TimingsOut {
    ttft_ms: f64,
    total_ms: f64,
    route_ms: f64,
}

impl From<&Timings> for TimingsOut {
    fn from(t: &Timings) -> Self {
        Self {
            ttft_ms: t.ttft_ms,
            total_ms: t.total_ms,
            route_ms: t.route_ms,
        }
    }
}

/// The `flywheel` extension of a response: who answered and from what
/// (and, once it ended, why and how fast). Standard clients ignore it.
#[derive(Serialize)]
pub struct Extension<'a> {
    route: RouteOut<'a>,
    expert_model_version: &'a str,
    citations: Vec<CitationOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timings: Option<TimingsOut>,
}

impl<'a> Extension<'a> {
    /// Who answers, as the answer starts.
    pub fn new(d: &'a RouteDecision, expert_model_version: &'a str, passages: &'a [Passage]) -> Self {
        Self {
            route: RouteOut {
                expert: &d.expert,
                confidence: d.confidence,
                forced: d.forced,
                fallback: d.fallback,
                top_expert: &d.top_expert,
                router_model_version: &d.router_model_version,
                latency_ms: d.latency_ms,
                scores: d
                    .scores
                    .iter()
                    .map(|s| ScoreOut {
                        expert: &s.expert,
                        probability: s.probability,
                    })
                    .collect(),
            },
            expert_model_version,
            citations: passages
                .iter()
                .map(|p| CitationOut {
                    doc_id: &p.doc_id,
                    title: &p.title,
                    chunk_id: &p.chunk_id,
                    score: p.score,
                    text: &p.text,
                })
                .collect(),
            finish_reason: None,
            timings: None,
        }
    }
}

/// Unix seconds now (OpenAI's `created`).
pub fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Serialize)]
struct MessageOut<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<&'a str>,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    message: MessageOut<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

/// A whole answer: a `chat.completion` object.
#[derive(Serialize)]
pub struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: [ChoiceOut<'a>; 1],
    usage: UsageOut,
    flywheel: Extension<'a>,
}

/// A whole answer as a `chat.completion` object.
pub fn completion<'a>(model: &'a str, o: &'a ChatOutcome) -> Completion<'a> {
    let mut flywheel = Extension::new(&o.route, &o.expert_model_version, &o.citations);
    flywheel.finish_reason = Some(&o.finish_reason);
    flywheel.timings = Some((&o.timings).into());
    Completion {
        id: &o.request_id,
        object: "chat.completion",
        created: created(),
        model,
        system_fingerprint: &o.expert_model_version,
        choices: [ChoiceOut {
            index: 0,
            message: MessageOut {
                role: "assistant",
                content: &o.answer,
                refusal: None,
            },
            logprobs: None,
            finish_reason: finish_reason(&o.finish_reason),
        }],
        usage: o.usage.into(),
        flywheel,
    }
}

/// The server-sent events of one answer, as bytes: `data: <chunk>\n\n`.
///
/// Every chunk shares its opening fields (id, object, created, model), so
/// they are written once, when the answer starts; each chunk is that
/// prefix and its own fields serialized straight into one buffer, with no
/// JSON tree built per token.
#[derive(Debug, Clone)]
pub struct Chunks {
    /// `data: {"id":...,"object":"chat.completion.chunk","created":...,"model":...,`
    prefix: String,
}

/// The SSE event that ends a stream.
pub const DONE: &str = "data: [DONE]\n\n";

/// Append `value` as JSON (it serializes infallibly: strings, numbers, structs of them).
fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

impl Chunks {
    /// The chunks of answer `id` to a request for `model`.
    pub fn new(id: &str, created: u64, model: &str) -> Self {
        let mut prefix = Vec::with_capacity(128);
        prefix.extend_from_slice(b"data: {\"id\":");
        write_json(&mut prefix, id);
        prefix.extend_from_slice(
            format!(",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":").as_bytes(),
        );
        write_json(&mut prefix, model);
        prefix.push(b',');
        Self {
            prefix: String::from_utf8(prefix).unwrap_or_default(),
        }
    }

    /// One event: the shared fields, `fields` (raw JSON members), `value`, and the close.
    fn event<T: Serialize + ?Sized>(&self, fields: &[u8], value: &T, extra: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + fields.len() + extra + 8);
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(fields);
        write_json(&mut out, value);
        out.extend_from_slice(b"}\n\n");
        out
    }

    /// The first chunk: the assistant role, and who answers.
    pub fn start(&self, flywheel: &Extension<'_>) -> Vec<u8> {
        self.event(
            br#""choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"flywheel":"#,
            flywheel,
            512,
        )
    }

    /// A piece of the answer.
    pub fn delta(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + text.len() + 96);
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(br#""choices":[{"index":0,"delta":{"content":"#);
        write_json(&mut out, text);
        out.extend_from_slice(b"},\"finish_reason\":null}]}\n\n");
        out
    }

    /// The last chunk with a choice: why the answer ended.
    pub fn end(&self, reason: &str, t: &Timings) -> Vec<u8> {
        #[derive(Serialize)]
        struct End<'a> {
            finish_reason: &'a str,
            timings: TimingsOut,
        }
        let fields = format!(
            r#""choices":[{{"index":0,"delta":{{}},"finish_reason":"{}"}}],"flywheel":"#,
            finish_reason(reason)
        );
        self.event(
            fields.as_bytes(),
            &End {
                finish_reason: reason,
                timings: t.into(),
            },
            128,
        )
    }

    /// The usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage(&self, u: Usage) -> Vec<u8> {
        self.event(br#""choices":[],"usage":"#, &UsageOut::from(u), 96)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(body.to_string().as_bytes(), Some("k1".into()))
    }

    #[test]
    fn a_conversation_becomes_a_query_on_its_last_user_message() {
        let r = parse(json!({
            "model": "flywheel",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How many leave days?"},
                {"role": "assistant", "content": "25."},
                {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "sick days?"}]},
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 16,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": "\n\n",
            "seed": -1,
            "user": "u-7",
            "n": 1,
            "logprobs": false,
            "tools": null,
        }))
        .unwrap();
        assert!(r.stream && r.include_usage);
        let q = &r.query;
        assert_eq!(q.text, "And\nsick days?");
        assert_eq!(q.expert, None);
        assert_eq!(q.history.len(), 3);
        assert_eq!(q.history[0].role, Role::System);
        assert_eq!(q.history[2], ChatMessage::assistant("25."));
        assert_eq!(q.overrides.max_tokens, Some(16));
        assert_eq!(q.overrides.temperature, Some(0.5));
        assert_eq!(q.overrides.top_p, Some(0.9));
        assert_eq!(q.overrides.stop, ["\n\n"]);
        assert_eq!(q.overrides.seed, Some(u64::MAX));
        assert_eq!(q.user_id.as_deref(), Some("u-7"));
        assert_eq!(q.api_key_id.as_deref(), Some("k1"));
        let forced = parse(json!({"model": "it", "messages": [{"role": "user", "content": "vpn"}]})).unwrap();
        assert_eq!(forced.query.expert.as_deref(), Some("it"));
        assert!(!forced.stream);
    }

    #[test]
    fn unsupported_parameters_are_refused_by_name() {
        let base = || json!({"model": "flywheel", "messages": [{"role": "user", "content": "hi"}]});
        let refused = |key: &str, value: Value| {
            let mut body = base();
            body[key] = value;
            parse(body).unwrap_err()
        };
        for (key, value) in [
            ("n", json!(2)),
            ("tools", json!([{"type": "function", "function": {"name": "f"}}])),
            ("logprobs", json!(true)),
            ("response_format", json!({"type": "json_object"})),
            ("frequency_penalty", json!(0.5)),
            ("best_of", json!(2)),
        ] {
            let e = refused(key, value);
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(key));
            assert!(e.message.contains(&format!("`{key}`")), "{}", e.message);
        }
        let image = json!([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]);
        let e = parse(json!({"model": "flywheel", "messages": [{"role": "user", "content": image}]})).unwrap_err();
        assert!(e.message.contains("image_url") && e.param.as_deref() == Some("messages[0].content"));
        let e = parse(json!({"model": "flywheel", "messages": [{"role": "tool", "content": "x"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn malformed_requests_say_what_to_fix() {
        let e = parse(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse(json!({"model": "flywheel", "messages": []})).unwrap_err();
        assert!(e.message.contains("at least one"));
        let e = parse(json!({"model": "flywheel", "messages": [{"role": "assistant", "content": "x"}]})).unwrap_err();
        assert!(e.message.contains("last message must be the user's"));
        let e =
            parse(json!({"model": "flywheel", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}))
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse(json!({
            "model": "flywheel", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5, "max_completion_tokens": 6,
        }))
        .unwrap_err();
        assert!(e.message.contains("disagree"));
        assert!(
            ChatRequest::parse(b"not json", None)
                .unwrap_err()
                .message
                .contains("JSON object")
        );
    }

    #[test]
    fn every_chunk_is_one_json_object_with_the_shared_fields() {
        let chunks = Chunks::new("req-1", 7, "hr");
        let t = Timings::default();
        let u = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
        };
        let route = RouteDecision::forced("hr");
        let events = [
            chunks.start(&Extension::new(&route, "v1", &[])),
            chunks.delta("a \"quoted\"\nline"),
            chunks.end("refused", &t),
            chunks.usage(u),
        ];
        let parsed: Vec<Value> = events
            .iter()
            .map(|e| {
                let e = std::str::from_utf8(e).unwrap();
                let data = e.strip_prefix("data: ").and_then(|d| d.strip_suffix("\n\n")).unwrap();
                serde_json::from_str(data).unwrap()
            })
            .collect();
        for c in &parsed {
            assert_eq!((c["id"].as_str(), c["created"].as_u64()), (Some("req-1"), Some(7)));
            assert_eq!(
                (c["object"].as_str(), c["model"].as_str()),
                (Some("chat.completion.chunk"), Some("hr"))
            );
        }
        assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(parsed[0]["flywheel"]["route"]["expert"], "hr");
        assert_eq!(parsed[0]["flywheel"]["route"]["forced"], true);
        assert_eq!(parsed[1]["choices"][0]["delta"]["content"], "a \"quoted\"\nline");
        assert_eq!(parsed[2]["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(parsed[3]["usage"]["total_tokens"], 5);
        assert_eq!(parsed[3]["choices"], json!([]));
    }
}
