//! The mistral.rs engine on the real default model: label scoring through the
//! router engine's cached, raw-logit path gives the same distribution as the
//! uncached path, and scoring and generation can run concurrently on one
//! router engine.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;

use flywheel_router::engine::mistral::{MistralEngine, MistralOptions, Weights};
use flywheel_router::engine::{
    ChatMessage, Engine, FinishReason, GenerateParams, GenerationEvent, GenerationSummary, LabelSet,
};
use futures::StreamExt;

fn model() -> PathBuf {
    if let Some(p) = std::env::var_os("FLYWHEEL_TEST_MODEL") {
        return p.into();
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    flywheel_router::model_prep::fetch::ensure_default_model(&dir, "python3").expect("preparing the default model")
}

async fn engine(router: bool) -> Arc<dyn Engine> {
    Arc::new(load(router, Weights::Auto).await)
}

async fn load(router: bool, weights: Weights) -> MistralEngine {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let opts = MistralOptions {
        max_num_seqs: Some(8),
        weights,
        ..MistralOptions::new(model(), router)
    };
    MistralEngine::load(&opts).await.expect("loading the model")
}

fn prompt(query: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(
            "Route the question to a team.\nTeams:\n- hr: leave, benefits, payroll\n- it: laptops, passwords, VPN\n\
             - finance: expenses, invoices\n- general: anything else\nReply with one team name only.",
        ),
        ChatMessage::user(query),
    ]
}

/// Greedy decoding capped at `max_tokens`.
fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    }
}

/// Read a stream to its end; whether a `Done` event ended it.
async fn ends_with_done(mut s: flywheel_router::engine::TokenStream) -> bool {
    let mut done = false;
    while let Some(ev) = s.next().await {
        done |= matches!(ev.unwrap(), GenerationEvent::Done(_));
    }
    done
}

fn labels() -> LabelSet {
    LabelSet::new(["hr", "it", "finance", "general"].map(String::from).to_vec()).unwrap()
}

#[tokio::test]
async fn cached_router_scoring_matches_uncached_scoring() {
    // Same weights on both sides: this is about the cache.
    let router: Arc<dyn Engine> = Arc::new(load(true, Weights::Stored).await);
    let plain = engine(false).await;
    router.warm_up(&prompt("hello")).await.unwrap();
    // The repeat checks that an exact repeat is scored like the first time.
    for q in [
        "My VPN keeps disconnecting",
        "How do I file an expense report?",
        "My VPN keeps disconnecting",
    ] {
        let a = router.score_labels(&prompt(q), &labels()).await.unwrap();
        let b = plain.score_labels(&prompt(q), &labels()).await.unwrap();
        assert_eq!(a.prompt_tokens, b.prompt_tokens);
        for (x, y) in a.probabilities().iter().zip(b.probabilities()) {
            assert!(
                (x - y).abs() < 0.02,
                "{q}: cached {:?} vs uncached {:?}",
                a.probabilities(),
                b.probabilities()
            );
        }
    }
    let vpn = router
        .score_labels(&prompt("My VPN keeps disconnecting"), &labels())
        .await
        .unwrap();
    let best = vpn
        .probabilities()
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
        .0;
    assert_eq!(labels().names()[best], "it", "{:?}", vpn.probabilities());
}

#[tokio::test]
async fn router_engines_score_with_an_exact_f32_copy_of_the_weights() {
    let f32 = load(true, Weights::Auto).await;
    let stored = load(true, Weights::Stored).await;
    assert!(f32.f32_weights(), "auto gives a router engine f32 weights");
    assert!(!stored.f32_weights());
    assert!(
        !load(false, Weights::Auto).await.f32_weights(),
        "answer engines keep the file's"
    );
    let (f32, stored): (Arc<dyn Engine>, Arc<dyn Engine>) = (Arc::new(f32), Arc::new(stored));
    f32.warm_up(&prompt("hello")).await.unwrap();
    stored.warm_up(&prompt("hello")).await.unwrap();
    let best = |p: &[f32]| {
        p.iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
            .0
    };
    // The same model: the products differ only by the quantized path's 8-bit
    // activations (up to ~0.06 on an uncertain query), so decisions agree and
    // probabilities stay close.
    for q in [
        "My VPN keeps disconnecting",
        "How do I file an expense report?",
        "How many vacation days do I have left?",
        "What is the capital of France?",
    ] {
        let a = f32.score_labels(&prompt(q), &labels()).await.unwrap();
        let b = stored.score_labels(&prompt(q), &labels()).await.unwrap();
        let (pa, pb) = (a.probabilities(), b.probabilities());
        assert_eq!(best(&pa), best(&pb), "{q}: f32 {pa:?} vs stored {pb:?}");
        for (x, y) in pa.iter().zip(&pb) {
            assert!((x - y).abs() < 0.1, "{q}: f32 {pa:?} vs stored {pb:?}");
        }
    }
}

