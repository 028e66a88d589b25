//! [`Engine`] on mistral.rs: streaming generation, label scoring, warm-up.

use super::*;

/// The last position's logits of a `[.., vocab]` tensor.
pub(super) fn last_row(t: &Tensor) -> mistralrs::Result<Vec<f32>> {
    let t = t.to_dtype(mistralrs::DType::F32)?;
    let vocab = t.dims().last().copied().unwrap_or(0);
    let rows = t.elem_count() / vocab.max(1);
    t.reshape((rows, vocab))?.get(rows.saturating_sub(1))?.to_vec1::<f32>()
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn to_mistral_messages(messages: &[ChatMessage]) -> Vec<IndexMap<String, MessageContent>> {
    messages
        .iter()
        .map(|m| {
            let mut map = IndexMap::new();
            map.insert("role".to_string(), Either::Left(m.role.as_str().to_string()));
            map.insert("content".to_string(), Either::Left(m.content.clone()));
            map
        })
        .collect()
}

pub(super) fn response_error(response: Response) -> EngineError {
    match response {
        Response::ValidationError(e) => EngineError::Rejected(e.to_string()),
        Response::InternalError(e) => EngineError::Backend(anyhow::anyhow!(e.to_string())),
        Response::ModelError(msg, _) | Response::CompletionModelError(msg, _) => {
            EngineError::Backend(anyhow::anyhow!(msg))
        }
        _ => EngineError::Backend(anyhow::anyhow!("unexpected response kind from mistral.rs")),
    }
}

pub(super) fn finish_reason(s: &str) -> FinishReason {
    match s {
        "stop" | "eos" => FinishReason::Stop,
        "length" => FinishReason::Length,
        other => FinishReason::Other(other.to_string()),
    }
}

#[async_trait]
impl Engine for MistralEngine {
    fn backend(&self) -> &'static str {
        "mistralrs"
    }

    async fn generate(&self, messages: Vec<ChatMessage>, params: GenerateParams) -> Result<TokenStream, EngineError> {
        if self.router {
            return Err(EngineError::Rejected(
                "this engine is reserved for route decisions; load another engine to generate".into(),
            ));
        }
        let greedy = params.temperature.is_none_or(|t| t <= 0.0);
        // mistral.rs takes no per-request seed: a seeded request samples in
        // its own logits processor and leaves mistral.rs one token to take.
        let seeded = match (params.seed, params.temperature) {
            (Some(seed), Some(t)) if !greedy => Some(Arc::new(SeededLogits(SeededSampler::new(seed, t, params.top_p)))),
            _ => None,
        };
        let sampling = SamplingParams {
            temperature: if greedy || seeded.is_some() {
                None
            } else {
                params.temperature
            },
            top_k: if greedy || seeded.is_some() { Some(1) } else { None },
            top_p: if seeded.is_some() { None } else { params.top_p },
            max_len: Some(params.max_tokens.max(1)),
            ..SamplingParams::neutral()
        };
        let (tx, mut rx) = mpsc::channel(RESPONSE_BUFFER);
        let mut request = NormalRequest::new_simple(
            RequestMessage::Chat {
                messages: to_mistral_messages(&messages),
                enable_thinking: None,
                reasoning_effort: None,
            },
            sampling,
            tx,
            0,
            None,
            None,
        );
        request.is_streaming = true;
        let tally = Arc::new(SampleTally::default());
        let mut processors = vec![tally.clone() as Arc<dyn CustomLogitsProcessor>];
        processors.extend(seeded.map(|s| s as Arc<dyn CustomLogitsProcessor>));
        request.logits_processors = Some(processors);
        let max_len = params.max_tokens.max(1);
        // Held until the stream ends or is dropped (the semaphores are never closed).
        let admitted = self.admission.clone().acquire_owned().await.ok();
        if let Some(prefill) = &self.prefill {
            // Freed by the tally at the first sampled token, or with the request.
            tally.hold_until_sampled(prefill.clone().acquire_owned().await.ok());
        }
        let sender = self.sender()?;
        sender
            .send(Request::Normal(Box::new(request)))
            .await
            .map_err(|_| EngineError::Disconnected)?;
        // Stop strings are ours (see `super::stop`), not mistral.rs's.
        let mut stops = StopFilter::new(&params.stop);
        let stream = async_stream(move |out| async move {
            loop {
                let response = tokio::select! {
                    r = rx.recv() => r,
                    // The caller dropped the stream: return now, dropping `rx`,
                    // which makes mistral.rs cancel the sequence at its next token.
                    () = out.closed() => return,
                };
                let Some(response) = response else { break };
                match response {
                    Response::Chunk(chunk) => {
                        let mut finished = None;
                        for choice in chunk.choices {
                            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                                let (text, stopped) = match stops.as_mut() {
                                    Some(f) => f.push(&text),
                                    None => (text, false),
                                };
                                if !text.is_empty() && out.send(Ok(GenerationEvent::Delta(text))).await.is_err() {
                                    return; // caller went away: dropping `rx` cancels the sequence
                                }
                                if stopped {
                                    // A stop string: the answer ends here, and
                                    // returning drops `rx`, which cancels the sequence.
                                    let mut summary = tally.summary(max_len).unwrap_or_else(usage_free_summary);
                                    summary.finish_reason = FinishReason::Stop;
                                    let _ = out.send(Ok(GenerationEvent::Done(summary))).await;
                                    return;
                                }
                            }
                            if let Some(reason) = choice.finish_reason {
                                finished = Some(reason);
                            }
                        }
                        if let Some(reason) = finished {
                            if !release_held(&out, &mut stops).await {
                                return;
                            }
                            let usage = chunk.usage.unwrap_or_default_usage();
                            let _ = out.send(Ok(GenerationEvent::Done(usage.summary(&reason)))).await;
                            return;
                        }
                    }
                    Response::Done(done) => {
                        let reason = done
                            .choices
                            .first()
                            .map(|c| c.finish_reason.clone())
                            .unwrap_or_default();
                        let summary = done.usage.summary(&reason);
                        if release_held(&out, &mut stops).await {
                            let _ = out.send(Ok(GenerationEvent::Done(summary))).await;
                        }
                        return;
                    }
                    other => {
                        let _ = out.send(Err(response_error(other))).await;
                        return;
                    }
                }
            }
            // The sequence's channel closed without a final chunk. With the
            // engine still running and tokens sampled, that is mistral.rs
            // finishing an answer whose text ends inside a character (see
            // `SampleTally`): finish it here. Otherwise the engine stopped.
            let event = match tally.summary(max_len) {
                Some(summary) if !sender.is_closed() => {
                    if !release_held(&out, &mut stops).await {
                        return;
                    }
                    tracing::debug!(
                        completion_tokens = summary.usage.completion_tokens,
                        "mistral.rs ended a stream inside a multi-byte character; finishing it without that character"
                    );
                    Ok(GenerationEvent::Done(summary))
                }
                _ => Err(EngineError::Disconnected),
            };
            let _ = out.send(event).await;
            drop(admitted);
        });
        Ok(stream)
    }

    async fn score_labels(&self, messages: &[ChatMessage], labels: &LabelSet) -> Result<LabelScores, EngineError> {
        let plan = self.plan_for(labels).await?;
        let prompt = self.tokenize(Either::Left(messages), true).await?;
        let step_tokens = |step: &crate::engine::labels::PlanStep| -> Vec<u32> {
            prompt.iter().chain(&step.prefix).copied().collect()
        };
        let step_logprobs: Vec<Vec<f32>> = if self.router {
            let mut gate = Some(self.prompt_gate.clone().lock_owned().await);
            let mut out = Vec::with_capacity(plan.steps().len());
            let mut steps = plan.steps().iter().peekable();
            while let Some(step) = steps.next() {
                let (logprobs, inbox) = self
                    .raw_next_token_logprobs(step_tokens(step), &step.next_tokens, gate.take())
                    .await;
                out.push(logprobs?);
                // After the last step the decision is known: answer now. The
                // dropped inbox lets the gate go once the engine has retired
                // the sequence (one more engine step the caller need not
                // wait for), as it does on an error or a cancelled call.
                if steps.peek().is_some() {
                    gate = inbox.retire().await;
                }
            }
            out
        } else {
            let passes = plan
                .steps()
                .iter()
                .map(|step| self.next_token_logprobs(step_tokens(step), step.next_tokens.clone(), None));
            futures::future::try_join_all(passes).await?
        };
        Ok(LabelScores {
            logprobs: plan.combine(&step_logprobs),
            prompt_tokens: prompt.len() as u32,
            forward_passes: plan.steps().len() as u32,
            out_of_scope: false,
        })
    }

    async fn warm_up(&self, messages: &[ChatMessage]) -> Result<(), EngineError> {
        let tokens = self.tokenize(Either::Left(messages), true).await?;
        // A normal (non-raw) request: its finished sequence enters the prefix
        // cache, so later prompts sharing this prefix skip its prefill.
        let gate = if self.router {
            Some(self.prompt_gate.clone().lock_owned().await)
        } else {
            None
        };
        let lp = self.next_token_logprobs(tokens, vec![0], gate).await?;
        if lp.iter().any(|v| v.is_nan()) {
            return Err(EngineError::Backend(anyhow::anyhow!("model produced NaN logits")));
        }
        Ok(())
    }
}

