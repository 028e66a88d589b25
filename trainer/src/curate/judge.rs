//! LLM-as-judge error attribution: for an unsatisfactory request, which step
//! failed? The judge runs through our own engine (any configured model);
//! its prompt states a rubric and a three-line answer format, and
//! [`parse_verdict`] reads that format strictly enough that a malformed
//! answer is counted as malformed rather than guessed.

use std::sync::Arc;

use flywheel_router::engine::labels::LabelSet;
use flywheel_router::engine::{ChatMessage, Engine, EngineError, GenerateParams, GenerationEvent};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// Why a request went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The router picked the wrong expert.
    WrongRoute,
    /// The right expert lacked the right passages.
    RetrievalMiss,
    /// The right expert and passages, but a poor answer.
    BadGeneration,
    /// A guardrail refused or altered a legitimate query.
    GuardrailFalsePositive,
    /// Anything else (unclear question, user changed their mind...).
    Other,
}

impl Cause {
    /// Every cause, in rubric order.
    pub const ALL: [Cause; 5] = [
        Cause::WrongRoute,
        Cause::RetrievalMiss,
        Cause::BadGeneration,
        Cause::GuardrailFalsePositive,
        Cause::Other,
    ];

    /// Name in the rubric and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::WrongRoute => "wrong_route",
            Cause::RetrievalMiss => "retrieval_miss",
            Cause::BadGeneration => "bad_generation",
            Cause::GuardrailFalsePositive => "guardrail_false_positive",
            Cause::Other => "other",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        let key: String = s
            .trim()
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase()
            .chars()
            .map(|c| if c == ' ' || c == '-' { '_' } else { c })
            .collect();
        match key.as_str() {
            "wrong_route" | "wrong_routing" | "routing" | "misroute" | "misrouted" | "route" => Some(Cause::WrongRoute),
            "retrieval_miss" | "retrieval" | "missing_context" => Some(Cause::RetrievalMiss),
            "bad_generation" | "generation" | "bad_answer" => Some(Cause::BadGeneration),
            "guardrail_false_positive" | "guardrail" | "false_positive" => Some(Cause::GuardrailFalsePositive),
            "other" => Some(Cause::Other),
            _ => None,
        }
    }
}

/// A parsed judge answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The attributed cause.
    pub cause: Cause,
    /// The judge's confidence, 1 (guess) to 10 (certain).
    pub score: u8,
    /// The expert that should have answered, when the judge names a known one.
    pub expert: Option<String>,
}

/// Why a judge answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ParseError {
    /// No `cause:` line with a known cause.
    #[error("no `cause:` line naming one of the causes")]
    NoCause,
    /// No `score:` line with an integer.
    #[error("no `score:` line with an integer")]
    NoScore,
    /// The score is outside 1-10.
    #[error("score {0} is outside 1-10")]
    ScoreOutOfRange(i64),
}

/// What the judge sees about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Case<'a> {
    /// The user's query.
    pub query: &'a str,
    /// The expert it was routed to.
    pub routed_expert: &'a str,
    /// The answer given (may be empty for route-only requests).
    pub answer: &'a str,
    /// The user's comment, if any.
    pub comment: Option<&'a str>,
    /// The rail verdicts that fired (names), if any.
    pub rails: &'a [String],
}

/// Longest answer excerpt shown to the judge (characters): enough to see
/// whether it addresses the question, short enough for a small context.
const ANSWER_EXCERPT_CHARS: usize = 600;