#[tokio::test]
async fn concurrent_route_decisions_on_a_router_engine_all_succeed() {
    let router = engine(true).await;
    router.warm_up(&prompt("hello")).await.unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let e = router.clone();
            tokio::spawn(async move {
                e.score_labels(&prompt(&format!("question {i} about my payslip")), &labels())
                    .await
            })
        })
        .collect();
    for t in tasks {
        let scores = t.await.unwrap().unwrap();
        assert_eq!(scores.logprobs.len(), 4);
    }
    let params = greedy(4);
    assert!(
        router.generate(vec![ChatMessage::user("hi")], params).await.is_err(),
        "router engines do not generate"
    );
}

#[tokio::test]
async fn generation_engine_streams_then_reports_usage() {
    let plain = engine(false).await;
    let params = greedy(8);
    let mut s = plain
        .generate(vec![ChatMessage::user("Say hello")], params)
        .await
        .unwrap();
    let (mut deltas, mut done) = (0, None);
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            GenerationEvent::Delta(_) => deltas += 1,
            GenerationEvent::Done(summary) => done = Some(summary),
        }
    }
    let done = done.expect("a Done event ends the stream");
    assert!(deltas > 0 && done.usage.completion_tokens as usize >= deltas.min(8) - 1);
    assert!(done.usage.completion_tokens <= 8);
}

/// The text and summary of one greedy generation.
async fn answer(engine: &Arc<dyn Engine>, query: &str, max_tokens: usize) -> (String, GenerationSummary) {
    answer_with(engine, query, greedy(max_tokens)).await
}

/// The text and summary of one generation.
async fn answer_with(engine: &Arc<dyn Engine>, query: &str, params: GenerateParams) -> (String, GenerationSummary) {
    let what = format!("{params:?}");
    let mut s = engine.generate(vec![ChatMessage::user(query)], params).await.unwrap();
    let (mut text, mut done) = (String::new(), None);
    while let Some(ev) = s.next().await {
        match ev.unwrap_or_else(|e| panic!("{what}: {e}")) {
            GenerationEvent::Delta(d) => text.push_str(&d),
            GenerationEvent::Done(summary) => done = Some(summary),
        }
    }
    (text, done.unwrap_or_else(|| panic!("{what}: no Done event")))
}

/// Emoji and CJK characters take several byte-level tokens, so a token cap
/// can fall inside one. mistral.rs then closes the stream without its final
/// chunk; the engine still ends the stream with a summary: exact counts,
/// `length`, and the text up to the last whole character.
#[tokio::test]
async fn an_answer_cut_inside_a_character_still_ends_with_a_summary() {
    let plain = engine(false).await;
    let query = "Translate to Chinese: good morning, my friend";
    let (full, _) = answer(&plain, query, 24).await;
    let (mut previous, mut cuts_inside) = (String::new(), 0);
    for n in 1..=12 {
        let (text, done) = answer(&plain, query, n).await;
        assert_eq!(done.usage.completion_tokens as usize, n, "max_tokens {n}: {text:?}");
        assert_eq!(done.finish_reason, FinishReason::Length, "max_tokens {n}");
        assert!(done.usage.prompt_tokens > 10, "max_tokens {n}: {:?}", done.usage);
        assert!(
            full.starts_with(&text),
            "max_tokens {n}: {text:?} is not a prefix of {full:?}"
        );
        assert!(
            text.starts_with(&previous),
            "max_tokens {n}: {text:?} after {previous:?}"
        );
        // The n-th token added no whole character: the cap fell inside one.
        if text == previous && n > 1 {
            cuts_inside += 1;
        }
        previous = text;
    }
    assert!(
        cuts_inside > 0,
        "no cap fell inside a character; the test needs a prompt whose answer has multi-token characters: {full:?}"
    );
}

