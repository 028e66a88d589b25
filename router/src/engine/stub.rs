//! A model-free [`Engine`] for measuring the server's own overhead and for
//! tests of the pipeline's plumbing.
//!
//! It streams a fixed answer word by word with a configurable per-token delay
//! and scores labels by keyword: a label named in the query scores high.
//! It is only ever selected explicitly (`--engine stub`); it is never a
//! fallback for a model that fails to load.

use std::time::Duration;

use async_trait::async_trait;

use super::{
    ChatMessage, Engine, EngineError, FinishReason, GenerateParams, GenerationEvent, GenerationSummary, LabelScores,
    LabelSet, Role, TokenStream, Usage,
};

/// The stub's answer, streamed one word per token.
pub const STUB_ANSWER: &str = "This is a fixed answer from the stub engine, streamed one word at a time \
     so that clients and benchmarks see a realistic sequence of token deltas.";

/// Log-probability given to a label that the query names.
const NAMED_LOGPROB: f32 = -0.1;
/// Log-probability given to every other label.
const OTHER_LOGPROB: f32 = -4.0;

/// A deterministic engine with no model.
#[derive(Debug, Clone, Default)]
pub struct StubEngine {
    per_token_delay: Duration,
    signature: Option<String>,
    misbehaviour: Option<Misbehaviour>,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A fault a test injects into a stub model, after its first `after` calls
/// to `generate` / `score_labels` (so warm-up still succeeds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Every later call fails.
    FailAfter(usize),
    /// Every later call never returns.
    HangAfter(usize),
}

impl StubEngine {
    /// A stub that waits `per_token_delay` before each token.
    pub fn new(per_token_delay: Duration) -> Self {
        Self {
            per_token_delay,
            signature: None,
            misbehaviour: None,
            calls: Default::default(),
        }
    }

    /// This stub with a fault injected.
    pub fn misbehaving(mut self, m: Misbehaviour) -> Self {
        self.misbehaviour = Some(m);
        self
    }

    async fn maybe_misbehave(&self) -> Result<(), EngineError> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.misbehaviour {
            Some(Misbehaviour::FailAfter(k)) if n >= k => {
                Err(EngineError::Backend(anyhow::anyhow!("injected failure")))
            }
            Some(Misbehaviour::HangAfter(k)) if n >= k => std::future::pending().await,
            _ => Ok(()),
        }
    }

    /// A stub that appends `@<signature>` to every word it streams, so a test
    /// can tell which loaded model produced each token of an answer.
    pub fn signed(per_token_delay: Duration, signature: impl Into<String>) -> Self {
        Self {
            signature: Some(signature.into()),
            ..Self::new(per_token_delay)
        }
    }
}

/// A query containing this marker is answered with the text after it
/// (word by word), so tests can make the stub say something specific, such
/// as PII for the output rails.
pub const ECHO_MARKER: &str = "echo:";

fn echoed(messages: &[ChatMessage]) -> Option<&str> {
    let user = messages.iter().rev().find(|m| m.role == Role::User)?;
    let at = user.content.find(ECHO_MARKER)?;
    Some(user.content[at + ECHO_MARKER.len()..].trim())
}

/// Prompt size in tokens, estimated at ~4 bytes per token in O(1): the stub
/// stands in for a model when the server's own cost is measured, so it must
/// not scan the prompt.
fn token_estimate(messages: &[ChatMessage]) -> u32 {
    messages.iter().map(|m| m.content.len().div_ceil(4) as u32).sum()
}

#[async_trait]
impl Engine for StubEngine {
    fn backend(&self) -> &'static str {
        "stub"
    }

    async fn generate(&self, messages: Vec<ChatMessage>, params: GenerateParams) -> Result<TokenStream, EngineError> {
        self.maybe_misbehave().await?;
        // One delta per word: "w0", " w1", " w2", ...
        let mut deltas: Vec<String> = echoed(&messages)
            .unwrap_or(STUB_ANSWER)
            .split(' ')
            .enumerate()
            .map(|(i, w)| {
                let sep = if i == 0 { "" } else { " " };
                match &self.signature {
                    Some(sig) => format!("{sep}{w}@{sig}"),
                    None => format!("{sep}{w}"),
                }
            })
            .collect();
        let mut finish = FinishReason::Stop;
        if deltas.len() > params.max_tokens {
            deltas.truncate(params.max_tokens);
            finish = FinishReason::Length;
        }
        if !params.stop.is_empty() {
            apply_stops(&mut deltas, &params.stop, &mut finish);
        }
        let n = deltas.len();
        let delay = self.per_token_delay;
        let prompt_tokens = token_estimate(&messages);
        let stream = futures::stream::unfold(0usize, move |i| {
            let text = deltas.get(i).cloned();
            let finish = finish.clone();
            async move {
                if i > n {
                    return None;
                }
                let Some(text) = text else {
                    let done = GenerationSummary {
                        usage: Usage {
                            prompt_tokens,
                            completion_tokens: n as u32,
                        },
                        finish_reason: finish,
                        prefill_tokens_per_second: 0.0,
                        decode_tokens_per_second: 0.0,
                    };
                    return Some((Ok(GenerationEvent::Done(done)), i + 1));
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok(GenerationEvent::Delta(text)), i + 1))
            }
        });
        Ok(Box::pin(stream))
    }

    async fn score_labels(&self, messages: &[ChatMessage], labels: &LabelSet) -> Result<LabelScores, EngineError> {
        self.maybe_misbehave().await?;
        // A label named in the last user message (as a whole word, any
        // case) gets the high score. No allocation: the stub stands in for
        // the model in the server-overhead benchmark, so it must cost little.
        let text = messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.content.as_str());
        let named = |label: &str| {
            text.split(|c: char| !c.is_alphanumeric())
                .any(|w| w.eq_ignore_ascii_case(label) || (!w.is_ascii() && w.to_lowercase() == label.to_lowercase()))
        };
        let logprobs = labels
            .names()
            .iter()
            .map(|l| if named(l) { NAMED_LOGPROB } else { OTHER_LOGPROB })
            .collect();
        Ok(LabelScores {
            logprobs,
            prompt_tokens: token_estimate(messages),
            forward_passes: 1,
            out_of_scope: false,
        })
    }

    async fn warm_up(&self, _messages: &[ChatMessage]) -> Result<(), EngineError> {
        Ok(())
    }
}