/// The judge's messages for `case`, with `experts` as (name, description).
pub fn prompt(case: &Case<'_>, experts: &[(String, String)]) -> Vec<ChatMessage> {
    let expert_list: Vec<String> = experts.iter().map(|(n, d)| format!("- {n}: {d}")).collect();
    let causes: Vec<&str> = Cause::ALL.iter().map(|c| c.as_str()).collect();
    let system = format!(
        "You audit an assistant that routes each question to one expert team, which then answers.\n\
         A user was not satisfied. Decide the most likely cause:\n\
         - wrong_route: another team should have answered the question\n\
         - retrieval_miss: the right team answered but lacked the right documents\n\
         - bad_generation: the right team had what it needed but answered poorly\n\
         - guardrail_false_positive: a safety filter blocked or altered a legitimate question\n\
         - other: none of the above\n\
         Teams:\n{}\n\
         Reply with exactly three lines:\n\
         cause: <one of {}>\n\
         score: <1-10, how sure you are>\n\
         expert: <the team that should answer, or none>",
        expert_list.join("\n"),
        causes.join(", ")
    );
    let answer: String = case.answer.chars().take(ANSWER_EXCERPT_CHARS).collect();
    let mut user = format!(
        "Question: {}\nRouted to: {}\nAnswer: {}",
        case.query,
        case.routed_expert,
        if answer.is_empty() { "(none)" } else { &answer }
    );
    if let Some(c) = case.comment {
        user.push_str(&format!("\nUser comment: {c}"));
    }
    if !case.rails.is_empty() {
        user.push_str(&format!("\nGuardrails that fired: {}", case.rails.join(", ")));
    }
    vec![ChatMessage::system(system), ChatMessage::user(user)]
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let line = line.trim().trim_start_matches(['-', '*', '#', ' ']);
        let (k, v) = line.split_once([':', '='])?;
        let k = k.trim().trim_matches('*').trim().to_lowercase();
        (k == key).then_some(v.trim().trim_matches('*').trim())
    })
}

/// Read a judge answer. `experts` are the known names; an unknown `expert:`
/// value is dropped (not guessed).
///
/// # Errors
/// [`ParseError`] when the cause or the score is missing or invalid.
pub fn parse_verdict(text: &str, experts: &[String]) -> Result<Verdict, ParseError> {
    let cause = field(text, "cause").and_then(Cause::parse).ok_or(ParseError::NoCause)?;
    let raw = field(text, "score").ok_or(ParseError::NoScore)?;
    // The whole leading integer: "10", "10/10" and "10 (sure)" are all 10.
    let digits: String = raw.chars().take_while(char::is_ascii_digit).collect();
    let score: i64 = digits.parse().map_err(|_| ParseError::NoScore)?;
    if !(1..=10).contains(&score) {
        return Err(ParseError::ScoreOutOfRange(score));
    }
    let expert = field(text, "expert")
        .map(|e| {
            e.trim_matches(|c: char| !c.is_alphanumeric() && c != '_' && c != '-')
                .to_lowercase()
        })
        .filter(|e| experts.iter().any(|k| k == e));
    Ok(Verdict {
        cause,
        score: score as u8,
        expert,
    })
}

/// Judge answer length cap (tokens): three short lines.
const JUDGE_MAX_TOKENS: usize = 48;

/// How the judge answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum JudgeMode {
    /// Free generation in the three-line format, parsed strictly (for
    /// models that follow instructions).
    #[default]
    Generate,
    /// Constrained choice: the engine scores every cause label (and, for a
    /// wrong route, every expert) as the answer; the confidence is the top
    /// probability in tenths. Never malformed; suits small models.
    Choice,
}

/// Runs judge prompts on an engine.
pub struct Judge {
    engine: Arc<dyn Engine>,
    model_version: String,
    experts: Vec<(String, String)>,
    mode: JudgeMode,
}

/// The judge's raw answer and what was read from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// The request judged.
    pub request_id: String,
    /// The judge model's version.
    pub model_version: String,
    /// The raw answer.
    pub raw: String,
    /// The parsed verdict, or why it could not be parsed.
    pub verdict: Result<Verdict, ParseError>,
}

impl Judge {
    /// A judge on `engine` that knows `experts` (name, description).
    pub fn new(engine: Arc<dyn Engine>, model_version: String, experts: Vec<(String, String)>) -> Self {
        Self {
            engine,
            model_version,
            experts,
            mode: JudgeMode::Generate,
        }
    }

