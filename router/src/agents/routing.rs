//! The router agent: classifies a query into one of the configured experts.
//!
//! It never generates free text: the engine scores every expert name as the
//! model's answer in one prefill ([`crate::engine::Engine::score_labels`]),
//! and the scores are normalised over the experts. Below the confidence
//! threshold the fallback expert answers. The system prompt (instructions and
//! expert list) is identical for every query, so the engine's prefix cache
//! reuses its KV and a decision costs only the query's tokens.
//!
//! Small models favour some label words whatever the query (SmolLM2-135M
//! puts most of its mass on `it`, a frequent English word). With
//! `calibrate` on, the router subtracts each label's log-probability for a
//! content-free query ("N/A"), computed once per model version: contextual
//! calibration (Zhao et al., 2021, "Calibrate Before Use"). The logged
//! `logprob` stays the model's raw value; `probability` is calibrated.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::{ExpertSpec, RouterSpec};
use crate::engine::labels::OUT_OF_SCOPE_LABEL;
use crate::engine::{ChatMessage, EngineError, LabelScores, LabelSet, ModelKind};
use crate::models::slots::{ServedModel, Slot};

/// One expert's score.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpertScore {
    /// Expert name.
    pub expert: String,
    /// Probability normalised over the experts.
    pub probability: f32,
    /// The model's log-probability of the expert's label.
    pub logprob: f32,
}

/// The router's decision for one query.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouteDecision {
    /// The expert that answers.
    pub expert: String,
    /// The router's own top choice.
    pub top_expert: String,
    /// Probability of the top choice.
    pub confidence: f32,
    /// Every expert's score, best first (empty when forced).
    pub scores: Vec<ExpertScore>,
    /// Version of the router model (empty when forced).
    pub router_model_version: String,
    /// Decision time in milliseconds.
    pub latency_ms: f64,
    /// The caller chose the expert.
    pub forced: bool,
    /// Confidence was below the threshold: the fallback expert answers.
    pub fallback: bool,
    /// Prompt length the router model read, in tokens.
    pub prompt_tokens: u32,
    /// How the deciding model routes (absent when forced).
    #[serde(default)]
    pub router_kind: Option<ModelKind>,
}

impl RouteDecision {
    /// A decision made by the caller.
    pub fn forced(expert: &str) -> Self {
        Self {
            expert: expert.to_string(),
            top_expert: expert.to_string(),
            confidence: 1.0,
            scores: Vec::new(),
            router_model_version: String::new(),
            latency_ms: 0.0,
            forced: true,
            fallback: false,
            prompt_tokens: 0,
            router_kind: None,
        }
    }
}

/// The content-free query whose label scores are the model's prior.
const CONTENT_FREE_QUERY: &str = "N/A";

/// The router agent.
pub struct RouterAgent {
    slot: Arc<Slot>,
    labels: LabelSet,
    /// The experts plus [`OUT_OF_SCOPE_LABEL`], scored for models trained with it.
    labels_with_oos: LabelSet,
    system_prompt: String,
    threshold: f32,
    fallback: String,
    calibrate: bool,
    decide_during_rails: bool,
    /// Label log-probabilities for the content-free query, per model version.
    prior: Mutex<Option<(String, Arc<Vec<f32>>)>>,
}

impl RouterAgent {
    /// A router over `experts`, using the model in `slot`.
    ///
    /// # Errors
    /// [`EngineError::InvalidLabels`] when expert names are not a valid label set.
    pub fn new(spec: &RouterSpec, experts: &[ExpertSpec], slot: Arc<Slot>) -> Result<Self, EngineError> {
        let labels = LabelSet::new(experts.iter().map(|e| e.name.clone()).collect())?;
        let mut with_oos = labels.names().to_vec();
        if !with_oos.iter().any(|l| l == OUT_OF_SCOPE_LABEL) {
            with_oos.push(OUT_OF_SCOPE_LABEL.to_string());
        }
        Ok(Self {
            slot,
            labels_with_oos: LabelSet::new(with_oos)?,
            labels,
            system_prompt: system_prompt(&spec.instructions, experts),
            threshold: spec.confidence_threshold,
            fallback: spec.fallback_expert.clone(),
            calibrate: spec.calibrate,
            decide_during_rails: spec.decide_during_rails,
            prior: Mutex::new(None),
        })
    }