pub(super) trait UsageExt {
    fn unwrap_or_default_usage(self) -> mistralrs::Usage;
}

impl UsageExt for Option<mistralrs::Usage> {
    fn unwrap_or_default_usage(self) -> mistralrs::Usage {
        self.unwrap_or(mistralrs::Usage {
            completion_tokens: 0,
            prompt_tokens: 0,
            total_tokens: 0,
            avg_tok_per_sec: 0.0,
            avg_prompt_tok_per_sec: 0.0,
            avg_compl_tok_per_sec: 0.0,
            total_time_sec: 0.0,
            total_prompt_time_sec: 0.0,
            total_completion_time_sec: 0.0,
        })
    }
}

pub(super) trait SummaryExt {
    fn summary(&self, reason: &str) -> GenerationSummary;
}

impl SummaryExt for mistralrs::Usage {
    fn summary(&self, reason: &str) -> GenerationSummary {
        GenerationSummary {
            usage: Usage {
                prompt_tokens: self.prompt_tokens as u32,
                completion_tokens: self.completion_tokens as u32,
            },
            finish_reason: finish_reason(reason),
            prefill_tokens_per_second: f64::from(self.avg_prompt_tok_per_sec),
            decode_tokens_per_second: f64::from(self.avg_compl_tok_per_sec),
        }
    }
}