/// Pass `deltas` through the answer's stop strings, as a model's stop
/// strings end its answer.
fn apply_stops(deltas: &mut Vec<String>, stop: &[String], finish: &mut FinishReason) {
    let Some(mut filter) = super::stop::StopFilter::new(stop) else {
        return;
    };
    let mut out = Vec::with_capacity(deltas.len());
    let mut stopped = false;
    for d in deltas.iter() {
        let (text, stop_here) = filter.push(d);
        if !text.is_empty() {
            out.push(text);
        }
        if stop_here {
            stopped = true;
            break;
        }
    }
    if stopped {
        *finish = FinishReason::Stop;
    } else {
        out.extend(Some(filter.finish()).filter(|t| !t.is_empty()));
    }
    *deltas = out;
}

/// GGUF metadata key through which a test makes a stub model misbehave:
/// `fail:N` or `hang:N` (after its first N calls).
pub const STUB_FAULT_KEY: &str = "flywheel.stub.fault";

fn stub_fault(path: &std::path::Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::BufReader::new(file)).ok()?;
    content.metadata.get(STUB_FAULT_KEY)?.to_string().ok().cloned()
}

/// Serves every model entry with the model-free stub engine (only when asked
/// for explicitly, e.g. `flywheel-server --engine stub`), except encoder
/// classifier folders, which are small and real: they route as in production.
#[derive(Debug, Default, Clone)]
pub struct StubLoader {
    /// Delay before each streamed token.
    pub per_token_delay: std::time::Duration,
    /// Sign every streamed word with the model's version (hot-swap tests).
    pub sign_tokens: bool,
}

#[async_trait]
impl super::EngineLoader for StubLoader {
    async fn load(
        &self,
        spec: &crate::config::ModelSpec,
        router: bool,
    ) -> Result<std::sync::Arc<dyn Engine>, EngineError> {
        if super::ModelKind::of(&spec.path).is_classifier() {
            return super::ModelLoader.load(spec, router).await;
        }
        let mut engine = if self.sign_tokens {
            StubEngine::signed(self.per_token_delay, spec.version_label())
        } else {
            StubEngine::new(self.per_token_delay)
        };
        // Tests inject faults through the model file's metadata.
        if let Some(m) = stub_fault(&spec.path) {
            let (kind, after) = m.split_once(':').unwrap_or((m.as_str(), "0"));
            let after = after.parse().unwrap_or(0);
            match kind {
                "fail" => engine = engine.misbehaving(Misbehaviour::FailAfter(after)),
                "hang" => engine = engine.misbehaving(Misbehaviour::HangAfter(after)),
                _ => {}
            }
        }
        Ok(std::sync::Arc::new(engine))
    }

    fn requires_file(&self) -> bool {
        false
    }
}
#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn streams_words_then_done_with_usage() {
        let e = StubEngine::default();
        let params = GenerateParams {
            max_tokens: 3,
            ..GenerateParams::default()
        };
        let events: Vec<_> = e
            .generate(vec![ChatMessage::user("12345678")], params) // ~4 bytes a token
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].as_ref().unwrap(), &GenerationEvent::Delta("This".into()));
        match events[3].as_ref().unwrap() {
            GenerationEvent::Done(s) => {
                assert_eq!(
                    s.usage,
                    Usage {
                        prompt_tokens: 2,
                        completion_tokens: 3
                    }
                );
                assert_eq!(s.finish_reason, FinishReason::Length);
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn scores_the_named_label_highest() {
        let labels = LabelSet::new(vec!["hr".into(), "it".into()]).unwrap();
        let s = StubEngine::default()
            .score_labels(&[ChatMessage::user("an IT question")], &labels)
            .await
            .unwrap();
        assert!(s.logprobs[1] > s.logprobs[0]);
    }

    #[tokio::test]
    async fn a_stop_string_ends_the_answer_before_it() {
        let params = GenerateParams {
            max_tokens: 100,
            stop: vec!["wor".into(), "zzz".into()],
            ..GenerateParams::default()
        };
        let events: Vec<_> = StubEngine::default()
            .generate(vec![ChatMessage::user("echo: hello big world again")], params)
            .await
            .unwrap()
            .collect()
            .await;
        let text: String = events
            .iter()
            .filter_map(|e| match e.as_ref().unwrap() {
                GenerationEvent::Delta(t) => Some(t.as_str()),
                GenerationEvent::Done(_) => None,
            })
            .collect();
        assert_eq!(text, "hello big ");
        match events.last().unwrap().as_ref().unwrap() {
            GenerationEvent::Done(s) => assert_eq!(s.finish_reason, FinishReason::Stop),
            other => panic!("expected Done, got {other:?}"),
        }
    }
}