    /// Whether it may decide while the input rails run (`[router]
    /// decide_during_rails`).
    pub fn decides_during_rails(&self) -> bool {
        self.decide_during_rails
    }

    /// The expert names, in configured order.
    pub fn experts(&self) -> &[String] {
        self.labels.names()
    }

    /// The zero-shot chat prompt for a query (instructions and expert list),
    /// used for base models.
    pub fn prompt(&self, query: &str) -> Vec<ChatMessage> {
        vec![
            ChatMessage::system(self.system_prompt.clone()),
            ChatMessage::user(query),
        ]
    }

    /// The prompt `model` gets for `query`: a fine-tuned model is prompted
    /// exactly as it was trained, a base model zero-shot.
    pub fn prompt_for(&self, model: &ServedModel, query: &str) -> Vec<ChatMessage> {
        match &model.task {
            // A classifier reads the query alone.
            Some(task) if task.kind.is_classifier() => vec![ChatMessage::user(query)],
            Some(task) => vec![
                ChatMessage::system(task.system_prompt.clone()),
                ChatMessage::user(query),
            ],
            None => self.prompt(query),
        }
    }

    /// Check that `model` can route to this router's experts: a fine-tuned
    /// model must have been trained on exactly this label set (plus, if it
    /// likes, [`OUT_OF_SCOPE_LABEL`]).
    ///
    /// # Errors
    /// [`EngineError::InvalidLabels`] naming both label sets.
    pub fn check_model(&self, model: &ServedModel) -> Result<(), EngineError> {
        let Some(task) = &model.task else { return Ok(()) };
        let mut trained = task.labels.clone();
        if !self.labels.names().iter().any(|l| l == OUT_OF_SCOPE_LABEL) {
            trained.retain(|l| l != OUT_OF_SCOPE_LABEL);
        }
        let mut served = self.labels.names().to_vec();
        trained.sort();
        served.sort();
        if trained == served {
            Ok(())
        } else {
            Err(EngineError::InvalidLabels(format!(
                "model {} was trained for labels [{}] but this server routes to [{}]",
                model.version,
                trained.join(", "),
                served.join(", ")
            )))
        }
    }

    /// Check `model`, prime the engine with the fixed prompt prefix and pay
    /// one-time costs.
    ///
    /// # Errors
    /// A label mismatch or engine failures: the model is not fit to route.
    pub async fn warm_up(&self, model: &ServedModel) -> Result<(), EngineError> {
        self.check_model(model)?;
        model.engine.warm_up(&self.prompt_for(model, "hello")).await?;
        // Scoring builds and caches the label plan (tokenized expert names)
        // and, when calibrating, the model's label prior.
        self.prior_for(model).await?;
        model
            .engine
            .score_labels(&self.prompt_for(model, "hello"), &self.labels)
            .await?;
        Ok(())
    }

    /// The label prior of `model` (empty when not calibrating, and for
    /// fine-tuned models, whose label scores need no correction).
    async fn prior_for(&self, model: &ServedModel) -> Result<Arc<Vec<f32>>, EngineError> {
        if !self.calibrate || model.task.is_some() {
            return Ok(Arc::new(Vec::new()));
        }
        let cached = self
            .prior
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some((version, prior)) = cached
            && version == model.version
        {
            return Ok(prior);
        }
        let scores = model
            .engine
            .score_labels(&self.prompt_for(model, CONTENT_FREE_QUERY), &self.labels)
            .await?;
        let prior = Arc::new(scores.logprobs);
        *self.prior.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((model.version.clone(), prior.clone()));
        Ok(prior)
    }

    /// The model serving this router now.
    pub fn model(&self) -> Arc<ServedModel> {
        self.slot.current()
    }