/// A generation engine admits `max_num_seqs` answers at once: another one
/// waits in the engine (nothing reaches mistral.rs, so dropping it costs
/// nothing) until an admitted stream ends.
#[tokio::test]
async fn answers_beyond_max_num_seqs_wait_until_a_stream_ends() {
    let opts = MistralOptions {
        max_num_seqs: Some(1),
        ..MistralOptions::new(model(), false)
    };
    let one: Arc<dyn Engine> = Arc::new(MistralEngine::load(&opts).await.unwrap());
    let params = greedy(16);
    let ask = || one.generate(vec![ChatMessage::user("Say hello")], params.clone());
    let first = ask().await.unwrap();
    let queued = tokio::time::timeout(std::time::Duration::from_millis(500), ask()).await;
    assert!(queued.is_err(), "a second answer started while the only slot was taken");
    // A waiting request that is dropped leaves nothing behind: once the first
    // stream ends, the next request starts and finishes.
    drop(first);
    let next = tokio::time::timeout(std::time::Duration::from_secs(60), ask())
        .await
        .expect("the slot is free again")
        .unwrap();
    assert!(ends_with_done(next).await);
}

/// On mistral.rs's default scheduler (the CPU) at most `PREFILL_SLOTS`
/// answers wait for their prompt step inside mistral.rs; the next waits in the
/// engine, where dropping it costs nothing, until a first token is sampled.
#[tokio::test]
async fn answers_wait_in_the_engine_while_the_prefill_slots_are_taken() {
    use flywheel_router::engine::mistral::PREFILL_SLOTS;
    let plain = engine(false).await;
    let params = greedy(4);
    // About 300 prompt tokens: each prefill takes seconds on the CPU.
    let long = format!(
        "Summarize these notes in one line. {}",
        "The quarterly review covered hiring, travel budgets and the new laptop policy. ".repeat(20)
    );
    let ask = |text: String| plain.generate(vec![ChatMessage::user(text)], params.clone());
    let mut admitted = Vec::new();
    for k in 0..PREFILL_SLOTS {
        admitted.push(ask(format!("{k}. {long}")).await.unwrap());
    }
    let queued = tokio::time::timeout(std::time::Duration::from_millis(300), ask(long.clone())).await;
    assert!(queued.is_err(), "an answer was sent while every prefill slot was taken");
    // The first token of an admitted answer frees its slot.
    let first = admitted[0].next().await.unwrap().unwrap();
    assert!(matches!(first, GenerationEvent::Delta(_)), "{first:?}");
    let next = tokio::time::timeout(std::time::Duration::from_secs(120), ask("Say hello".into()))
        .await
        .expect("a prefill slot is free again")
        .unwrap();
    for mut s in admitted {
        while s.next().await.is_some() {}
    }
    assert!(ends_with_done(next).await);
}

/// Paged attention is a GPU feature of mistral.rs: on the CPU `auto` keeps the
/// contiguous cache and the model serves; `on` for a generation engine that
/// ended up on the CPU (`device = "auto"` without a GPU) is a load error that
/// says what to change; a router engine never uses it, so `on` does not stop
/// the same entry from routing.
#[tokio::test]
async fn paged_attention_on_the_cpu_is_off_for_auto_and_an_error_for_on() {
    use flywheel_router::engine::mistral::{DeviceChoice, PagedAttention};
    let opts = |paged_attention, router| MistralOptions {
        device: DeviceChoice::Auto,
        paged_attention,
        ..MistralOptions::new(model(), router)
    };
    if flywheel_router::device::CUDA_BUILT {
        return; // `auto` may open a GPU here; this test is about the CPU.
    }
    let auto = MistralEngine::load(&opts(PagedAttention::Auto, false)).await.unwrap();
    assert!(!auto.paged_attention());
    let mut stream = auto
        .generate(vec![ChatMessage::user("Say hi.")], greedy(2))
        .await
        .unwrap();
    assert!(stream.next().await.unwrap().is_ok());
    drop(stream);
    drop(auto);

    let Err(err) = MistralEngine::load(&opts(PagedAttention::On, false)).await else {
        panic!("paged attention on the CPU loaded");
    };
    let chain = format!("{:#}", anyhow::Error::new(err));
    assert!(
        chain.contains("needs a GPU") && chain.contains("paged_attention = \"auto\""),
        "{chain}"
    );
    let router = MistralEngine::load(&opts(PagedAttention::On, true)).await.unwrap();
    assert!(!router.paged_attention());
}

