//! Logits processors: the tally of what mistral.rs sampled for a streamed
//! answer, and seeded sampling.

use super::*;

/// What mistral.rs sampled for one streamed sequence, seen from a logits
/// processor: it runs once per sampled token, with the sequence's tokens so
/// far, and passes the logits through unchanged.
///
/// mistral.rs 0.8.1 sends a streamed sequence's final chunk (finish reason
/// and usage) only when the text so far ends on a whole UTF-8 character. An
/// answer that stops inside a multi-byte character (cut at `max_tokens` in
/// the middle of a CJK character or an emoji, which take several byte-level
/// tokens) gets no final chunk: its channel just closes. The tally lets
/// [`MistralEngine::generate`] finish such an answer with exact token counts;
/// the unfinished character is dropped.
///
/// It also holds the answer's prefill slot (see [`PREFILL_SLOTS`]) until the
/// first token is sampled, which is when the prompt step has run.
#[derive(Default)]
pub(super) struct SampleTally {
    mark: Mutex<Option<TallyMark>>,
    prefilling: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

/// The tally after the latest sampled token.
#[derive(Clone, Copy)]
pub(super) struct TallyMark {
    /// Tokens sampled so far.
    sampled: usize,
    /// Tokens in the context at the latest call.
    context_len: usize,
    /// When the first and the latest token were sampled.
    first: std::time::Instant,
    last: std::time::Instant,
}

/// A [`SeededSampler`] as a mistral.rs logits processor: every token but
/// the one it draws becomes impossible.
pub(super) struct SeededLogits(pub(super) SeededSampler);

impl CustomLogitsProcessor for SeededLogits {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> mistralrs::Result<Tensor> {
        let values: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let chosen = self.0.choose(&values);
        let mut only = vec![f32::NEG_INFINITY; values.len()];
        only[chosen] = 0.0;
        Tensor::from_vec(only, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

impl CustomLogitsProcessor for SampleTally {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let now = std::time::Instant::now();
        drop(lock(&self.prefilling).take());
        let mut mark = lock(&self.mark);
        *mark = Some(TallyMark {
            sampled: mark.map_or(0, |m| m.sampled) + 1,
            context_len: context.len(),
            first: mark.map_or(now, |m| m.first),
            last: now,
        });
        Ok(logits.clone())
    }
}

impl SampleTally {
    /// Keep `slot` until the first sampled token.
    pub(super) fn hold_until_sampled(&self, slot: Option<tokio::sync::OwnedSemaphorePermit>) {
        *lock(&self.prefilling) = slot;
    }

    /// The summary of a sequence that ended after sampling, or `None` if
    /// nothing was sampled. `max_len` is the request's token cap: a sequence
    /// that sampled that many stopped for length, any other stopped at its end
    /// of text (the only other stop of a request without stop strings).
    ///
    /// A sequence that finishes at its prompt step is sampled once more:
    /// mistral.rs 0.8.1 sets every sequence of a prompt step running after
    /// the step, which revives one that the step finished. That extra token
    /// is not part of the answer (no text of it is sent when the first token
    /// completed a character) and is not counted.
    pub(super) fn summary(&self, max_len: usize) -> Option<GenerationSummary> {
        let mark = (*lock(&self.mark))?;
        let sampled = mark.sampled;
        // From the second token on, the context is the whole prompt plus the
        // tokens sampled before this call; at the first it is the prompt (the
        // uncached part of it after a prefix-cache hit).
        let prompt_tokens = mark.context_len.saturating_sub(sampled - 1);
        let decode_secs = (mark.last - mark.first).as_secs_f64();
        Some(GenerationSummary {
            usage: Usage {
                prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                completion_tokens: u32::try_from(sampled.min(max_len)).unwrap_or(u32::MAX),
            },
            finish_reason: if sampled >= max_len { FinishReason::Length } else { FinishReason::Stop },
            prefill_tokens_per_second: 0.0,
            #[allow(clippy::cast_precision_loss)] // token counts are far below 2^52
            decode_tokens_per_second: if sampled > 1 && decode_secs > 0.0 {
                (sampled - 1) as f64 / decode_secs
            } else {
                0.0
            },
        })
    }
}

/// Send the text a stop filter still holds back, at the end of an answer
/// that reached no stop string; false when the caller went away.
pub(super) async fn release_held(
    out: &mpsc::Sender<Result<GenerationEvent, EngineError>>,
    stops: &mut Option<StopFilter>,
) -> bool {
    match stops.as_mut().map(StopFilter::finish) {
        Some(tail) if !tail.is_empty() => out.send(Ok(GenerationEvent::Delta(tail))).await.is_ok(),
        _ => true,
    }
}

/// A summary with no counts (a stop string before any token was tallied).
pub(super) fn usage_free_summary() -> GenerationSummary {
    GenerationSummary {
        usage: Usage::default(),
        finish_reason: FinishReason::Stop,
        prefill_tokens_per_second: 0.0,
        decode_tokens_per_second: 0.0,
    }
}

/// Turn a producer closure into a [`TokenStream`]: the producer runs as a task
/// writing into a bounded channel; dropping the stream closes the channel, the
/// producer's next send fails and it returns (dropping what it consumes).
pub(super) fn async_stream<F, Fut>(producer: F) -> TokenStream
where
    F: FnOnce(mpsc::Sender<Result<GenerationEvent, EngineError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream_from(rx))
}

pub(super) fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