    /// Use `mode`.
    pub fn with_mode(mut self, mode: JudgeMode) -> Self {
        self.mode = mode;
        self
    }

    /// Constrained choice over the causes, then over the experts for a wrong route.
    async fn choose(&self, case: &Case<'_>) -> Result<(String, Verdict), EngineError> {
        let mut messages = prompt(case, &self.experts);
        if let Some(system) = messages.first_mut() {
            system.content.push_str("\nReply with the cause only.");
        }
        let causes = LabelSet::new(Cause::ALL.iter().map(|c| c.as_str().to_string()).collect())?;
        let probs = self.engine.score_labels(&messages, &causes).await?.probabilities();
        let (best, p) = probs
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((Cause::ALL.len() - 1, 0.0));
        let cause = Cause::ALL[best];
        let mut raw = format!(
            "choice: {}",
            causes
                .names()
                .iter()
                .zip(&probs)
                .map(|(n, p)| format!("{n}={p:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut expert = None;
        if cause == Cause::WrongRoute && !self.experts.is_empty() {
            let names = LabelSet::new(self.experts.iter().map(|(n, _)| n.clone()).collect())?;
            let mut ask = prompt(case, &self.experts);
            if let Some(system) = ask.first_mut() {
                system
                    .content
                    .push_str("\nReply with the name of the team that should answer only.");
            }
            let ep = self.engine.score_labels(&ask, &names).await?.probabilities();
            if let Some((i, _)) = ep.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) {
                expert = Some(names.names()[i].clone());
                raw.push_str(&format!(" expert={}", names.names()[i]));
            }
        }
        let score = ((p * 10.0).round() as u8).clamp(1, 10);
        Ok((raw, Verdict { cause, score, expert }))
    }

    /// The judge model's version.
    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    /// Judge one case (greedy decoding, so runs repeat).
    ///
    /// # Errors
    /// Engine failures (a malformed answer is not an error).
    pub async fn judge(&self, request_id: &str, case: &Case<'_>) -> Result<Judgement, EngineError> {
        if self.mode == JudgeMode::Choice {
            let (raw, verdict) = self.choose(case).await?;
            return Ok(Judgement {
                request_id: request_id.to_string(),
                model_version: self.model_version.clone(),
                raw,
                verdict: Ok(verdict),
            });
        }
        let params = GenerateParams {
            max_tokens: JUDGE_MAX_TOKENS,
            ..GenerateParams::default()
        };
        let mut stream = self.engine.generate(prompt(case, &self.experts), params).await?;
        let mut raw = String::new();
        while let Some(event) = stream.next().await {
            match event? {
                GenerationEvent::Delta(t) => raw.push_str(&t),
                GenerationEvent::Done(_) => break,
            }
        }
        let names: Vec<String> = self.experts.iter().map(|(n, _)| n.clone()).collect();
        Ok(Judgement {
            request_id: request_id.to_string(),
            model_version: self.model_version.clone(),
            verdict: parse_verdict(&raw, &names),
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experts() -> Vec<String> {
        vec!["hr".into(), "it".into(), "finance".into()]
    }

    #[test]
    fn parses_the_three_line_format() {
        let v = parse_verdict("cause: wrong_route\nscore: 8\nexpert: it", &experts()).unwrap();
        assert_eq!(
            v,
            Verdict {
                cause: Cause::WrongRoute,
                score: 8,
                expert: Some("it".into())
            }
        );
    }

    #[test]
    fn a_score_of_ten_parses_as_ten() {
        for text in [
            "cause: other\nscore: 10",
            "cause: other\nscore: 10/10",
            "Cause: Other\nScore = 10 (certain)",
        ] {
            assert_eq!(parse_verdict(text, &experts()).unwrap().score, 10, "{text}");
        }
    }

    #[test]
    fn tolerates_markdown_case_and_spacing_variants() {
        let v = parse_verdict(
            "Here is my analysis.\n**Cause**: Wrong route\n- **Score:** 7\n* Expert: **Finance**.",
            &experts(),
        )
        .unwrap();
        assert_eq!(
            (v.cause, v.score, v.expert.as_deref()),
            (Cause::WrongRoute, 7, Some("finance"))
        );
        let v = parse_verdict("cause: retrieval-miss\nscore: 3\nexpert: none", &experts()).unwrap();
        assert_eq!((v.cause, v.expert), (Cause::RetrievalMiss, None));
    }

    #[test]
    fn malformed_answers_are_reported_not_guessed() {
        let e = experts();
        assert_eq!(
            parse_verdict("I think the router was wrong.", &e),
            Err(ParseError::NoCause)
        );
        assert_eq!(
            parse_verdict("cause: the weather\nscore: 5", &e),
            Err(ParseError::NoCause)
        );
        assert_eq!(parse_verdict("cause: other", &e), Err(ParseError::NoScore));
        assert_eq!(parse_verdict("cause: other\nscore: high", &e), Err(ParseError::NoScore));
        assert_eq!(
            parse_verdict("cause: other\nscore: 11", &e),
            Err(ParseError::ScoreOutOfRange(11))
        );
        assert_eq!(
            parse_verdict("cause: other\nscore: 0", &e),
            Err(ParseError::ScoreOutOfRange(0))
        );
        // An unknown expert is dropped, not mapped to a known one.
        let v = parse_verdict("cause: wrong_route\nscore: 6\nexpert: legal", &e).unwrap();
        assert_eq!(v.expert, None);
    }

    /// An engine whose label scores are fixed: `bad_generation` for causes,
    /// `it` for experts.
    struct Fixed;

    #[async_trait::async_trait]
    impl Engine for Fixed {
        fn backend(&self) -> &'static str {
            "fixed"
        }
        async fn generate(
            &self,
            _: Vec<ChatMessage>,
            _: GenerateParams,
        ) -> Result<flywheel_router::engine::TokenStream, EngineError> {
            Err(EngineError::Rejected("choice mode must not generate".into()))
        }
        async fn score_labels(
            &self,
            _: &[ChatMessage],
            labels: &LabelSet,
        ) -> Result<flywheel_router::engine::labels::LabelScores, EngineError> {
            let logprobs = labels
                .names()
                .iter()
                .map(|n| if n == "wrong_route" || n == "it" { -0.1 } else { -3.0 })
                .collect();
            Ok(flywheel_router::engine::labels::LabelScores {
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
    async fn choice_mode_scores_causes_and_experts_without_generating() {
        let judge = Judge::new(
            Arc::new(Fixed),
            "fixed-v1".into(),
            vec![("hr".into(), "people".into()), ("it".into(), "computers".into())],
        )
        .with_mode(JudgeMode::Choice);
        let case = Case {
            query: "reset my password",
            routed_expert: "hr",
            answer: "",
            comment: None,
            rails: &[],
        };
        let j = judge.judge("r1", &case).await.unwrap();
        let v = j.verdict.unwrap();
        assert_eq!(v.cause, Cause::WrongRoute);
        assert_eq!(v.expert.as_deref(), Some("it"));
        // exp(-0.1) against four exp(-3.0): p = 0.82 -> 8 of 10.
        assert_eq!(v.score, 8);
        assert!(j.raw.starts_with("choice: wrong_route="), "{}", j.raw);
    }

    #[test]
    fn the_prompt_lists_teams_and_the_answer_format() {
        let case = Case {
            query: "reset my password",
            routed_expert: "finance",
            answer: "",
            comment: Some("wrong team"),
            rails: &[],
        };
        let msgs = prompt(&case, &[("it".into(), "IT help desk".into())]);
        assert!(msgs[0].content.contains("- it: IT help desk"));
        assert!(msgs[0].content.contains("cause: <one of wrong_route"));
        assert!(msgs[1].content.contains("Routed to: finance"));
        assert!(msgs[1].content.contains("Answer: (none)"));
        assert!(msgs[1].content.contains("User comment: wrong team"));
    }
}