    /// Decide which expert answers `query`.
    ///
    /// # Errors
    /// Engine failures.
    pub async fn decide(&self, query: &str) -> Result<RouteDecision, EngineError> {
        self.decide_with(&self.slot.current(), query).await
    }

    /// Decide with `model` instead of the slot's (shadow runs of a candidate).
    ///
    /// # Errors
    /// Engine failures.
    pub async fn decide_with(&self, model: &ServedModel, query: &str) -> Result<RouteDecision, EngineError> {
        let start = Instant::now();
        let prior = self.prior_for(model).await?;
        // A model trained with an out-of-scope label scores it too.
        let with_oos = self.labels_with_oos.len() > self.labels.len()
            && model
                .task
                .as_ref()
                .is_some_and(|t| t.labels.iter().any(|l| l == OUT_OF_SCOPE_LABEL));
        let set = if with_oos { &self.labels_with_oos } else { &self.labels };
        let mut scores = model.engine.score_labels(&self.prompt_for(model, query), set).await?;
        if with_oos && let Some(oos) = scores.logprobs.pop() {
            scores.out_of_scope |= scores.logprobs.iter().all(|&l| oos > l);
        }
        let probs = calibrated(&scores, &prior).probabilities();
        let latency_ms = start.elapsed().as_secs_f64() * 1e3;
        let mut decision = self.decision(
            &probs,
            &scores.logprobs,
            &model.version,
            latency_ms,
            scores.prompt_tokens,
        );
        decision.router_kind = Some(model.kind());
        if scores.out_of_scope && !decision.fallback {
            decision.fallback = true;
            decision.expert = self.fallback.clone();
        }
        Ok(decision)
    }

    fn decision(
        &self,
        probs: &[f32],
        logprobs: &[f32],
        version: &str,
        latency_ms: f64,
        prompt_tokens: u32,
    ) -> RouteDecision {
        let mut scores: Vec<ExpertScore> = self
            .labels
            .names()
            .iter()
            .zip(probs.iter().zip(logprobs))
            .map(|(name, (&p, &lp))| ExpertScore {
                expert: name.clone(),
                probability: p,
                logprob: lp,
            })
            .collect();
        scores.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        let top = scores
            .first()
            .map(|s| (s.expert.clone(), s.probability))
            .unwrap_or_default();
        let fallback = top.1 < self.threshold;
        RouteDecision {
            expert: if fallback { self.fallback.clone() } else { top.0.clone() },
            top_expert: top.0,
            confidence: top.1,
            scores,
            router_model_version: version.to_string(),
            latency_ms,
            forced: false,
            fallback,
            prompt_tokens,
            router_kind: None,
        }
    }
}

/// Scores with the prior subtracted (unchanged when `prior` is empty).
fn calibrated(scores: &LabelScores, prior: &[f32]) -> LabelScores {
    if prior.len() != scores.logprobs.len() {
        return scores.clone();
    }
    LabelScores {
        logprobs: scores.logprobs.iter().zip(prior).map(|(l, p)| l - p).collect(),
        ..scores.clone()
    }
}