/// A route decision whose caller goes away (a client that cancels) while its
/// prompt is in the engine must not take the engine down: mistral.rs 0.8.1
/// stops its engine thread when it cannot deliver a raw-logit answer or a
/// tokenization, failing everything else in it. Each round cancels one
/// decision at a different point (waiting, tokenizing, in its prompt step,
/// retiring) while another is queued behind it; the queued one succeeds.
#[tokio::test]
async fn route_decisions_dropped_midway_leave_the_router_serving_the_rest() {
    let router = engine(true).await;
    router.warm_up(&prompt("hello")).await.unwrap();
    for (round, delay_ms) in [0u64, 1, 3, 10, 30, 60, 120, 200, 300].into_iter().enumerate() {
        let cancelled = {
            let r = router.clone();
            tokio::spawn(async move {
                let q = format!("round {round}: my laptop will not start after the update");
                tokio::time::timeout(
                    std::time::Duration::from_millis(delay_ms),
                    r.score_labels(&prompt(&q), &labels()),
                )
                .await
                .is_err()
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let q = format!("round {round}: how many vacation days do I have left?");
        let kept = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            router.score_labels(&prompt(&q), &labels()),
        )
        .await
        .expect("the queued decision finishes");
        let kept = kept.unwrap_or_else(|e| panic!("cancel after {delay_ms} ms: the queued decision failed: {e}"));
        assert_eq!(kept.logprobs.len(), 4);
        cancelled.await.unwrap();
    }
}

/// The same for a generation engine: label scoring and tokenization dropped
/// at any point leave an answer streaming beside them intact.
#[tokio::test]
async fn requests_dropped_midway_leave_the_answers_in_flight_intact() {
    let plain = engine(false).await;
    // Label plans are made once per label set: later calls go straight to
    // the prompt's prefill.
    plain
        .score_labels(&prompt("my laptop will not start"), &labels())
        .await
        .unwrap();
    let params = greedy(48);
    let mut s = plain
        .generate(
            vec![ChatMessage::user("Write a short story about a lighthouse keeper.")],
            params,
        )
        .await
        .unwrap();
    // Read the answer as it comes, so the engine is never held up on it.
    let reader = tokio::spawn(async move {
        let mut done = None;
        while let Some(ev) = s.next().await {
            if let GenerationEvent::Done(summary) = ev? {
                done = Some(summary);
            }
        }
        Ok::<_, flywheel_router::engine::EngineError>(done)
    });
    for delay_ms in [0u64, 1, 3, 10, 30, 60, 120, 200] {
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(delay_ms),
            plain.score_labels(&prompt("my laptop will not start"), &labels()),
        )
        .await;
    }
    let done = reader
        .await
        .unwrap()
        .expect("the answer streams to its end")
        .expect("a Done event ends the stream");
    assert_eq!(done.usage.completion_tokens, 48);
}

#[tokio::test]
async fn a_seed_makes_sampling_repeatable_and_stop_strings_end_the_answer() {
    let engine = engine(false).await;
    let sampled = |seed| GenerateParams {
        max_tokens: 24,
        temperature: Some(1.0),
        top_p: Some(0.95),
        seed: Some(seed),
        ..GenerateParams::default()
    };
    let poem = "Write a short poem about the sea.";
    let (first, _) = answer_with(&engine, poem, sampled(7)).await;
    let (again, _) = answer_with(&engine, poem, sampled(7)).await;
    assert_eq!(first, again, "the same seed samples the same answer");
    let mut others = Vec::new();
    for seed in [8, 9, 10] {
        others.push(answer_with(&engine, poem, sampled(seed)).await.0);
    }
    assert!(
        others.iter().any(|o| *o != first),
        "other seeds sample: {first:?} / {others:?}"
    );

    // Greedy, then again with a stop string taken from the middle of it.
    let (whole, _) = answer(&engine, poem, 24).await;
    let words: Vec<&str> = whole.split_whitespace().collect();
    assert!(words.len() >= 4, "{whole:?}");
    let stop = format!(" {}", words[2]);
    let cut = whole.find(&stop).unwrap();
    let (head, summary) = answer_with(
        &engine,
        poem,
        GenerateParams {
            stop: vec![stop.clone()],
            ..greedy(24)
        },
    )
    .await;
    assert_eq!(head, whole[..cut], "stopped before {stop:?}");
    assert_eq!(summary.finish_reason, FinishReason::Stop);
}