fn system_prompt(instructions: &str, experts: &[ExpertSpec]) -> String {
    let mut s = format!("{}\n\nTeams:\n", instructions.trim());
    for e in experts {
        s.push_str(&format!("- {}: {}\n", e.name, e.description));
    }
    s.push_str("\nReply with one team name only.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineSettings;

    fn agent(threshold: f32) -> RouterAgent {
        let settings = EngineSettings::default();
        let mut spec = settings.router.clone();
        spec.confidence_threshold = threshold;
        let slot = Arc::new(Slot::new("router", Arc::new(crate::testing::stub_model("v1"))));
        RouterAgent::new(&spec, &settings.experts, slot).unwrap()
    }

    #[test]
    fn prompt_lists_every_expert_with_its_description() {
        let a = agent(0.3);
        let p = a.prompt("my laptop is broken");
        assert_eq!(p.len(), 2);
        for e in EngineSettings::default().experts {
            assert!(p[0].content.contains(&format!("- {}: {}", e.name, e.description)));
        }
        assert_eq!(p[1].content, "my laptop is broken");
    }

    #[test]
    fn picks_top_expert_and_sorts_scores() {
        let a = agent(0.3);
        let d = a.decision(
            &[0.1, 0.6, 0.1, 0.1, 0.1],
            &[-2.0, -0.5, -2.0, -2.0, -2.0],
            "v1",
            3.0,
            40,
        );
        assert_eq!(d.expert, "it");
        assert!(!d.fallback);
        assert_eq!(d.scores[0].expert, "it");
        assert_eq!(d.scores.len(), 5);
        assert_eq!(d.router_model_version, "v1");
    }

    #[test]
    fn calibration_removes_a_label_prior() {
        // The model prefers label 0 whatever the query; the query favours label 1.
        let scores = LabelScores {
            logprobs: vec![-0.2, -1.0],
            prompt_tokens: 1,
            forward_passes: 1,
            out_of_scope: false,
        };
        let prior = [-0.1, -3.0];
        let p = calibrated(&scores, &prior).probabilities();
        assert!(p[1] > p[0], "{p:?}");
        assert_eq!(calibrated(&scores, &[]), scores);
    }

    /// An engine whose scores favour the last label it is asked about.
    struct FavoursLast;

    #[async_trait::async_trait]
    impl crate::engine::Engine for FavoursLast {
        fn backend(&self) -> &'static str {
            "test"
        }
        async fn generate(
            &self,
            _: Vec<ChatMessage>,
            _: crate::engine::GenerateParams,
        ) -> Result<crate::engine::TokenStream, EngineError> {
            Err(EngineError::Disconnected)
        }
        async fn score_labels(&self, _: &[ChatMessage], labels: &LabelSet) -> Result<LabelScores, EngineError> {
            let mut logprobs = vec![-3.0; labels.len()];
            logprobs[labels.len() - 1] = -0.1;
            Ok(LabelScores {
                logprobs,
                prompt_tokens: 1,
                forward_passes: 1,
                out_of_scope: false,
            })
        }
        async fn warm_up(&self, _: &[ChatMessage]) -> Result<(), EngineError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_model_trained_with_an_out_of_scope_label_sends_its_queries_to_the_fallback() {
        let settings = EngineSettings::default();
        let mut labels: Vec<String> = settings.experts.iter().map(|e| e.name.clone()).collect();
        let model = |labels: Vec<String>| ServedModel {
            engine: Arc::new(FavoursLast),
            task: Some(crate::models::task::TrainedTask {
                system_prompt: String::new(),
                labels,
                kind: ModelKind::LabelScoring,
            }),
            ..crate::testing::stub_model("oos")
        };
        let plain = Arc::new(model(labels.clone()));
        labels.push(OUT_OF_SCOPE_LABEL.into());
        let trained = Arc::new(model(labels));
        let mut spec = settings.router.clone();
        spec.confidence_threshold = 0.0;
        let a = RouterAgent::new(&spec, &settings.experts, Arc::new(Slot::new("router", trained.clone()))).unwrap();
        a.check_model(&trained).unwrap();
        let d = a.decide("anything").await.unwrap();
        assert!(d.fallback, "{d:?}");
        assert_eq!(d.expert, spec.fallback_expert);
        assert_eq!(d.scores.len(), settings.experts.len(), "the label is not an expert");
        // Without the label the same engine's top expert answers.
        let d = a.decide_with(&plain, "anything").await.unwrap();
        assert!(!d.fallback);
        assert_eq!(d.expert, settings.experts.last().unwrap().name);
    }

    #[test]
    fn low_confidence_goes_to_fallback_but_keeps_top_choice() {
        let a = agent(0.5);
        let d = a.decision(&[0.3, 0.25, 0.15, 0.15, 0.15], &[-1.0; 5], "v1", 1.0, 10);
        assert!(d.fallback);
        assert_eq!(d.expert, "general");
        assert_eq!(d.top_expert, "hr");
        assert!((d.confidence - 0.3).abs() < 1e-6);
    }
}
